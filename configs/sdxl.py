"""SDXL 1.0 base + RealisID branches (ViT-H/14 image encoder, 16 ID tokens x 2048). Paper defaults.

Variants (``--config configs/sdxl.py:VARIANT``):
  (none)  the full model
  tiny    the same architecture at tiny widths: every code path of the full model, fast on 2 CPU cores
          (tests, the embedded demo)
  glyphs  the glyph world's models (``realisid_jax.glyphs``): SDXL's architecture sized to be trained from
          scratch on 2 CPU cores — 256 px scenes, a 32x32x4 latent, 32x32 reference crops
"""

import ml_collections

from realisid_jax.config import base_config
from realisid_jax.models.cpu_kernels import Kernels, apply as apply_cpu_kernels

# The XLA:CPU kernels of the CPU variants by instruction set (docs/benchmarks.md, "XLA:CPU kernels by CPU");
# `realisid tune-cpu --config configs/sdxl.py:VARIANT` measures this CPU and caches its own choice.
# tiny's training step (batch 8) on an AVX-512 EPYC: 6.15 samples/s with chunked/im2col, 6.19 with xla/xla (noise).
TINY_KERNELS = {"avx2": Kernels("chunked", "im2col"), "avx512": Kernels("chunked", "im2col")}
# The glyph UNet's training step (batch 8): 1.22 s with XLA's kernels, 1.45 s with chunked attention and
# im2col convs on an AVX-512 EPYC (docs/glyphs.md); not measured on AVX2, which keeps XLA's as before.
GLYPHS_KERNELS = {"avx2": Kernels("xla", "xla"), "avx512": Kernels("xla", "xla")}


def get_config(variant: str = ""):
    c = base_config()
    c.model = dict(
        unet=dict(
            in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5,
            flip_sin_to_cos=True, freq_shift=0, sample_size=128,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32, scaling_factor=0.13025, sample_size=1024, force_upcast=True,
        ),
        text_encoder=dict(  # CLIP ViT-L/14 text tower
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            projection_dim=768, pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
        ),
        text_encoder_2=dict(  # OpenCLIP ViT-bigG/14 text tower, with projection
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
            projection_dim=1280, pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
        ),
        image_encoder=dict(  # OpenCLIP ViT-H/14 vision tower (IP-Adapter's image encoder)
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
            image_size=224, patch_size=14, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5,
            projection_dim=1024,
        ),
        id_projection=dict(  # IP-Adapter-plus Resampler (diffusers IPAdapterPlusImageProjection)
            embed_dims=1280, output_dims=2048, hidden_dims=1280, depth=4, dim_head=64, heads=20,
            num_queries=16, ffn_ratio=4,
        ),
        local_branch=dict(conditioning_channels=3, conditioning_embedding_out_channels=(16, 32, 96, 256)),
        global_branch=dict(conditioning_channels=1, conditioning_embedding_out_channels=(16, 32, 96, 256)),
    )
    # Accelerator defaults: bf16 compute, frozen base stored in bf16; the branches keep fp32 master weights and
    # AdamW moments (param_dtype). What makes training fit a 16 GiB v5e chip (docs/training.md).
    c.dtype = c.frozen_param_dtype = "bfloat16"
    c.attention_impl = "splash"  # TPU Pallas flash kernel (docs/benchmarks.md); GPU: cudnn, XLA:CPU: xla
    c.train.scan_layers = True  # the 10-deep transformer stacks as one lax.scan in the training step
    # One person per branch pass, the K passes in sequence: 4 persons sample on one 16 GiB v5e chip
    # (docs/sampling.md, "Serving on one TPU chip").
    c.realisid.persons_per_pass = 1
    if variant == "tiny":
        _tiny(c)
    elif variant == "glyphs":
        _glyphs(c)
    elif variant == "micro":
        _micro(c)
    elif variant:
        raise ValueError(f"configs/sdxl.py has no variant {variant!r} (variants: tiny, glyphs, micro)")
    return c


