"""Key tables of the original Stability AI (LDM / ``sgm``) checkpoint layout -> diffusers / transformers names.

The layouts are those diffusers' ``loaders/single_file_utils.py`` reads (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``); the tables
here are built from the model config instead of by substring search, so block indices are exact.

Each table maps an LDM *module* prefix (``input_blocks.4.1``) to ``(diffusers prefix, inner renames)``; a key
is renamed by its longest prefix in the table, then the first inner rename that matches the rest. Keys that
no table entry covers keep their LDM name, so the loader reports them as unexpected instead of dropping them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Table = dict[str, tuple[str, tuple[tuple[str, str], ...]]]

# LDM ResBlock (openaimodel.py) -> diffusers ResnetBlock2D.
_UNET_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
# LDM VAE ResnetBlock (model.py): same names except the 1x1 shortcut.
_VAE_RESNET = (("nin_shortcut", "conv_shortcut"),)
# LDM AttnBlock (1x1 convs q, k, v, proj_out) -> diffusers Attention with group_norm.
_VAE_ATTENTION = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_PLAIN: tuple[tuple[str, str], ...] = ()


def _per_block(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def unet_table(config: Mapping) -> Table:
    """LDM ``UNetModel`` (``input_blocks`` / ``middle_block`` / ``output_blocks``) -> diffusers
    ``UNet2DConditionModel`` for a diffusers UNet ``config.json`` dict (SD 1.5, SDXL and their tiny variants).

    LDM numbers its blocks flat: ``input_blocks.0`` is ``conv_in``; then per down block ``layers_per_block``
    entries ``[resnet, (transformer)]`` and one down-sampler (``.0.op``); each up block has
    ``layers_per_block + 1`` entries ``[resnet, (transformer), (up-sampler)]``.
    """
    down_types, up_types = tuple(config["down_block_types"]), tuple(config["up_block_types"])
    n = len(down_types)
    layers = _per_block(config.get("layers_per_block", 2), n)
    table: Table = {
        "input_blocks.0.0": ("conv_in", _PLAIN),
        "time_embed.0": ("time_embedding.linear_1", _PLAIN),
        "time_embed.2": ("time_embedding.linear_2", _PLAIN),
        "label_emb.0.0": ("add_embedding.linear_1", _PLAIN),
        "label_emb.0.2": ("add_embedding.linear_2", _PLAIN),
        "out.0": ("conv_norm_out", _PLAIN),
        "out.2": ("conv_out", _PLAIN),
        "middle_block.0": ("mid_block.resnets.0", _UNET_RESNET),
        "middle_block.1": ("mid_block.attentions.0", _PLAIN),
        "middle_block.2": ("mid_block.resnets.1", _UNET_RESNET),
    }
    i = 1
    for b, block_type in enumerate(down_types):
        for j in range(layers[b]):
            table[f"input_blocks.{i}.0"] = (f"down_blocks.{b}.resnets.{j}", _UNET_RESNET)
            if block_type.startswith("CrossAttn"):
                table[f"input_blocks.{i}.1"] = (f"down_blocks.{b}.attentions.{j}", _PLAIN)
            i += 1
        if b < n - 1:
            table[f"input_blocks.{i}.0.op"] = (f"down_blocks.{b}.downsamplers.0.conv", _PLAIN)
            i += 1
    i = 0
    for b, (block_type, num) in enumerate(zip(up_types, layers[::-1])):
        attention = block_type.startswith("CrossAttn")
        for j in range(num + 1):
            table[f"output_blocks.{i}.0"] = (f"up_blocks.{b}.resnets.{j}", _UNET_RESNET)
            if attention:
                table[f"output_blocks.{i}.1"] = (f"up_blocks.{b}.attentions.{j}", _PLAIN)
            if b < n - 1 and j == num:
                table[f"output_blocks.{i}.{2 if attention else 1}.conv"] = (f"up_blocks.{b}.upsamplers.0.conv", _PLAIN)
            i += 1
    return table


def vae_table(config: Mapping) -> Table:
    """LDM ``AutoencoderKL`` (``encoder.down.i.block.j``, ``decoder.up.i``, ``mid.block_1`` / ``attn_1``) ->
    diffusers ``AutoencoderKL``. LDM's decoder ``up`` list runs from the lowest resolution's *last* index, so
    ``decoder.up.{n-1-i}`` is diffusers' ``decoder.up_blocks.{i}``."""
    n = len(config["block_out_channels"])
    layers = config.get("layers_per_block", 1)
    table: Table = {"quant_conv": ("quant_conv", _PLAIN), "post_quant_conv": ("post_quant_conv", _PLAIN)}
    for part in ("encoder", "decoder"):
        table[f"{part}.norm_out"] = (f"{part}.conv_norm_out", _PLAIN)
        table[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", _VAE_RESNET)
        table[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", _VAE_RESNET)
        table[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", _VAE_ATTENTION)
    for i in range(n):
        for j in range(layers):
            table[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET)
        for j in range(layers + 1):
            table[f"decoder.up.{n - 1 - i}.block.{j}"] = (f"decoder.up_blocks.{i}.resnets.{j}", _VAE_RESNET)
        if i < n - 1:
            table[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", _PLAIN)
            table[f"decoder.up.{n - 1 - i}.upsample.conv"] = (f"decoder.up_blocks.{i}.upsamplers.0.conv", _PLAIN)
    return table


# OpenCLIP text tower (SDXL's ``conditioner.embedders.1.model``) -> transformers CLIPTextModelWithProjection.
OPEN_CLIP_TABLE: Table = {
    "positional_embedding": ("text_model.embeddings.position_embedding.weight", _PLAIN),
    "token_embedding": ("text_model.embeddings.token_embedding", _PLAIN),
    "ln_final": ("text_model.final_layer_norm", _PLAIN),
    "text_projection": ("text_projection.weight", _PLAIN),
}
_OPEN_CLIP_LAYER = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                    ("attn.in_proj_weight", "self_attn.in_proj_weight"),
                    ("attn.in_proj_bias", "self_attn.in_proj_bias"), ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"))


def open_clip_table(num_layers: int) -> Table:
    table = dict(OPEN_CLIP_TABLE)
    for i in range(num_layers):
        table[f"transformer.resblocks.{i}"] = (f"text_model.encoder.layers.{i}", _OPEN_CLIP_LAYER)
    return table


def rename_key(key: str, table: Table) -> str:
    """The diffusers/transformers name of an LDM key (prefix already stripped); unchanged if not covered."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        entry = table.get(".".join(parts[:cut]))
        if entry is None:
            continue
        new_prefix, inner = entry
        rest = ".".join(parts[cut:])
        for old, new in inner:
            if rest == old or rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        return f"{new_prefix}.{rest}" if rest else new_prefix
    return key


def rename_state(state_dict: Mapping[str, np.ndarray], table: Table) -> dict[str, np.ndarray]:
    return {rename_key(k, table): v for k, v in state_dict.items()}
