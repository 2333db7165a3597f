"""CLIP text and vision encoders: parity with transformers 5.23.0 on tiny random checkpoints, both on-disk key
layouts, mismatch errors, sharded loading, and parameter counts at SDXL size."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from realisid_jax.config import load_config
from realisid_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from realisid_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from realisid_jax.models.modeling_utils import count_params
from realisid_jax.sharding import make_mesh, use_mesh
from realisid_jax.loading.errors import CheckpointMismatchError
from realisid_jax.loading.pretrained import from_pretrained

TINY = load_config("configs/sdxl.py:tiny").model
SDXL = load_config("configs/sdxl.py").model
BOS, EOS, PAD_BANG = 49406, 49407, 0
TEXT_CLASSES = {"CLIPTextModel": (CLIPTextModel, transformers.CLIPTextModel, "text_encoder"),
                "CLIPTextModelWithProjection": (CLIPTextModelWithProjection, transformers.CLIPTextModelWithProjection,
                                                "text_encoder_2")}


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter perturbed: norm scales/biases and Linear biases start at 1/0 in transformers."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _assert_close(actual, reference, rel=1e-4, what=""):
    reference = np.asarray(reference, np.float32)
    err = float(np.max(np.abs(np.asarray(actual, np.float32) - reference)))
    bound = rel * max(1.0, float(np.max(np.abs(reference))))
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def _jit_call(model, *args):
    """One compiled program instead of op-by-op dispatch: keeps the file fast on 2 shared cores."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))(state, *args)


