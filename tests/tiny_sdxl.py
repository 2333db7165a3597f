"""A tiny random diffusers SDXL pipeline (the architectures of ``configs/sdxl.py:tiny``) saved in diffusers format,
with the real 49,408-entry CLIP tokenizer and a separate CLIP vision folder. Shared by the loader and the
pipeline tests."""

from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

from realisid_jax.config import load_config
from realisid_jax.text.tokenizer import offline_clip_tokenizer

TINY = load_config("configs/sdxl.py:tiny").model


def randomised(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter perturbed (zero-initialised ones too), so parity tests can fail."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


def _text_encoder(cls, section: str) -> torch.nn.Module:
    return randomised(cls(transformers.CLIPTextConfig(**TINY[section].to_dict())))


def build_tiny_sdxl(root: Path):
    """Writes ``root/pipeline`` and ``root/image_encoder``; returns (pipeline folder, encoder folder, torch
    pipeline, torch image encoder)."""
    torch.manual_seed(0)
    tokenizer = offline_clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=randomised(AutoencoderKL(**TINY.vae.to_dict())),
        text_encoder=_text_encoder(transformers.CLIPTextModel, "text_encoder"),
        text_encoder_2=_text_encoder(transformers.CLIPTextModelWithProjection, "text_encoder_2"),
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=randomised(UNet2DConditionModel(**TINY.unet.to_dict())),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"))
    pipe.save_pretrained(root / "pipeline")
    image_encoder = randomised(transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**TINY.image_encoder.to_dict())))
    image_encoder.save_pretrained(root / "image_encoder")
    return root / "pipeline", root / "image_encoder", pipe, image_encoder
