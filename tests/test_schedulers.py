"""Parity of realisid_jax.schedulers with diffusers 0.42.1 (PyTorch, CPU, float32).

Every sampler runs its full loop inside one ``jax.jit`` + ``lax.fori_loop`` and every intermediate sample is
compared with diffusers' loop driven by the same deterministic fake model.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
diffusers = pytest.importorskip("diffusers")

from realisid_jax.schedulers import (  # noqa: E402
    SCHEDULERS,
    SDXL_SCHEDULER_CONFIG,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    get_scheduler,
)

SDXL = dict(SDXL_SCHEDULER_CONFIG)
# linear / v_prediction / trailing / set_alpha_to_one variant
VARIANT = {
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "clip_sample": False,
}
CONFIGS = {"sdxl": SDXL, "variant": VARIANT}

PAIRS = {
    "ddim": (DDIMScheduler, diffusers.DDIMScheduler),
    "euler": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler),
    "dpmpp_2m": (DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler),
}
MAIN_STEPS = {"ddim": 30, "euler": 25, "dpmpp_2m": 20}
SHAPE = (2, 4, 8, 8)
REL_TOL = 1e-5


def _x_T(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def torch_loop(tsched, n, x_T, eta=0.0, noises=None):
    """diffusers loop with the fake model ``eps = 0.1 * x_in + 0.05 * sin(t)``; returns (N, *SHAPE)."""
    tsched.set_timesteps(n)
    x = torch.from_numpy(x_T) * tsched.init_noise_sigma
    outs = []
    for k, t in enumerate(tsched.timesteps):
        x_in = tsched.scale_model_input(x, t)
        eps = 0.1 * x_in + 0.05 * torch.sin(t.to(torch.float32))
        kw = {}
        if eta:
            kw = dict(eta=eta, variance_noise=torch.from_numpy(noises[k]))
        x = tsched.step(eps, t, x, **kw).prev_sample
        outs.append(x.numpy().copy())
    return np.stack(outs)


def jax_loop(sched, n, x_T, eta=0.0, noises=None):
    """The same loop inside one jit with lax.fori_loop over a traced step index; returns (N, *SHAPE)."""
    state = sched.set_timesteps(n)

    @jax.jit
    def run(state, x_T, noises):
        x = x_T * state.init_noise_sigma
        buf = jnp.zeros((state.num_inference_steps,) + x.shape, x.dtype)

        def body(i, c):
            x, carry, buf = c
            x_in = sched.scale_model_input(state, x, i)
            eps = 0.1 * x_in + 0.05 * jnp.sin(state.timesteps[i].astype(jnp.float32))
            if eta:
                x, carry = sched.step(state, eps, i, x, carry, eta=eta, variance_noise=noises[i])
            else:
                x, carry = sched.step(state, eps, i, x, carry)
            return x, carry, buf.at[i].set(x)

        return jax.lax.fori_loop(0, state.num_inference_steps, body, (x, sched.init_carry(state, x), buf))[2]

    return np.asarray(run(state, jnp.asarray(x_T), None if noises is None else jnp.asarray(noises)))


def loop_error(ref, out):
    """Worst per-step max-abs error relative to max(1, that step's max |ref|)."""
    assert ref.shape == out.shape, (ref.shape, out.shape)
    scale = np.maximum(1.0, np.abs(ref).reshape(len(ref), -1).max(1))
    return float((np.abs(ref - out).reshape(len(ref), -1).max(1) / scale).max())


def _pair(name, config, **overrides):
    ours, theirs = PAIRS[name]
    cfg = {**config, **overrides}
    return ours.from_config(cfg), theirs.from_config(cfg)


# ------------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize(
    "cfg",
    [
        {"beta_schedule": "linear"},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
    ],
    ids=["linear", "scaled_linear", "cosine"],
)
def test_noise_schedule_bit_exact(cfg):
    ours, theirs = DDPMScheduler.from_config(cfg), diffusers.DDPMScheduler.from_config(cfg)
    np.testing.assert_array_equal(ours.betas, theirs.betas.numpy())
    np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod.numpy())
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == np.float32


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_rescale_zero_snr_schedule(name):
    cfg = {**SDXL, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    ours, theirs = _pair(name, cfg)
    # betas = 1 - abar_i / abar_{i-1} cancels catastrophically: torch's CPU sqrt is not correctly rounded
    # (1 ulp off on ~20% of inputs), which shows up as ~1e-6 absolute in the rescaled betas.
    np.testing.assert_allclose(ours.betas, theirs.betas.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-9)
    assert ours.alphas_cumprod[-1] == theirs.alphas_cumprod[-1].item()


# ------------------------------------------------------------------------------------------------ timesteps
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
def test_timesteps_and_sigmas(name, cfg_name, spacing):
    over = {} if spacing is None else {"timestep_spacing": spacing}
    ours, theirs = _pair(name, CONFIGS[cfg_name], **over)
    for n in (1, 5, 7, 20, 25, 30, 50):
        state = ours.set_timesteps(n)
        theirs.set_timesteps(n)
        ref_ts = theirs.timesteps.numpy()
        np.testing.assert_array_equal(np.asarray(state.timesteps), ref_ts.astype(np.asarray(state.timesteps).dtype))
        assert state.timesteps.dtype == (jnp.float32 if name == "euler" else jnp.int32)
        assert state.num_inference_steps == len(ref_ts) == n
        np.testing.assert_allclose(float(state.init_noise_sigma), float(theirs.init_noise_sigma), rtol=1e-6)
        if hasattr(theirs, "sigmas") and name != "ddim":
            np.testing.assert_allclose(np.asarray(state.sigmas), theirs.sigmas.numpy(), rtol=2e-7, atol=0)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_karras_sigmas(name):
    ours, theirs = _pair(name, SDXL, use_karras_sigmas=True)
    state = ours.set_timesteps(20)
    theirs.set_timesteps(20)
    np.testing.assert_allclose(np.asarray(state.timesteps), theirs.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(np.asarray(state.sigmas), theirs.sigmas.numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ full loops
LOOP_CASES = [(name, cfg, n) for name in PAIRS for cfg in CONFIGS for n in (MAIN_STEPS[name], 5)]


@pytest.mark.parametrize("name,cfg_name,n", LOOP_CASES, ids=[f"{a}-{b}-{c}" for a, b, c in LOOP_CASES])
def test_full_loop_matches_diffusers(name, cfg_name, n):
    ours, theirs = _pair(name, CONFIGS[cfg_name])
    x_T = _x_T(n)
    ref = torch_loop(theirs, n, x_T)
    out = jax_loop(ours, n, x_T)
    assert np.isfinite(out).all()
    err = loop_error(ref, out)
    assert err <= REL_TOL, f"{name} {cfg_name} N={n}: rel err {err:.3e}"


EXTRA_CASES = {
    "ddim-clip-sample-pred": ("ddim", dict(SDXL, prediction_type="sample", clip_sample=True, clip_sample_range=1.5), 10),
    "ddim-linspace-zero-snr": ("ddim", dict(VARIANT, timestep_spacing="linspace", rescale_betas_zero_snr=True), 12),
    "euler-karras": ("euler", dict(SDXL, use_karras_sigmas=True), 15),
    "euler-sample-pred-linspace": ("euler", dict(SDXL, prediction_type="sample", timestep_spacing="linspace"), 8),
    "dpm-karras": ("dpmpp_2m", dict(SDXL, use_karras_sigmas=True), 20),
    "dpm-heun-sigma-min": ("dpmpp_2m", dict(SDXL, solver_type="heun", final_sigmas_type="sigma_min"), 16),
    "dpm-sample-pred-cosine": ("dpmpp_2m", dict(VARIANT, prediction_type="sample", beta_schedule="squaredcos_cap_v2"), 10),
    "dpm-no-lower-order-final": ("dpmpp_2m", dict(SDXL, lower_order_final=False, final_sigmas_type="sigma_min"), 6),
}


@pytest.mark.parametrize("case", list(EXTRA_CASES))
def test_option_loops_match_diffusers(case):
    name, cfg, n = EXTRA_CASES[case]
    ours, theirs = _pair(name, cfg)
    x_T = _x_T(1)
    err = loop_error(torch_loop(theirs, n, x_T), jax_loop(ours, n, x_T))
    assert err <= REL_TOL, f"{case}: rel err {err:.3e}"


def test_ddim_eta_with_given_noise_matches_diffusers():
    ours, theirs = _pair("ddim", SDXL)
    n = 10
    x_T = _x_T(2)
    noises = np.random.default_rng(3).standard_normal((n,) + SHAPE).astype(np.float32)
    err = loop_error(torch_loop(theirs, n, x_T, eta=0.7, noises=noises), jax_loop(ours, n, x_T, eta=0.7, noises=noises))
    assert err <= REL_TOL, err


def test_ddim_eta_with_key_runs_in_jit():
    sched = DDIMScheduler.from_config(SDXL)
    state = sched.set_timesteps(6)

    @jax.jit
    def run(x, key):
        def body(i, c):
            x, carry = c
            return sched.step(state, 0.1 * x, i, x, carry, eta=1.0)

        return jax.lax.fori_loop(0, 6, body, (x, sched.init_carry(state, x, key=key)))

    x = jnp.asarray(_x_T())
    a, ca = run(x, jax.random.key(0))
    b, _ = run(x, jax.random.key(1))
    assert np.isfinite(np.asarray(a)).all() and not np.allclose(a, b)
    assert not np.array_equal(jax.random.key_data(ca.key), jax.random.key_data(jax.random.key(0)))
    with pytest.raises(ValueError, match="carry.key"):
        jax.eval_shape(lambda x: sched.step(state, x, 0, x, sched.init_carry(state, x), eta=0.5), x)


def test_mismatch_is_detected():
    """The parity check has teeth: a wrong option gives an error far above the tolerance."""
    x_T = _x_T(4)
    for name, good, bad, n in [
        ("ddim", SDXL, dict(SDXL, set_alpha_to_one=True), 30),
        ("dpmpp_2m", SDXL, dict(SDXL, lower_order_final=False, final_sigmas_type="sigma_min"), 5),
        ("euler", SDXL, dict(SDXL, steps_offset=0), 25),
    ]:
        ref = torch_loop(PAIRS[name][1].from_config(good), n, x_T)
        err = loop_error(ref, jax_loop(PAIRS[name][0].from_config(bad), n, x_T))
        assert err > 100 * REL_TOL, (name, err)


# ------------------------------------------------------------------------------------------------ model input
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_euler_scale_model_input(cfg_name):
    ours, theirs = _pair("euler", CONFIGS[cfg_name])
    state = ours.set_timesteps(25)
    theirs.set_timesteps(25)
    x = _x_T(5) * 10
    f = jax.jit(ours.scale_model_input)
    for i, t in enumerate(theirs.timesteps):
        theirs._step_index = i
        ref = theirs.scale_model_input(torch.from_numpy(x), t).numpy()
        np.testing.assert_allclose(np.asarray(f(state, jnp.asarray(x), i)), ref, rtol=1e-6, atol=1e-6)


def test_identity_scale_and_dtype():
    x = jnp.asarray(_x_T()).astype(jnp.bfloat16)
    for name in ("ddim", "dpmpp_2m"):
        s = get_scheduler(name)
        st = s.set_timesteps(4)
        assert s.scale_model_input(st, x, 0) is x
        y = jax.eval_shape(lambda x: s.step(st, 0.1 * x, 0, x, s.init_carry(st, x))[0], x)
        assert y.dtype == jnp.bfloat16 and y.shape == x.shape


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_ddpm_add_noise_and_velocity(cfg_name):
    cfg = CONFIGS[cfg_name]
    ours, theirs = DDPMScheduler.from_config(cfg), diffusers.DDPMScheduler.from_config(cfg)
    rng = np.random.default_rng(6)
    x0 = rng.standard_normal((8, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = rng.integers(0, 1000, 8)
    t[0], t[1] = 0, 999
    tt = torch.from_numpy(t)
    ref_n = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    ref_v = theirs.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    args = (jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t, jnp.int32))
    np.testing.assert_allclose(np.asarray(jax.jit(ours.add_noise)(*args)), ref_n, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(ours.get_velocity)(*args)), ref_v, rtol=1e-6, atol=1e-6)
    tgt = ours.training_target(*args)
    want = noise if cfg["prediction_type"] == "epsilon" else ref_v
    np.testing.assert_allclose(np.asarray(tgt), want, rtol=1e-6, atol=1e-6)
    ts = ours.sample_timesteps(jax.random.key(0), 64)
    assert ts.dtype == jnp.int32 and int(ts.min()) >= 0 and int(ts.max()) < 1000
    snr = np.asarray(ours.snr(args[2]))
    ac = theirs.alphas_cumprod.numpy()[t]
    np.testing.assert_allclose(snr, ac / (1 - ac), rtol=1e-5)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "ddim"])
def test_sampler_add_noise_matches(name):
    ours, theirs = _pair(name, SDXL)
    state = ours.set_timesteps(25)
    theirs.set_timesteps(25)
    rng = np.random.default_rng(7)
    x0 = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t_ref = theirs.timesteps[[0, 3, 10, 24]]
    ref = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t_ref).numpy()
    t = jnp.asarray(t_ref.numpy())
    got = ours.add_noise(jnp.asarray(x0), jnp.asarray(noise), t)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    if name != "ddim":
        got = ours.add_noise(jnp.asarray(x0), jnp.asarray(noise), t, state=state)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ config
