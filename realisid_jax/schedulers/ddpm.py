"""DDPM noise schedule for training (mirrors ``diffusers.DDPMScheduler``'s schedule, ``add_noise`` and
``get_velocity``; Ho et al. 2020, Eq. 4 for the forward process)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from .common import NoiseSchedule


@dataclasses.dataclass(frozen=True)
class DDPMScheduler(NoiseSchedule):
    """Training-side noise schedule.

    Host attributes: ``betas``, ``alphas``, ``alphas_cumprod`` (NumPy float32, ``(num_train_timesteps,)``).
    Device functions (jittable, from :class:`NoiseSchedule`): ``add_noise(x0, noise, t)``,
    ``get_velocity(x0, noise, t)``, ``training_target(x0, noise, t)``, ``snr(t)``,
    ``sample_timesteps(key, batch)``.

    Typical use in a train step::

        sched = DDPMScheduler.from_pretrained(model_root)          # SDXL: scaled_linear 0.00085..0.012
        t = sched.sample_timesteps(key, latents.shape[0])           # (B,) int32
        noisy = sched.add_noise(latents, noise, t)
        loss = mse(unet(noisy, t, ...), sched.training_target(latents, noise, t))

    Sampling with DDPM's ancestral step is not implemented (use DDIM / Euler / DPM-Solver++).
    Options of diffusers' DDPMScheduler that only matter for its ``step`` (``variance_type``,
    ``clip_sample``, ``thresholding``, ...) are accepted and stored but unused.
    """

    variance_type: str = "fixed_small"
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    diffusers_class: ClassVar[str] = "DDPMScheduler"
