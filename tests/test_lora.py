"""LoRA merging against diffusers: a random peft LoRA (attention projections, 3x3 and 1x1 convs of the UNet, the
first text encoder's q/v projections) loaded with ``load_lora_weights`` + ``fuse_lora(lora_scale=s)`` gives our
merged weights and UNet output; the same LoRA under kohya names merges to the same weights; a key that names no
module is refused with nothing merged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from flax import nnx
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from test_single_file import _unet_to_ldm, _write_checkpoint
from tiny_sdxl import TINY, build_tiny_sdxl

from realisid_jax.app.metadata import read_generation
from realisid_jax.cli import main
from realisid_jax.config import load_config
from realisid_jax.loading.errors import LoraError
from realisid_jax.loading.lora import merge_loras
from realisid_jax.loading.pipeline_folder import load_model_folders
from realisid_jax.loading.single_file import load_single_file
from realisid_jax.loading.torch_state import export_torch_state
from realisid_jax.realisid.components import pretrained_components
from realisid_jax.sharding import DEFAULT_RULES, make_mesh

SCALE = 0.7
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv_shortcut"]


def _peft_lora(model, targets, rank, alpha):
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model.add_adapter(config)  # init_lora_weights=False: lora_B random too, so the update is not zero
    return get_peft_model_state_dict(model), config.to_dict()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, our models of the tiny folder, the torch pipeline, the peft LoRA file, its two state dicts)."""
    root = tmp_path_factory.mktemp("lora")
    folder, _, pipe, _ = build_tiny_sdxl(root)
    torch.manual_seed(1)
    unet_lora, unet_meta = _peft_lora(UNet2DConditionModel(**TINY.unet.to_dict()), UNET_TARGETS, 4, 8)
    te = type(pipe.text_encoder)(pipe.text_encoder.config)
    te_lora, te_meta = _peft_lora(te, ["q_proj", "v_proj"], 2, 2)
    StableDiffusionXLPipeline.save_lora_weights(root / "peft", unet_lora_layers=unet_lora,
                                                text_encoder_lora_layers=te_lora, unet_lora_adapter_metadata=unet_meta,
                                                text_encoder_lora_adapter_metadata=te_meta)
    config = load_config("configs/sdxl.py:tiny")
    models = load_model_folders(folder, config, components=["unet", "text_encoder", "text_encoder_2"])
    return config, models, pipe, root / "peft" / "pytorch_lora_weights.safetensors", unet_lora, te_lora


def _load(tiny, loras):
    """The tiny folder's models (loaded once per module) with ``loras`` merged."""
    models = {name: nnx.clone(model) for name, model in tiny[1].items()}
    merge_loras(models, loras)
    return models


def _state(model):
    return export_torch_state(nnx.state(model, nnx.Param))


def test_peft_lora_fuses_as_diffusers(tiny):
    _, _, pipe, path, _, _ = tiny
    ours = _load(tiny, [(path, SCALE)])
    pipe.load_lora_weights(str(path.parent))
    pipe.fuse_lora(lora_scale=SCALE)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    for name in ("unet", "text_encoder"):
        reference = {k.removeprefix("text_model."): v.numpy() for k, v in getattr(pipe, name).state_dict().items()}
        for key, value in _state(ours[name]).items():
            np.testing.assert_allclose(value, reference[key.removeprefix("text_model.")], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}.{key}")

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    context = rng.standard_normal((1, 7, 64)).astype(np.float32)
    added = {"text_embeds": rng.standard_normal((1, 32)).astype(np.float32),
             "time_ids": np.array([[128, 128, 0, 0, 128, 128]], np.float32)}
    with torch.no_grad():
        want = pipe.unet(torch.from_numpy(sample), torch.tensor([500]), torch.from_numpy(context),
                         added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample
    graphdef, state = nnx.split(ours["unet"])
    got = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, added_cond_kwargs=added))(
        state, jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.array([500]), jnp.asarray(context))
    reference = want.permute(0, 2, 3, 1).numpy()
    assert np.max(np.abs(np.asarray(got) - reference)) <= 1e-4 * max(1.0, np.max(np.abs(reference)))


