"""Stable Diffusion 1.5 as a smaller base (one text encoder, 768-wide cross-attention).

Variants (``--config configs/sd15.py:VARIANT``):
  (none)  the full model
  mid     the benchmarks' model: SD 1.5's UNet widths and conditioning at a CPU-sized depth (one resnet and one
          transformer layer per block) and resolution (256 px, 16-cell face crops); small frozen encoders (the
          step and sampling benchmarks do not run them, only the training step does)
"""

from realisid_jax.config import base_config
from realisid_jax.models.cpu_kernels import Kernels, apply as apply_cpu_kernels


def get_config(variant: str = ""):
    c = base_config()
    c.model = dict(
        unet=dict(
            in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False, norm_num_groups=32,
            norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, sample_size=64,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32, scaling_factor=0.18215, sample_size=512,
        ),
        text_encoder=dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            projection_dim=768, pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
        ),
        text_encoder_2=None,
        image_encoder=dict(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
            image_size=224, patch_size=14, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5,
            projection_dim=1024,
        ),
        id_projection=dict(
            embed_dims=1280, output_dims=768, hidden_dims=768, depth=4, dim_head=64, heads=12,
            num_queries=16, ffn_ratio=4,
        ),
        local_branch=dict(conditioning_channels=3, conditioning_embedding_out_channels=(16, 32, 96, 256)),
        global_branch=dict(conditioning_channels=1, conditioning_embedding_out_channels=(16, 32, 96, 256)),
    )
    c.sampling.height = c.sampling.width = 512
    c.train.resolution = 512
    if variant == "mid":
        _mid(c)
    elif variant:
        raise ValueError(f"configs/sd15.py has no variant {variant!r} (variants: mid)")
    return c


def _mid(c) -> None:
    m = c.model
    m["unet"].update(layers_per_block=1, sample_size=32)
    m["vae"].update(block_out_channels=(32, 64, 64, 64), layers_per_block=1, sample_size=256)
    m["text_encoder"].update(num_hidden_layers=2)
    m["image_encoder"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              projection_dim=64)
    m["id_projection"] = dict(embed_dims=64, output_dims=768, hidden_dims=256, depth=1, dim_head=64, heads=4,
                              num_queries=16, ffn_ratio=2)
    c.realisid.local_latent_size = 16
    c.sampling.height = c.sampling.width = 256
    c.sampling.num_inference_steps = 4
    c.train.resolution = 256
    c.train.batch_size = 1
    c.train.warmup_steps = 10
    # The XLA:CPU kernels (tests, benchmarks), as measured on each kind of CPU (docs/benchmarks.md, "XLA:CPU
    # kernels by CPU"); `realisid tune-cpu --config configs/sd15.py:mid` measures this CPU and caches its choice.
    apply_cpu_kernels(c, MID_KERNELS, fallback=MID_KERNELS["avx2"])


# The mid step's kernels by instruction set (docs/benchmarks.md): chunked attention and im2col convs are the
# fastest pair on an AVX2 EPYC and on an AVX-512 EPYC (step K=1 1.08 s, xla/im2col 1.16 s, xla/xla 1.99 s there).
MID_KERNELS = {"avx2": Kernels("chunked", "im2col"), "avx512": Kernels("chunked", "im2col")}
