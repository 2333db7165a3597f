"""DPM-Solver++ multistep sampler (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", arXiv 2211.01095, Alg. 2 = multistep 2M), mirroring
``diffusers.DPMSolverMultistepScheduler`` (0.42.1) with ``algorithm_type="dpmsolver++"``."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .common import NoiseSchedule, SchedulerState, _expand_like, karras_sigmas, sigma_to_t, train_sigmas


@struct.dataclass
class DPMSolverState(SchedulerState):
    """DPM-Solver++ per-run state (pytree, static shapes).

    Attributes:
        timesteps: ``(N,)`` int32, descending.
        init_noise_sigma: ``()`` float32, 1.
        sigmas: ``(N + 1,)`` float32, descending; ``sigmas[N]`` = 0 (``final_sigmas_type="zero"``) or sigma_min.
            With ``alpha = 1 / sqrt(sigma^2 + 1)``, ``sigma_t = sigma * alpha`` and
            ``lambda = log(alpha) - log(sigma_t)`` (the half log-SNR of the paper).
    """

    sigmas: jax.Array


@struct.dataclass
class DPMSolverCarry:
    """Multistep history.

    Attributes:
        prev_x0: ``(B, ...)`` float32, the data prediction ``x0_hat`` of the previous step (D_{i-1} in Alg. 2).
        n_prev: ``()`` int32, how many previous outputs are stored (0 at the first step, capped at the order).
    """

    prev_x0: jax.Array
    n_prev: jax.Array


def _alpha_sigma(sigma):
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler(NoiseSchedule):
    """DPM-Solver++(2M), data-prediction form. With ``h = lambda_t - lambda_s0`` and ``r0 = h_0 / h``:

    * first order (= DDIM): ``x_t = (sigma_t/sigma_s0) x - alpha_t (e^{-h} - 1) D0``
    * second order, midpoint: ``... - 0.5 alpha_t (e^{-h} - 1) D1`` with ``D1 = (D0 - D_prev) / r0``
      (heun: ``+ alpha_t ((e^{-h} - 1)/h + 1) D1``).

    The first step is first order (no history); the last step is first order when
    ``final_sigmas_type == "zero"`` (the default), ``euler_at_final``, or ``lower_order_final`` and
    N < 15 — exactly diffusers' rule. Defaults are diffusers' (``timestep_spacing="linspace"``).

    Supported: ``algorithm_type="dpmsolver++"``, ``solver_order`` 1 or 2, ``solver_type`` midpoint/heun,
    ``use_karras_sigmas``, ``final_sigmas_type``, ``lambda_min_clipped``. Not supported: SDE variants,
    ``dpmsolver`` (noise-prediction) form, order 3, thresholding, Lu / exponential / beta / flow sigmas.
    """

    timestep_spacing: str = "linspace"
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    thresholding: bool = False

    diffusers_class: ClassVar[str] = "DPMSolverMultistepScheduler"

    def __post_init__(self):
        super().__post_init__()
        if self.algorithm_type == "deis":  # diffusers maps this alias too
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        if self.algorithm_type != "dpmsolver++":
            raise NotImplementedError(f"algorithm_type {self.algorithm_type!r} (only 'dpmsolver++')")
        if self.solver_order not in (1, 2):
            raise NotImplementedError(f"solver_order {self.solver_order} (only 1 or 2)")
        if self.solver_type not in ("midpoint", "heun"):
            raise NotImplementedError(f"solver_type {self.solver_type!r}")
        if self.thresholding or self.variance_type in ("learned", "learned_range"):
            raise NotImplementedError("thresholding / learned variance")
        if self.use_exponential_sigmas or self.use_beta_sigmas or self.use_lu_lambdas or self.use_flow_sigmas:
            raise NotImplementedError("only default or Karras sigmas")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type {self.final_sigmas_type!r}")
        ac = self.alphas_cumprod.copy()
        if self.rescale_betas_zero_snr:
            ac[-1] = np.float32(2.0**-24)
        ac.setflags(write=False)
        object.__setattr__(self, "alphas_cumprod", ac)

    @property
    def order(self) -> int:
        return self.solver_order

    # ---------------------------------------------------------------- host side
    def set_timesteps(self, num_inference_steps: int) -> DPMSolverState:
        """Timesteps and sigmas for ``num_inference_steps`` steps (``DPMSolverMultistepScheduler.set_timesteps``)."""
        n, T = num_inference_steps, self.num_train_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps={n} must be in [1, {T}]")
        ac = self.alphas_cumprod
        lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
        clipped_idx = int(np.searchsorted(lambda_t[::-1], self.lambda_min_clipped))
        last_t = T - clipped_idx
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, last_t - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            ratio = last_t // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + self.steps_offset
        else:  # trailing
            ratio = T / n
            ts = np.arange(last_t, 0, -ratio).round().astype(np.int64) - 1
        base = train_sigmas(ac)
        log_sigmas = np.log(base)
        if self.use_karras_sigmas:
            flipped = base[::-1]
            sigmas = karras_sigmas(float(flipped[-1]), float(flipped[0]), n)
            ts = sigma_to_t(sigmas, log_sigmas)
            if self.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(0, len(base)), base)
        last = base[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return DPMSolverState(
            timesteps=jnp.asarray(ts.astype(np.int64), jnp.int32),
            init_noise_sigma=jnp.asarray(1.0, jnp.float32),
            sigmas=jnp.asarray(sigmas),
        )

    # ---------------------------------------------------------------- device side
    def init_carry(self, state: DPMSolverState, sample: jax.Array, key=None) -> DPMSolverCarry:
        """Empty history: zeros like ``sample`` (float32) and ``n_prev = 0``."""
        return DPMSolverCarry(prev_x0=jnp.zeros(sample.shape, jnp.float32), n_prev=jnp.zeros((), jnp.int32))

    def scale_model_input(self, state: DPMSolverState, sample: jax.Array, i=None) -> jax.Array:
        """Identity (the state is in VP form)."""
        return sample

    def convert_model_output(self, state: DPMSolverState, model_output: jax.Array, i, sample: jax.Array) -> jax.Array:
        """Data prediction ``x0_hat`` (float32) from an epsilon / v / x0 model output at step ``i``."""
        m = model_output.astype(jnp.float32)
        x = sample.astype(jnp.float32)
        if self.prediction_type == "sample":
            return m
        alpha_t, sigma_t = _alpha_sigma(state.sigmas[i])
        if self.prediction_type == "epsilon":
            return (x - sigma_t * m) / alpha_t
        return alpha_t * x - sigma_t * m  # v_prediction

    def step(
        self, state: DPMSolverState, model_output: jax.Array, i, sample: jax.Array, carry: DPMSolverCarry
    ) -> tuple[jax.Array, DPMSolverCarry]:
        """One DPM-Solver++ step from ``sigmas[i]`` to ``sigmas[i + 1]``.

        Args:
            model_output: ``(B, ...)`` model prediction at ``timesteps[i]``.
            i: python int or traced int32 step index in ``[0, N)``.
            sample: ``(B, ...)`` current sample; the result has its dtype (maths in float32; diffusers
                returns ``model_output``'s dtype, the same thing whenever latents and model output agree).
            carry: :class:`DPMSolverCarry` from :meth:`init_carry` or the previous step.

        Returns:
            ``(prev_sample, new_carry)``.
        """
        n = state.timesteps.shape[0]
        i = jnp.asarray(i, jnp.int32)
        x = sample.astype(jnp.float32)
        x0 = self.convert_model_output(state, model_output, i, sample)

        alpha_t, sigma_t = _alpha_sigma(state.sigmas[i + 1])
        alpha_s0, sigma_s0 = _alpha_sigma(state.sigmas[i])
        alpha_s1, sigma_s1 = _alpha_sigma(state.sigmas[jnp.maximum(i - 1, 0)])
        lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
        lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
        lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
        h = lambda_t - lambda_s0
        h_0 = lambda_s0 - lambda_s1
        r0 = h_0 / h
        em1 = jnp.exp(-h) - 1.0

        first_at_last = self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"
        use_first = carry.n_prev < 1
        if self.solver_order == 1:
            use_first = jnp.asarray(True)
        elif first_at_last:
            use_first = use_first | (i == n - 1)

        # x_t = c_x * x - c_0 * D0 + c_1 * (D0 - D_prev); the D1 coefficient is 0 on first-order steps (and any
        # inf/nan of an unused second-order coefficient, e.g. h = inf at sigma = 0, is discarded by the where).
        if self.solver_type == "midpoint":
            c_1 = -0.5 * (alpha_t * em1) * (1.0 / r0)
        else:  # heun
            c_1 = (alpha_t * (em1 / h + 1.0)) * (1.0 / r0)
        c_1 = jnp.where(use_first, 0.0, c_1)
        c_x = sigma_t / sigma_s0
        c_0 = alpha_t * em1
        prev = c_x * x - c_0 * x0 + c_1 * (x0 - carry.prev_x0)

        new_carry = DPMSolverCarry(prev_x0=x0, n_prev=jnp.minimum(carry.n_prev + 1, self.solver_order))
        return prev.astype(sample.dtype), new_carry

    def add_noise(self, original_samples, noise, timesteps, state: DPMSolverState | None = None):
        """VP forward process. Without ``state`` identical to :meth:`NoiseSchedule.add_noise`; with ``state``
        (``timesteps`` taken from ``state.timesteps``), uses ``alpha, sigma`` from ``state.sigmas`` as diffusers."""
        if state is None:
            return super().add_noise(original_samples, noise, timesteps)
        dtype = original_samples.dtype
        timesteps = jnp.asarray(timesteps).reshape(-1, 1).astype(state.timesteps.dtype)
        idx = jnp.argmax(state.timesteps[None, :] == timesteps, axis=1)
        alpha_t, sigma_t = _alpha_sigma(state.sigmas[idx].astype(dtype))
        out = _expand_like(alpha_t, original_samples) * original_samples + _expand_like(sigma_t, original_samples) * noise
        return out.astype(dtype)