def _kohya(unet_lora, te_lora, unet_config):
    """The same LoRA under kohya names: half the UNet modules in the Stability names SDXL trainers write
    (``input_blocks_4_1_...``), half in diffusers names; alphas as tensors."""
    state = {}
    modules = sorted({k.rpartition(".lora_")[0] for k in unet_lora})
    for i, module in enumerate(modules):
        name = next(iter(_unet_to_ldm({f"{module}.weight": None}, unet_config))).removesuffix(".weight") \
            if i % 2 else module
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = unet_lora[f"{module}.lora_A.weight"]
        state[f"{key}.lora_up.weight"] = unet_lora[f"{module}.lora_B.weight"]
        state[f"{key}.alpha"] = torch.tensor(8.0)
    for module in sorted({k.rpartition(".lora_")[0] for k in te_lora}):
        key = "lora_te1_text_model_" + module.replace(".", "_")
        state[f"{key}.lora_down.weight"] = te_lora[f"{module}.lora_A.weight"]
        state[f"{key}.lora_up.weight"] = te_lora[f"{module}.lora_B.weight"]
        state[f"{key}.alpha"] = torch.tensor(2.0)
    return {k: v.contiguous() for k, v in state.items()}


def test_kohya_names_merge_the_same_weights(tiny, tmp_path):
    *_, path, unet_lora, te_lora = tiny
    save_file(_kohya(unet_lora, te_lora, TINY.unet.to_dict()), str(tmp_path / "kohya.safetensors"))
    kohya = _load(tiny, [(tmp_path / "kohya.safetensors", SCALE)])
    peft = _load(tiny, [(path, SCALE)])
    plain = _load(tiny, [])
    for name in ("unet", "text_encoder"):
        want, base = _state(peft[name]), _state(plain[name])
        changed = [k for k, v in want.items() if not np.array_equal(v, base[k])]
        assert len(changed) == len({k.rpartition(".lora_")[0] for k in (unet_lora if name == "unet" else te_lora)})
        for key, value in _state(kohya[name]).items():
            np.testing.assert_allclose(value, want[key], rtol=1e-6, atol=1e-7, err_msg=f"{name}.{key}")


def test_unmatched_keys_are_listed_and_nothing_merged(tiny, tmp_path):
    *_, unet_lora, _ = tiny
    state = {f"unet.{k}": v.contiguous() for k, v in unet_lora.items()}
    state["unet.down_blocks.7.attentions.0.proj_in.lora_A.weight"] = torch.zeros(4, 64)
    state["unet.mid_block.resnets.0.conv1.lora_magnitude_vector"] = torch.zeros(64)
    save_file(state, str(tmp_path / "bad.safetensors"))
    models = _load(tiny, [])
    before = _state(models["unet"])
    with pytest.raises(LoraError, match=r"1 keys of no SD / SDXL LoRA format: unet\.mid_block\.resnets\.0\.conv1\."
                                        r"lora_magnitude_vector; 1 keys name no module .*: unet\.down_blocks\.7\."):
        merge_loras(models, [(tmp_path / "bad.safetensors", 1.0)])
    for key, value in _state(models["unet"]).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """(a tiny Stability single file, an image encoder folder, a kohya LoRA on two UNet modules: a linear in the
    Stability names, a 3x3 conv in diffusers names)."""
    root = tmp_path_factory.mktemp("single")
    config = load_config("configs/sdxl.py:tiny")
    weights = _write_checkpoint(config, root / "model.safetensors")["unet"].state_dict()
    transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        **config.model.image_encoder.to_dict())).save_pretrained(root / "encoder")
    ldm = next(iter(_unet_to_ldm({f"{LORA_MODULES[0]}.weight": None}, TINY.unet.to_dict()))).removesuffix(".weight")
    state = {}
    for module, name in zip(LORA_MODULES, (ldm, LORA_MODULES[1])):
        out, inp, *window = weights[f"{module}.weight"].shape
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = 0.1 * torch.randn(2, inp, *window)
        state[f"{key}.lora_up.weight"] = 0.1 * torch.randn(out, 2, *[1 for _ in window])
    save_file(state, str(root / "kohya.safetensors"))
    return root / "model.safetensors", root / "encoder", root / "kohya.safetensors"