def test_from_pretrained_and_config(tmp_path):
    root = tmp_path / "model"
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SDXL, "some_future_key": 3}))
    for cls in (DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, DDPMScheduler):
        a = cls.from_pretrained(root)
        b = cls.from_pretrained(root / "scheduler")
        c = cls.from_pretrained(root / "scheduler" / "scheduler_config.json")
        assert a == b == c and hash(a) == hash(b)
        assert a.beta_schedule == "scaled_linear" and a.steps_offset == 1 and a.timestep_spacing == "leading"
        assert a.config["num_train_timesteps"] == 1000
    assert DDIMScheduler.from_pretrained(root).set_alpha_to_one is False
    assert DDIMScheduler.from_config({}).clip_sample is False  # deliberate: diffusers defaults to True
    assert DDIMScheduler.from_config(SDXL, prediction_type="v_prediction").prediction_type == "v_prediction"
    with pytest.raises(FileNotFoundError):
        DDIMScheduler.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError):
        DDIMScheduler.from_config(prediction_type="flow")
    with pytest.raises(NotImplementedError):
        DDIMScheduler.from_config(beta_schedule="sigmoid")
    assert set(SCHEDULERS) == {"ddim", "euler", "dpmpp_2m"}
    assert isinstance(get_scheduler("euler"), EulerDiscreteScheduler)
    with pytest.raises(ValueError):
        get_scheduler("pndm")


def test_state_is_pytree_and_no_retrace():
    sched = get_scheduler("dpmpp_2m")
    traces = []

    @jax.jit
    def f(state, x):
        traces.append(1)
        return sched.step(state, x, 3, x, sched.init_carry(state, x))[0]

    x = jnp.ones(SHAPE)
    s1, s2 = sched.set_timesteps(10), sched.set_timesteps(10)
    f(s1, x), f(s2, x)
    assert len(traces) == 1
    assert len(jax.tree.leaves(s1)) == 3
