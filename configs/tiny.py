"""SDXL architecture at tiny widths: every code path of the full model, fast on 2 CPU cores."""

from realisid_jax.config import base_config


def get_config():
    c = base_config()
    c.model = dict(
        unet=dict(
            in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), cross_attention_dim=64,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80, norm_num_groups=8, norm_eps=1e-5,
            flip_sin_to_cos=True, freq_shift=0, sample_size=32,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
            layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=8, scaling_factor=0.13025, sample_size=256,
        ),
        text_encoder=dict(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
            pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
        ),
        text_encoder_2=dict(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=32,
            pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
        ),
        image_encoder=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=224,
            patch_size=14, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=32,
        ),
        id_projection=dict(
            embed_dims=32, output_dims=64, hidden_dims=32, depth=1, dim_head=8, heads=4, num_queries=16, ffn_ratio=2,
        ),
        local_branch=dict(conditioning_channels=3, conditioning_embedding_out_channels=(8, 16, 16, 32)),
        global_branch=dict(conditioning_channels=1, conditioning_embedding_out_channels=(8, 16, 16, 32)),
    )
    c.realisid.local_latent_size = 16
    c.sampling.height = c.sampling.width = 256
    c.sampling.num_inference_steps = 10
    c.train.resolution = 256
    c.train.batch_size = 8
    c.train.warmup_steps = 10
    c.attention_impl, c.conv_impl = "chunked", "im2col"  # the XLA:CPU kernels (tests, demo)
    return c