LORA_MODULES = ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.1.resnets.0.conv1")


def test_sample_on_a_single_file_with_a_kohya_lora(single_file, tmp_path, capsys):
    """``realisid sample --base FILE.safetensors --lora FILE:SCALE``: a Stability single file (no tokenizers,
    no scheduler: the standard ones) with a kohya LoRA; the PNGs record the LoRA."""
    base, encoder, lora = single_file
    rc = main(["sample", "--config", "configs/sdxl.py:tiny", "--base", str(base), "--image-encoder", str(encoder),
               "--lora", f"{lora}:0.5", "--out", str(tmp_path / "out"), "--steps", "2", "--height", "128",
               "--width", "128"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "(scale 0.5) merged into unet (2 modules)" in captured.out
    assert read_generation(tmp_path / "out" / "image_000.png").weights["lora"] == [[str(lora), 0.5]]


def test_training_branches_start_from_the_merged_unet(single_file, capsys):
    """``train --pretrained FILE --lora``: the LoRA is merged before the ControlNets are copied from the UNet."""
    base, encoder, lora = single_file
    config = load_config("configs/sdxl.py:tiny")
    plain = pretrained_components(config, base, encoder, mesh=None, rules=DEFAULT_RULES)
    merged = pretrained_components(config, base, encoder, mesh=None, rules=DEFAULT_RULES, loras=[(lora, 0.5)])
    for module in LORA_MODULES:
        path = (*(int(p) if p.isdigit() else p for p in module.split(".")), "kernel")
        kernels = [np.asarray(dict(nnx.to_flat_state(nnx.state(model)))[path].get_value())
                   for model in (plain.unet, merged.unet, merged.realisid.local_branch, merged.realisid.global_branch)]
        assert not np.allclose(kernels[1], kernels[0]), module
        np.testing.assert_array_equal(kernels[2], kernels[1], err_msg=module)
        np.testing.assert_array_equal(kernels[3], kernels[1], err_msg=module)
    capsys.readouterr()


def test_merging_keeps_each_kernels_sharding(single_file, capsys):
    """On a (2, 4, 1) mesh each merged kernel keeps its sharding and gets the values of the unsharded merge."""
    base, _, lora = single_file
    config = load_config("configs/sdxl.py:tiny")
    sharded = load_single_file(base, config, components=["unet"], mesh=make_mesh((2, 4, 1)), rules=DEFAULT_RULES)
    plain = load_single_file(base, config, components=["unet"])
    before = {path: v.get_value().sharding for path, v in nnx.to_flat_state(nnx.state(sharded["unet"]))}
    for models in (sharded, plain):
        merge_loras(models, [(lora, 0.5)])
    want = dict(nnx.to_flat_state(nnx.state(plain["unet"])))
    merged = [(".".join(map(str, path)), v.get_value()) for path, v in nnx.to_flat_state(nnx.state(sharded["unet"]))
              if path[-1] == "kernel" and ".".join(map(str, path)).removesuffix(".kernel") in LORA_MODULES]
    assert len(merged) == 2 and not all(value.sharding.is_fully_replicated for _, value in merged)
    for path, v in nnx.to_flat_state(nnx.state(sharded["unet"])):
        assert v.get_value().sharding == before[path], path
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(want[path].get_value()), err_msg=path)
    capsys.readouterr()


def test_lora_without_base_is_refused(tmp_path, capsys):
    assert main(["sample", "--lora", "x.safetensors", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == "error: --lora needs --base: a LoRA is made for real weights"
