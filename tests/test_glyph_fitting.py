"""The glyph world's training loop: a run stopped by SIGTERM is not a trained model."""

import jax.numpy as jnp
import optax
import pytest

from realisid_jax.glyphs import fitting
from realisid_jax.training import loop


def test_preempted_training_raises_instead_of_returning_a_model(tmp_path, monkeypatch):
    state = {"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.ones(2)}}

    def stopped(step_fn, state, batches, **kw):  # as loop.run returns after SIGTERM and its checkpoint
        return loop.LoopResult(state, 3, [0.5, 0.4, 0.3], preempted=True)

    monkeypatch.setattr(fitting.loop, "run", stopped)
    with pytest.raises(fitting.Interrupted, match="step 3 of 10"):
        fitting.fit(lambda s, b: (s, {}), state, lambda step: None, num_steps=10, workdir=tmp_path,
                    checkpoint_every=5, learning_rate=optax.constant_schedule(1.0), meta={}, progress=False)
