"""Functional, jit-friendly diffusion schedulers matching diffusers 0.42.1.

A scheduler is a frozen (hashable) config object; ``set_timesteps(n)`` returns a :class:`SchedulerState`
pytree; ``scale_model_input`` / ``step`` / ``init_carry`` / ``add_noise`` are pure and take a traced step
index, so the whole sampling loop fits in one ``jax.jit``::

    sched = SCHEDULERS["dpmpp_2m"].from_pretrained(model_root)   # or .from_config(SDXL_SCHEDULER_CONFIG)
    state = sched.set_timesteps(20)

    @jax.jit
    def sample(state, x_T):
        x = x_T * state.init_noise_sigma
        def body(i, c):
            x, carry = c
            out = denoise(sched.scale_model_input(state, x, i), state.timesteps[i])
            return sched.step(state, out, i, x, carry)
        return jax.lax.fori_loop(0, state.num_inference_steps, body, (x, sched.init_carry(state, x)))[0]
"""
from .common import SDXL_SCHEDULER_CONFIG, NoiseSchedule, SchedulerState
from .ddim import DDIMCarry, DDIMScheduler, DDIMState
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverCarry, DPMSolverMultistepScheduler, DPMSolverState
from .euler import EulerDiscreteScheduler, EulerState

#: Sampler name -> class (``--scheduler`` / config values).
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}


def get_scheduler(name: str, config=None, **overrides):
    """``SCHEDULERS[name].from_config(config or SDXL_SCHEDULER_CONFIG, **overrides)``."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}") from None
    return cls.from_config(SDXL_SCHEDULER_CONFIG if config is None else config, **overrides)


__all__ = [
    "SCHEDULERS",
    "SDXL_SCHEDULER_CONFIG",
    "DDIMCarry",
    "DDIMScheduler",
    "DDIMState",
    "DDPMScheduler",
    "DPMSolverCarry",
    "DPMSolverMultistepScheduler",
    "DPMSolverState",
    "EulerDiscreteScheduler",
    "EulerState",
    "NoiseSchedule",
    "SchedulerState",
    "get_scheduler",
]
