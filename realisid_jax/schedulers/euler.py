"""Euler sampler of the probability-flow ODE in sigma space (Karras et al. 2022, "Elucidating the Design
Space...", Alg. 2 with ``S_churn = 0``), mirroring ``diffusers.EulerDiscreteScheduler`` (0.42.1)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .common import (
    NoiseSchedule,
    SchedulerState,
    _expand_like,
    karras_sigmas,
    sigma_to_t,
    train_sigmas,
)

_PRED = ("epsilon", "v_prediction", "sample", "original_sample")


@struct.dataclass
class EulerState(SchedulerState):
    """Euler per-run state (pytree, static shapes).

    Attributes:
        timesteps: ``(N,)`` float32, descending (fractional for ``linspace`` spacing or Karras sigmas).
        init_noise_sigma: ``()`` float32: ``sigma_max`` (linspace / trailing) or ``sqrt(sigma_max^2 + 1)``
            (leading), as diffusers. About 14.6 for SDXL.
        sigmas: ``(N + 1,)`` float32, descending, ``sigmas[N]`` = 0 (or sigma_min with
            ``final_sigmas_type="sigma_min"``).
    """

    sigmas: jax.Array


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler(NoiseSchedule):
    """Deterministic Euler: ``x_{i+1} = x_i + (x_i - x0_hat) / sigma_i * (sigma_{i+1} - sigma_i)`` in the
    variance-exploding parametrisation ``x = x0 + sigma * eps`` (the model sees ``x / sqrt(sigma^2 + 1)``,
    see :meth:`scale_model_input`).

    Mirrors ``diffusers.EulerDiscreteScheduler`` with diffusers' defaults (``timestep_spacing="linspace"``).
    Supported: ``interpolation_type="linear"``, ``use_karras_sigmas``, ``final_sigmas_type``
    zero/sigma_min, ``sigma_min``/``sigma_max`` overrides (Karras). Not supported: ``s_churn`` > 0,
    ``log_linear`` interpolation, exponential/beta sigmas, ``timestep_type="continuous"``.
    """

    timestep_spacing: str = "linspace"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"

    diffusers_class: ClassVar[str] = "EulerDiscreteScheduler"
    _prediction_types: ClassVar[tuple[str, ...]] = _PRED
    order: ClassVar[int] = 1

    def __post_init__(self):
        super().__post_init__()
        if self.interpolation_type != "linear":
            raise NotImplementedError(f"interpolation_type {self.interpolation_type!r}")
        if self.use_exponential_sigmas or self.use_beta_sigmas:
            raise NotImplementedError("exponential / beta sigmas")
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            raise NotImplementedError("timestep_type='continuous' with v_prediction")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type {self.final_sigmas_type!r}")
        ac = self.alphas_cumprod.copy()
        if self.rescale_betas_zero_snr:
            ac[-1] = np.float32(2.0**-24)  # diffusers: avoid an infinite first sigma
        ac.setflags(write=False)
        object.__setattr__(self, "alphas_cumprod", ac)

    # ---------------------------------------------------------------- host side
    def set_timesteps(self, num_inference_steps: int) -> EulerState:
        """Timesteps and sigmas for ``num_inference_steps`` steps (``EulerDiscreteScheduler.set_timesteps``)."""
        n, T = num_inference_steps, self.num_train_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps={n} must be in [1, {T}]")
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        elif self.timestep_spacing == "leading":
            ratio = T // n
            ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32) + self.steps_offset
        else:  # trailing
            ratio = T / n
            ts = np.arange(T, 0, -ratio).round().astype(np.float32) - 1
        base = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(base)
        sigmas = np.interp(ts, np.arange(0, len(base)), base)
        if self.use_karras_sigmas:
            smin = self.sigma_min if self.sigma_min is not None else float(sigmas[-1])
            smax = self.sigma_max if self.sigma_max is not None else float(sigmas[0])
            sigmas = karras_sigmas(smin, smax, n)
            ts = sigma_to_t(sigmas, log_sigmas)
        last = base[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        smax = sigmas.max()
        if self.timestep_spacing in ("linspace", "trailing"):
            init = smax
        else:
            init = (smax**2 + np.float32(1.0)) ** np.float32(0.5)
        return EulerState(
            timesteps=jnp.asarray(ts.astype(np.float32)),
            init_noise_sigma=jnp.asarray(init, jnp.float32),
            sigmas=jnp.asarray(sigmas),
        )

    # ---------------------------------------------------------------- device side
    def init_carry(self, state: EulerState, sample: jax.Array, key=None) -> tuple:
        """Euler is single-step: the carry is an empty tuple."""
        return ()

    def scale_model_input(self, state: EulerState, sample: jax.Array, i) -> jax.Array:
        """``sample / sqrt(sigmas[i]^2 + 1)``: the VP-scaled input the denoiser was trained on. Same dtype."""
        sigma = state.sigmas[i]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(sample.dtype)

    def step(
        self, state: EulerState, model_output: jax.Array, i, sample: jax.Array, carry=()
    ) -> tuple[jax.Array, tuple]:
        """One Euler step from ``sigmas[i]`` to ``sigmas[i + 1]``.

        Args:
            model_output: ``(B, ...)`` prediction on the *scaled* input (epsilon / v / x0).
            i: python int or traced int32 step index in ``[0, N)``.
            sample: ``(B, ...)`` current (unscaled) sample; result has its dtype, maths in float32.
        """
        x = sample.astype(jnp.float32)
        m = model_output.astype(jnp.float32)
        sigma = state.sigmas[i]
        if self.prediction_type in ("sample", "original_sample"):
            x0 = m
        elif self.prediction_type == "epsilon":
            x0 = x - sigma * m
        else:  # v_prediction
            x0 = m * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
        derivative = (x - x0) / sigma
        dt = state.sigmas[i + 1] - sigma
        prev = x + derivative * dt
        return prev.astype(sample.dtype), carry

    def add_noise(self, original_samples, noise, timesteps, state: EulerState | None = None):
        """Variance-exploding forward process ``x0 + sigma * noise``.

        Without ``state``: ``sigma = sqrt((1 - abar_t) / abar_t)`` at integer training ``timesteps`` (equal to
        diffusers' value for any timestep in a non-Karras schedule). With ``state``: ``timesteps`` must be
        values of ``state.timesteps``; sigma is looked up at the first matching step (diffusers'
        ``index_for_timestep``, which takes the second match for duplicates; none arise without Karras).
        """
        dtype = original_samples.dtype
        timesteps = jnp.asarray(timesteps)
        if state is None:
            sig = jnp.asarray(train_sigmas(self.alphas_cumprod))[timesteps.astype(jnp.int32)]
        else:
            idx = jnp.argmax(state.timesteps[None, :] == timesteps.reshape(-1, 1).astype(state.timesteps.dtype), axis=1)
            sig = state.sigmas[idx]
        return (original_samples + noise * _expand_like(sig.astype(dtype), original_samples)).astype(dtype)