def _token_ids(pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(3, 77) ids <|startoftext|> words <|endoftext|> pad…, end-of-text at 6, 30 and 76, and their masks."""
    rng = np.random.default_rng(0)
    ids = np.full((3, 77), pad, np.int64)
    mask = np.zeros((3, 77), np.int64)
    for row, eos_at in enumerate((6, 30, 76)):
        ids[row, 0], ids[row, eos_at] = BOS, EOS
        ids[row, 1:eos_at] = rng.integers(1, 49000, eos_at - 1)
        mask[row, :eos_at + 1] = 1
    return ids, mask


@pytest.fixture(scope="module", params=[(name, eos) for name in TEXT_CLASSES for eos in (EOS, 2)],
                ids=lambda p: f"{p[0]}-eos{p[1]}")
def text_pair(request, tmp_path_factory):
    name, eos_token_id = request.param
    ours, theirs, section = TEXT_CLASSES[name]
    config = {**TINY[section], "eos_token_id": eos_token_id}
    reference = _randomised(theirs(transformers.CLIPTextConfig(**config)))
    folder = tmp_path_factory.mktemp(name)
    reference.save_pretrained(folder)
    return reference, from_pretrained(ours, folder), eos_token_id


@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "padding_mask"])
def test_text_parity(text_pair, use_mask):
    reference, model, eos_token_id = text_pair
    # SD 1.5/SDXL's first tokenizer pads with <|endoftext|> (the first one must be found); SDXL's second with "!".
    ids, mask = _token_ids(pad=EOS if eos_token_id == EOS else PAD_BANG)
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if use_mask else None,
                        output_hidden_states=True)
    out = _jit_call(model, ids.astype(np.int32), mask.astype(np.int32) if use_mask else None)
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY.text_encoder.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        _assert_close(a, b.numpy(), what=f"hidden_states[{i}]")
    _assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), what="last_hidden_state")
    if isinstance(model, CLIPTextModelWithProjection):
        _assert_close(out.text_embeds, ref.text_embeds.numpy(), what="text_embeds")
    else:
        assert out.text_embeds is None
        _assert_close(out.pooler_output, ref.pooler_output.numpy(), what="pooler_output")
    # The pooled token is the end-of-text one, not the last position: it must differ from it for rows 0 and 1.
    last = np.asarray(out.last_hidden_state)
    np.testing.assert_array_equal(np.asarray(out.pooler_output), last[np.arange(3), [6, 30, 76]])


def test_text_model_loads_prefixed_legacy_checkpoint(text_pair, tmp_path):
    """SD/SDXL checkpoints (transformers 4) carry ``text_model.`` keys and sometimes the position_ids buffer."""
    reference, model, _ = text_pair
    prefix = "text_model." if isinstance(model, CLIPTextModel) else ""
    state = {prefix + k: v.numpy() for k, v in reference.state_dict().items()}
    state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(state, str(tmp_path / "model.safetensors"))
    reference.config.to_json_file(tmp_path / "config.json")
    loaded = from_pretrained(type(model), tmp_path)
    ours = jax.tree.leaves(nnx.state(model, nnx.Param))
    theirs = jax.tree.leaves(nnx.state(loaded, nnx.Param))
    assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_text_checkpoint_mismatch_lists_keys(tmp_path):
    reference = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TINY.text_encoder_2))
    state = {k: v.numpy() for k, v in reference.state_dict().items() if k != "text_projection.weight"}
    state["text_model.extra.weight"] = np.zeros(3, np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    reference.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointMismatchError, match="text_projection.weight") as info:
        from_pretrained(CLIPTextModelWithProjection, tmp_path)
    assert info.value.missing == ["text_projection.weight"] and info.value.unexpected == ["text_model.extra.weight"]


def test_text_sharded_load_and_jit(tmp_path):
    reference = _randomised(transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**TINY.text_encoder_2)))
    reference.save_pretrained(tmp_path)
    mesh = make_mesh((2, 2, 2))
    model = from_pretrained(CLIPTextModelWithProjection, tmp_path, mesh=mesh)
    kernel = model.text_model.encoder.layers[0].self_attn.q_proj.kernel.get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    ids, mask = _token_ids(pad=EOS)
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids[:2]), attention_mask=torch.from_numpy(mask[:2]),
                        output_hidden_states=True)
    with use_mesh(mesh):
        out = _jit_call(model, ids[:2].astype(np.int32), mask[:2].astype(np.int32))
    _assert_close(out.hidden_states[-2], ref.hidden_states[-2].numpy(), what="sharded penultimate")
    _assert_close(out.text_embeds, ref.text_embeds.numpy(), what="sharded text_embeds")


def test_vision_parity(tmp_path):
    config = transformers.CLIPVisionConfig(**TINY.image_encoder)
    reference = _randomised(transformers.CLIPVisionModelWithProjection(config))
    reference.save_pretrained(tmp_path)
    model = from_pretrained(CLIPVisionModelWithProjection, tmp_path)
    pixels = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ref = reference(torch.from_numpy(pixels), output_hidden_states=True)
    out = _jit_call(model, pixels.transpose(0, 2, 3, 1))
    assert out.hidden_states[-2].shape == (2, 257, TINY.image_encoder.hidden_size)
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        _assert_close(a, b.numpy(), what=f"hidden_states[{i}]")
    _assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), what="last_hidden_state")
    _assert_close(out.image_embeds, ref.image_embeds.numpy(), what="image_embeds")
    with pytest.raises(ValueError, match="doesn't match model"):
        model(np.zeros((1, 112, 112, 3), np.float32))


def test_unknown_activation_is_rejected():
    config = CLIPTextConfig.from_dict({**TINY.text_encoder, "hidden_act": "swish"})
    with pytest.raises(ValueError, match="unsupported CLIP hidden_act 'swish'"):
        CLIPTextModel.abstract(config)


def _torch_count(model_class, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config).parameters())


@pytest.mark.parametrize("section, ours, theirs, config_class", [
    ("text_encoder", CLIPTextModel, transformers.CLIPTextModel, CLIPTextConfig),
    ("text_encoder_2", CLIPTextModelWithProjection, transformers.CLIPTextModelWithProjection, CLIPTextConfig),
    ("image_encoder", CLIPVisionModelWithProjection, transformers.CLIPVisionModelWithProjection, CLIPVisionConfig),
])
def test_parameter_counts_sdxl(section, ours, theirs, config_class):
    values = dict(SDXL[section])
    theirs_config = (transformers.CLIPTextConfig if config_class is CLIPTextConfig
                     else transformers.CLIPVisionConfig)(**values)
    count = count_params(ours.abstract(config_class.from_dict(values)))
    assert count == _torch_count(theirs, theirs_config)
    assert count == {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "image_encoder": 632_076_800}[section]
