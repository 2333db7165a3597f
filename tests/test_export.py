"""Branch export to diffusers folders (loaded by diffusers' ``ControlNetModel`` / ``IPAdapterPlusImageProjection``,
same residuals) and ControlNet import as a branch's initial weights (what does not fit is reported)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from flax import nnx
from safetensors.torch import load_file

from realisid_jax.config import load_config
from realisid_jax.realisid.branches import RealisID, RealisIDConfig
from realisid_jax.loading.torch_state import export_torch_state
from realisid_jax.loading.branch_folders import export_branches, init_branch_from_controlnet
from realisid_jax.realisid.components import load_branches

CONFIG = load_config("configs/sdxl.py:tiny")
RID = CONFIG.model.id_projection


def _assert_close(actual, reference, rel=1e-4, what=""):
    reference = np.asarray(reference, np.float32)
    err = float(np.max(np.abs(np.asarray(actual, np.float32) - reference)))
    bound = rel * max(1.0, float(np.max(np.abs(reference))))
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def _params(model) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param).to_pure_dict())[0]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny RealisID with every parameter random and non-zero (no zero convs), exported once."""
    model = RealisID(RealisIDConfig.from_config(CONFIG), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(lambda v: v + 0.05 * jax.random.normal(next(keys), v.shape, v.dtype), params))
    out = tmp_path_factory.mktemp("export")
    return model, export_branches(model, out), out


@pytest.mark.parametrize("branch", ["local_branch", "global_branch"])
def test_diffusers_loads_branch_with_same_residuals(exported, branch):
    model, folders, _ = exported
    ours = getattr(model, branch)
    config = json.loads((folders[branch] / "config.json").read_text())
    assert config["_class_name"] == "ControlNetModel"
    theirs = TorchControlNet.from_pretrained(folders[branch]).eval()
    rng = np.random.default_rng(0)
    channels = ours.config.conditioning_channels
    sample = rng.standard_normal((2, 4, 16, 24)).astype(np.float32)
    cond = rng.uniform(0, 1, (2, channels, 128, 192)).astype(np.float32)
    context = rng.standard_normal((2, RID.num_queries, RID.output_dims)).astype(np.float32)
    t = np.array([3, 801])
    added = {"text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
             "time_ids": np.tile(np.array([[128, 192, 0, 0, 128, 192]], np.float32), (2, 1))}
    with torch.no_grad():
        down, mid = theirs(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context),
                           torch.from_numpy(cond), added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()},
                           return_dict=False)
    graphdef, state = nnx.split(ours)
    our_down, our_mid = jax.jit(lambda s, *a, **kw: nnx.merge(graphdef, s)(*a, **kw))(
        state, jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(context),
        jnp.asarray(cond.transpose(0, 2, 3, 1)), added_cond_kwargs={k: jnp.asarray(v) for k, v in added.items()})
    assert len(our_down) == len(down)
    for i, (a, b) in enumerate(zip(our_down, down)):
        _assert_close(a, b.permute(0, 2, 3, 1).numpy(), what=f"{branch} down {i}")
    _assert_close(our_mid, mid.permute(0, 2, 3, 1).numpy(), what=f"{branch} mid")
    assert float(np.max(np.abs(mid.numpy()))) > 1e-3  # the comparison is not between zeros


def test_diffusers_builds_id_projection(exported):
    model, folders, _ = exported
    config = json.loads((folders["id_projection"] / "config.json").read_text())
    assert config.pop("_class_name") == "IPAdapterPlusImageProjection"
    config.pop("_diffusers_version")
    theirs = IPAdapterPlusImageProjection(**config).eval()
    weights = folders["id_projection"] / "diffusion_pytorch_model.safetensors"
    theirs.load_state_dict(load_file(str(weights)), strict=True)
    tokens = np.random.default_rng(2).standard_normal((2, 9, RID.embed_dims)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(tokens)).numpy()
    _assert_close(model.id_projection(jnp.asarray(tokens)), expected, what="id_projection")


def test_export_reads_back_bit_exactly(exported):
    model, _, out = exported
    restored = load_branches(out)
    assert restored.config == model.config
    for name in ("local_branch", "global_branch", "id_projection"):
        ours, back = _params(getattr(model, name)), _params(getattr(restored, name))
        assert sorted(ours) == sorted(back), name
        for key, value in ours.items():
            np.testing.assert_array_equal(back[key], value, err_msg=f"{name}{key}")


def test_init_global_branch_from_3_channel_controlnet(exported, capsys):
    """An IdentityNet-like ControlNet: 3 condition channels and a 48-wide context, into the 1-channel branch
    whose context is p_id (64 wide)."""
    _, _, tmp = exported
    model = load_branches(tmp)  # a private copy: the shared fixture stays as exported
    unet_config = {**dict(CONFIG.model.unet), "cross_attention_dim": 48}
    torch.manual_seed(3)
    theirs = TorchControlNet.from_unet(TorchUNet(**unet_config), conditioning_channels=3,
                                       conditioning_embedding_out_channels=(8, 16, 16, 32))
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp / "identitynet"
    theirs.save_pretrained(folder)
    before = _params(model.global_branch)
    report = init_branch_from_controlnet(model, "global_branch", folder)

    printed = capsys.readouterr().out
    assert "controlnet_cond_embedding.conv_in.weight" in printed and "NOT copied" in printed
    assert ("conditioning_channels", 3, 1) in report.config_differences
    assert ("cross_attention_dim", 48, 64) in report.config_differences
    not_copied = {key for key, *_ in report.wrong_shape}
    assert "controlnet_cond_embedding.conv_in.weight" in not_copied
    assert ("controlnet_cond_embedding.conv_in.weight", (8, 3, 3, 3), (8, 1, 3, 3)) in report.wrong_shape
    assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in not_copied - {
        "controlnet_cond_embedding.conv_in.weight"})
    transformer_blocks = sum(k.endswith("attn2.to_k.weight") for k in theirs.state_dict())
    assert transformer_blocks == 6  # tiny: 2 x 2 in the cross-attention down block, 2 in the mid block
    assert len(not_copied) == 1 + 2 * transformer_blocks
    assert not report.missing and not report.unused and not report.complete

    after = _params(model.global_branch)
    state = theirs.state_dict()
    exported_after = export_torch_state(nnx.state(model.global_branch, nnx.Param))
    for key in report.copied:
        np.testing.assert_array_equal(exported_after[key], state[key].numpy(), err_msg=key)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert len(changed) == len(report.copied)  # exactly the copied tensors changed
    assert len(report.copied) + len(not_copied) == len(before)
