"""Shared pieces of the JAX schedulers: configuration, noise schedules, timestep spacing, the state base.

Design
------
A scheduler object is an immutable, hashable *configuration* (a frozen dataclass) that also holds the
training noise schedule as host-side NumPy arrays (``betas``, ``alphas``, ``alphas_cumprod``, all
``float32`` of shape ``(num_train_timesteps,)``). It is safe to close over in a ``jax.jit`` function or
to pass as a static argument.

Everything that depends on the number of inference steps lives in a :class:`SchedulerState`, a pytree
of device arrays returned by ``scheduler.set_timesteps(n)`` on the host. The device-side functions
(``scale_model_input``, ``step``, ``add_noise``, ...) are pure and take a (possibly traced) integer step
index ``i`` into the state's arrays, so a whole denoising loop can run inside one ``jax.jit`` with
``lax.fori_loop``.

Host-side arithmetic mirrors what diffusers 0.42.1 does in PyTorch ``float32`` closely enough to be
bit-identical for ``betas`` / ``alphas_cumprod`` (``torch.linspace`` is an FMA-style
``start + step * i`` from both ends, and CPU ``torch.cumprod`` accumulates in ``float64``); a few
values derived with ``torch.sqrt`` / ``** 0.5`` may differ from the correctly rounded NumPy result in
the last bit.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

logger = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

#: ``stabilityai/stable-diffusion-xl-base-1.0`` ``scheduler/scheduler_config.json`` (its diffusers class
#: there is ``EulerDiscreteScheduler``; every scheduler here accepts it).
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


# --------------------------------------------------------------------------------------------------
# Host-side noise schedule (NumPy, float32 results)
# --------------------------------------------------------------------------------------------------
def torch_like_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` reproduced bit-exactly in NumPy.

    PyTorch's CPU kernel casts ``start``/``end`` to float32, computes ``step = (end - start) / (steps - 1)``
    in float32 and fills the first half as ``start + step * i`` and the second half as
    ``end - step * (steps - 1 - i)`` (a fused multiply-add, emulated here in float64).
    """
    if steps == 1:
        return np.array([start], dtype=np.float32)
    fa, fb = np.float32(start), np.float32(end)
    step = np.float64((fb - fa) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    half = steps // 2
    lo = np.float64(fa) + step * idx
    hi = np.float64(fb) - step * (steps - 1 - idx)
    return np.where(idx < half, lo, hi).astype(np.float32)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide cosine schedule (``squaredcos_cap_v2``): ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)``
    with ``abar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2`` (Nichol & Dhariwal 2021, Eq. 17). float32 ``(T,)``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), max_beta)
        for i in range(num_diffusion_timesteps)
    ]
    return np.asarray(betas, dtype=np.float32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """Cumulative product accumulated in float64 and rounded to float32 (what CPU ``torch.cumprod`` does)."""
    return np.cumprod(np.asarray(x, np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale ``betas`` so that the terminal SNR is exactly zero (Lin et al. 2023, arXiv 2305.08891, Alg. 1).

    ``sqrt(abar)`` is shifted so its last value is 0 and scaled so its first value is unchanged. float32 ``(T,)``.
    """
    alphas = np.float32(1.0) - betas.astype(np.float32)
    abar_sqrt = np.sqrt(cumprod_f32(alphas))
    a0, a_t = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = abar_sqrt - a_t
    abar_sqrt = abar_sqrt * (a0 / (a0 - a_t))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """The training ``betas`` (float32, ``(num_train_timesteps,)``, values in (0, 1)) as diffusers builds them."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
    elif beta_schedule == "linear":
        betas = torch_like_linspace(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        betas = torch_like_linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    else:
        raise NotImplementedError(f"beta_schedule {beta_schedule!r}; supported: {BETA_SCHEDULES}")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas.astype(np.float32)


def spaced_timesteps(
    spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0
) -> np.ndarray:
    """Integer inference timesteps, descending, ``(num_inference_steps,)`` int64 (Lin et al. 2023, Table 2).

    ``leading``: ``arange(n) * (T // n) + steps_offset``; ``trailing``: ``round(arange(T, 0, -T/n)) - 1``;
    ``linspace``: ``round(linspace(0, T - 1, n))``. Exactly DDIMScheduler.set_timesteps.
    """
    if num_inference_steps > num_train_timesteps or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, {num_train_timesteps}]")
    if spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ratio = num_train_timesteps // num_inference_steps
        ts = (np.arange(0, num_inference_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_inference_steps
        ts = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r}; supported: {TIMESTEP_SPACINGS}")
    return np.ascontiguousarray(ts)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Karras-style sigmas of the training schedule, ``sqrt((1 - abar) / abar)``, float32 ``(T,)``, ascending in t."""
    ac = alphas_cumprod.astype(np.float32)
    return np.sqrt((np.float32(1.0) - ac) / ac).astype(np.float32)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Map sigmas back to fractional training timesteps by linear interpolation in log-sigma (vectorised
    ``_sigma_to_t`` of diffusers). ``sigma``: any shape (float64); ``log_sigmas``: ``(T,)``."""
    sigma = np.asarray(sigma, np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma.reshape(1, -1) - log_sigmas[:, None]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma.reshape(-1)) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM) Eq. 5: ``(smax^(1/rho) + ramp (smin^(1/rho) - smax^(1/rho)))^rho``, float64 ``(n,)``."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


# --------------------------------------------------------------------------------------------------
# Device-side helpers
# --------------------------------------------------------------------------------------------------
def _expand_like(v: jax.Array, x: jax.Array) -> jax.Array:
    """Flatten a per-example coefficient and append singleton axes so it broadcasts over ``x`` (batch first)."""
    v = jnp.reshape(v, (-1,))
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - 1))


@struct.dataclass
class SchedulerState:
    """Base of every scheduler state (a pytree of device arrays, static shapes).

    Attributes:
        timesteps: ``(N,)`` the model's timestep input at each step, descending. int32 for DDIM /
            DPM-Solver, float32 for Euler (fractional with ``linspace`` spacing or Karras sigmas).
        init_noise_sigma: ``()`` float32, standard deviation of the initial latent noise
            (``latents = randn * init_noise_sigma``).
    """

    timesteps: jax.Array
    init_noise_sigma: jax.Array

    @property
    def num_inference_steps(self) -> int:
        return self.timesteps.shape[0]


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """Frozen configuration + the training noise schedule (VP: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``).

    Subclasses are the concrete schedulers. Field names are diffusers' ``scheduler_config.json`` keys.

    Attributes (host NumPy, float32, ``(num_train_timesteps,)``): ``betas``, ``alphas = 1 - betas``,
    ``alphas_cumprod`` (abar_t, descending from ~1 to ~0).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    #: diffusers class this one mirrors (informational).
    diffusers_class: ClassVar[str] = ""
    #: prediction types the scheduler supports.
    _prediction_types: ClassVar[tuple[str, ...]] = PREDICTION_TYPES

    # ---------------------------------------------------------------- construction
    def __post_init__(self):
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        if self.prediction_type not in self._prediction_types:
            raise ValueError(
                f"{type(self).__name__}: prediction_type {self.prediction_type!r} not in {self._prediction_types}"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} not in {TIMESTEP_SPACINGS}")
        betas = make_betas(
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
            self.beta_schedule,
            self.trained_betas,
            self.rescale_betas_zero_snr,
        )
        alphas = (np.float32(1.0) - betas).astype(np.float32)
        alphas_cumprod = cumprod_f32(alphas)
        for name, arr in (("betas", betas), ("alphas", alphas), ("alphas_cumprod", alphas_cumprod)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @classmethod
    def config_keys(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides):
        """Build from a diffusers ``scheduler_config.json`` dict (any scheduler class's). Unknown keys
        (``_class_name``, ``skip_prk_steps``, ...) are ignored; missing keys take this class's defaults;
        ``overrides`` win over ``config``. A JSON ``null`` for a boolean option means ``False``."""
        merged = dict(config or {})
        merged.update(overrides)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs, ignored = {}, []
        for k, v in merged.items():
            if k not in fields:
                ignored.append(k)
                continue
            if v is None and isinstance(fields[k].default, bool):
                v = False
            kwargs[k] = v
        if ignored:
            logger.debug("%s.from_config: ignoring keys %s", cls.__name__, sorted(ignored))
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **overrides):
        """Read ``scheduler_config.json`` from ``path`` (a JSON file, a folder holding one, or a model root
        with a ``scheduler/`` sub-folder) and call :meth:`from_config`."""
        path = os.fspath(path)
        if subfolder:
            path = os.path.join(path, subfolder)
        candidates = (
            [path]
            if os.path.isfile(path)
            else [os.path.join(path, "scheduler_config.json"), os.path.join(path, "scheduler", "scheduler_config.json")]
        )
        for c in candidates:
            if os.path.isfile(c):
                with open(c) as f:
                    return cls.from_config(json.load(f), **overrides)
        raise FileNotFoundError(f"no scheduler_config.json at {candidates}")

    @property
    def config(self) -> dict[str, Any]:
        """The configuration as a plain dict (diffusers key names)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __len__(self) -> int:
        return self.num_train_timesteps

    # ---------------------------------------------------------------- training-side, device functions
    def add_noise(self, original_samples: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """Forward process ``q(x_t | x_0)``: ``sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise`` (Ho et al. 2020, Eq. 4).

        Args:
            original_samples: ``(B, ...)`` clean samples (any float dtype; the result has that dtype).
            noise: same shape, standard normal.
            timesteps: ``(B,)`` or scalar integer training timesteps in ``[0, num_train_timesteps)``.
        """
        dtype = original_samples.dtype
        ac = jnp.asarray(self.alphas_cumprod).astype(dtype)[jnp.asarray(timesteps).astype(jnp.int32)]
        sqrt_a = _expand_like(ac**0.5, original_samples)
        sqrt_1ma = _expand_like((1 - ac) ** 0.5, original_samples)
        return (sqrt_a * original_samples + sqrt_1ma * noise).astype(dtype)

    def get_velocity(self, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """v-prediction target ``v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0`` (Salimans & Ho 2022, Sec. 4;
        Imagen Video Sec. 2.4). ``sample`` is the *clean* x0, ``(B, ...)``; ``timesteps`` ``(B,)`` int."""
        dtype = sample.dtype
        ac = jnp.asarray(self.alphas_cumprod).astype(dtype)[jnp.asarray(timesteps).astype(jnp.int32)]
        sqrt_a = _expand_like(ac**0.5, sample)
        sqrt_1ma = _expand_like((1 - ac) ** 0.5, sample)
        return (sqrt_a * noise - sqrt_1ma * sample).astype(dtype)

    def snr(self, timesteps: jax.Array) -> jax.Array:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` at integer ``timesteps`` (float32, same shape),
        e.g. for min-SNR loss weighting."""
        ac = jnp.asarray(self.alphas_cumprod)[jnp.asarray(timesteps).astype(jnp.int32)]
        return ac / (1.0 - ac)

    def training_target(self, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """What the denoiser should output for this ``prediction_type``: ``noise`` (epsilon), the velocity
        (v_prediction) or ``sample`` (sample)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.get_velocity(sample, noise, timesteps)
        return sample

    def sample_timesteps(self, key: jax.Array, batch_size: int) -> jax.Array:
        """Uniform training timesteps ``(batch_size,)`` int32 in ``[0, num_train_timesteps)``."""
        return jax.random.randint(key, (batch_size,), 0, self.num_train_timesteps, dtype=jnp.int32)
