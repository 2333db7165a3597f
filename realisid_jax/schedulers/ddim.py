"""DDIM sampler (Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12), mirroring
``diffusers.DDIMScheduler`` (0.42.1)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .common import NoiseSchedule, SchedulerState, spaced_timesteps


@struct.dataclass
class DDIMState(SchedulerState):
    """DDIM per-run state (pytree, static shapes).

    Attributes:
        timesteps: ``(N,)`` int32, descending training timesteps fed to the model.
        init_noise_sigma: ``()`` float32, always 1.
        alpha_prod_t: ``(N,)`` float32, ``abar`` at ``timesteps[i]``.
        alpha_prod_t_prev: ``(N,)`` float32, ``abar`` at ``timesteps[i] - T // N`` (diffusers' rule, for every
            spacing), or ``final_alpha_cumprod`` (1 or ``abar_0``) when that is negative.
    """

    alpha_prod_t: jax.Array
    alpha_prod_t_prev: jax.Array


@struct.dataclass
class DDIMCarry:
    """Loop carry for DDIM: only a PRNG key for ``eta > 0`` (``None`` on the deterministic path)."""

    key: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(NoiseSchedule):
    """DDIM, ``x_{t-1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - s_t^2) eps_hat + s_t z``
    (Song et al. 2021, Eq. 12) with ``s_t = eta * sqrt((1-abar_prev)/(1-abar_t) * (1 - abar_t/abar_prev))``
    (Eq. 16). ``eta = 0``: deterministic DDIM; ``eta = 1``: DDPM-like ancestral sampling.

    Mirrors ``diffusers.DDIMScheduler``; defaults are diffusers' except ``clip_sample`` (False here,
    True in diffusers; SDXL's config sets it False anyway). ``thresholding`` is not supported.
    """

    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False

    diffusers_class: ClassVar[str] = "DDIMScheduler"
    order: ClassVar[int] = 1

    def __post_init__(self):
        super().__post_init__()
        if self.thresholding:
            raise NotImplementedError("DDIMScheduler: thresholding=True is not supported")
        final = np.float32(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]
        object.__setattr__(self, "final_alpha_cumprod", np.float32(final))

    # ---------------------------------------------------------------- host side
    def set_timesteps(self, num_inference_steps: int) -> DDIMState:
        """Timesteps for ``num_inference_steps`` steps and the ``abar`` pairs each step needs."""
        ts = spaced_timesteps(self.timestep_spacing, self.num_train_timesteps, num_inference_steps, self.steps_offset)
        prev = ts - self.num_train_timesteps // num_inference_steps
        a_t = self.alphas_cumprod[ts]
        a_prev = np.where(prev >= 0, self.alphas_cumprod[np.clip(prev, 0, None)], self.final_alpha_cumprod)
        return DDIMState(
            timesteps=jnp.asarray(ts, jnp.int32),
            init_noise_sigma=jnp.asarray(1.0, jnp.float32),
            alpha_prod_t=jnp.asarray(a_t, jnp.float32),
            alpha_prod_t_prev=jnp.asarray(a_prev, jnp.float32),
        )

    # ---------------------------------------------------------------- device side
    def init_carry(self, state: DDIMState, sample: jax.Array, key: jax.Array | None = None) -> DDIMCarry:
        """Carry for :meth:`step`; pass ``key`` when sampling with ``eta > 0``."""
        del state, sample
        return DDIMCarry(key=key)

    def scale_model_input(self, state: DDIMState, sample: jax.Array, i=None) -> jax.Array:
        """Identity (DDIM works on unscaled VP samples)."""
        return sample

    def step(
        self,
        state: DDIMState,
        model_output: jax.Array,
        i,
        sample: jax.Array,
        carry: DDIMCarry | None = None,
        *,
        eta: float = 0.0,
        variance_noise: jax.Array | None = None,
    ) -> tuple[jax.Array, DDIMCarry | None]:
        """One DDIM step from ``timesteps[i]`` to the previous timestep.

        Args:
            state: from :meth:`set_timesteps`.
            model_output: ``(B, ...)`` model prediction (epsilon / v / x0 per ``prediction_type``).
            i: step index, python int or traced int32 scalar in ``[0, N)``.
            sample: ``(B, ...)`` current ``x_t``; the result has its dtype (maths in float32).
            carry: :class:`DDIMCarry`; its key is split and used when ``eta > 0`` and no ``variance_noise``.
            eta: stochasticity (python float or traced scalar); 0 skips the noise path entirely.
            variance_noise: optional ``(B, ...)`` standard normal noise for ``eta > 0``.

        Returns:
            ``(prev_sample, carry)``.
        """
        out_dtype = sample.dtype
        x = sample.astype(jnp.float32)
        m = model_output.astype(jnp.float32)
        a_t = state.alpha_prod_t[i]
        a_prev = state.alpha_prod_t_prev[i]
        b_t = 1 - a_t
        if self.prediction_type == "epsilon":
            x0 = (x - b_t**0.5 * m) / a_t**0.5
            eps = m
        elif self.prediction_type == "sample":
            x0 = m
            eps = (x - a_t**0.5 * x0) / b_t**0.5
        else:  # v_prediction
            x0 = a_t**0.5 * x - b_t**0.5 * m
            eps = a_t**0.5 * m + b_t**0.5 * x
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)

        deterministic = isinstance(eta, (int, float)) and eta == 0
        if deterministic:
            std = 0.0
            direction = (1 - a_prev) ** 0.5 * eps
        else:
            variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
            std = eta * variance**0.5
            direction = (1 - a_prev - std**2) ** 0.5 * eps
        prev = a_prev**0.5 * x0 + direction
        if not deterministic:
            if variance_noise is None:
                if carry is None or carry.key is None:
                    raise ValueError("DDIM with eta > 0 needs carry.key (init_carry(..., key=...)) or variance_noise")
                key, sub = jax.random.split(carry.key)
                variance_noise = jax.random.normal(sub, x.shape, jnp.float32)
                carry = carry.replace(key=key)
            prev = prev + std * variance_noise.astype(jnp.float32)
        return prev.astype(out_dtype), carry