def _tiny(c) -> None:
    """Two UNet levels, widths 32/64, two-layer CLIP towers of width 32, 256 px images, 16-cell face crops."""
    m = c.model
    m["unet"].update(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                     transformer_layers_per_block=(1, 2), cross_attention_dim=64, addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=80, norm_num_groups=8, sample_size=32)
    m["vae"].update(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=256)
    del m["vae"]["force_upcast"]
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    for name in ("text_encoder", "text_encoder_2", "image_encoder"):
        m[name].update(tower)
    m["id_projection"] = dict(embed_dims=32, output_dims=64, hidden_dims=32, depth=1, dim_head=8, heads=4,
                              num_queries=16, ffn_ratio=2)
    for name in ("local_branch", "global_branch"):
        m[name].update(conditioning_embedding_out_channels=(8, 16, 16, 32))
    c.realisid.local_latent_size = 16
    c.sampling.height = c.sampling.width = 256
    c.sampling.num_inference_steps = 10
    c.train.resolution = 256
    c.train.batch_size = 8
    c.train.warmup_steps = 10
    apply_cpu_kernels(c, TINY_KERNELS, fallback=TINY_KERNELS["avx2"])  # the XLA:CPU kernels (tests, demo)
    c.train.scan_layers = False  # the tests' reference steps layer by layer; tests/test_layer_scan.py checks the scan
    c.dtype = c.frozen_param_dtype = "float32"  # parity with PyTorch in the tests


def _micro(c) -> None:
    """The tiny model cut to one layer per block and tower, with the TPU kernels (XLA attention and convs), its
    rows of layers scanned, trained from precomputed inputs at 64 px: the smallest program with every part of the
    TPU training step (both branches, the frozen UNet, Eq. 7, AdamW), for ahead-of-time plans that compile in a
    minute (tests/test_tpu_aot.py, bench/fsdp_peak.py)."""
    _tiny(c)
    c.model["unet"]["layers_per_block"] = 1
    for name in ("text_encoder", "text_encoder_2", "image_encoder"):
        c.model[name]["num_hidden_layers"] = 1
    c.attention_impl, c.conv_impl = "xla", "xla"
    c.train.update(scan_layers=True, precomputed_inputs=True)
    c.sampling.height = c.sampling.width = 64
    # Left to the partitioner, maps of these few channels are split over the chips, each shard padded to the
    # TPU's 128 lanes, and the peak per chip grows with the chips (docs/training.md).
    c.mesh.gather_weights = True


def _glyphs(c) -> None:
    """The glyph world's base models and branches: two UNet levels (64/128 wide) on a 32x32x4 latent of 256 px
    scenes, an 8x VAE, two random frozen 2-layer CLIP text towers (width 32 each: a 64-wide context), a 4-layer
    ViT image encoder on 32 px reference crops (patch 4), 16 ID tokens; float32 and the XLA:CPU kernels."""
    _tiny(c)
    m = c.model
    m["unet"].update(block_out_channels=(64, 128), attention_head_dim=(4, 8), transformer_layers_per_block=(1, 1),
                     norm_num_groups=16)
    m["vae"].update(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16)
    m["image_encoder"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              image_size=32, patch_size=4, projection_dim=64)
    m["id_projection"] = dict(embed_dims=64, output_dims=64, hidden_dims=64, depth=2, dim_head=16, heads=4,
                              num_queries=16, ffn_ratio=2)
    for name in ("local_branch", "global_branch"):
        m[name].update(conditioning_embedding_out_channels=(16, 32, 32, 64))
    c.sampling.num_inference_steps = 20
    # λ_t: under the base's zero-terminal-SNR schedule a large text guidance oversaturates the background (its
    # colour as captioned, 30 requests: 37 % at 1 and 2, 33 % at 3, 20 % at 5; docs/glyphs.md).
    c.sampling.text_guidance_scale = 2.0
    apply_cpu_kernels(c, GLYPHS_KERNELS, fallback=GLYPHS_KERNELS["avx512"])
    c.realisid.landmark_layout = "square"  # the glyph world's 6 keypoints (glyphs.world)
    c.realisid.reference_analysis = "plain_background"  # a glyph picture's subject, not a face detector's
    c.realisid.persons_per_pass = 0  # all persons in one pass: memory is not what limits a CPU
    # Branches trained from scratch-sized models: a larger step than the paper's 1e-5 for SDXL (docs/glyphs.md).
    c.train.update(learning_rate=2e-4, warmup_steps=50, num_steps=3000, checkpoint_every=250, log_every=25,
                   sample_every=0, remat=False)  # remat only costs time on a CPU with memory to spare
    # `realisid glyphs prepare`: the stage's sizes, sized for about 40 minutes on 2 CPU cores (docs/glyphs.md).
    c.glyphs = ml_collections.ConfigDict(dict(
        seed=0, data_count=2000, eval_scenes=32, base_scenes=60,
        vae_steps=700, vae_batch_size=8, vae_crop=64, vae_learning_rate=2e-3,
        encoder_steps=1400, encoder_batch_size=128, encoder_learning_rate=3e-3,
        unet_steps=1000, unet_batch_size=8, unet_learning_rate=1e-3, unet_pool=768,
        scorer_steps=1500,
    ))
