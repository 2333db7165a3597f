"""Mid-size benchmark config: the SD 1.5 UNet's widths and conditioning at a CPU-sized depth and resolution.

UNet: SD 1.5 channels (320, 640, 1280, 1280), 8 heads, 768-wide cross-attention, 1x1-conv projections, no
added (``text_time``) conditioning; cut to one resnet (+ one transformer layer) per block so that one
denoising step with both branches runs in seconds on 2 CPU cores. Images 256 px (32x32 latents), face crops
16x16 latent cells (128 px landmark images). The frozen encoders (VAE, CLIP text/vision) are small: the step
and sampling benchmarks do not run them, only the training step does.
"""

from realisid_jax.config import base_config


def get_config():
    c = base_config()
    c.model = dict(
        unet=dict(
            in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False, norm_num_groups=32,
            norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, sample_size=32,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64, 64),
            layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32, scaling_factor=0.18215, sample_size=256,
        ),
        text_encoder=dict(  # 768 wide (the UNet's cross-attention width), 2 layers
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            projection_dim=768, pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
        ),
        text_encoder_2=None,
        image_encoder=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=224,
            patch_size=14, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=64,
        ),
        id_projection=dict(
            embed_dims=64, output_dims=768, hidden_dims=256, depth=1, dim_head=64, heads=4, num_queries=16,
            ffn_ratio=2,
        ),
        local_branch=dict(conditioning_channels=3, conditioning_embedding_out_channels=(16, 32, 96, 256)),
        global_branch=dict(conditioning_channels=1, conditioning_embedding_out_channels=(16, 32, 96, 256)),
    )
    c.realisid.local_latent_size = 16
    c.sampling.height = c.sampling.width = 256
    c.sampling.num_inference_steps = 4
    c.train.resolution = 256
    c.train.batch_size = 1
    c.train.warmup_steps = 10
    c.attention_impl, c.conv_impl = "chunked", "im2col"  # the XLA:CPU kernels (tests, benchmarks)
    return c
