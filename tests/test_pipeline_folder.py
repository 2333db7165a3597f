"""The pipeline-folder loader on a tiny random diffusers StableDiffusionXLPipeline written by save_pretrained:
``load_pipeline_folder`` (model_index.json), ``load_model_folders`` (the project config) and the trainer's
``pretrained_components``."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tiny_sdxl import build_tiny_sdxl
from jax.sharding import NamedSharding

from realisid_jax.config import load_config
from realisid_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from realisid_jax.models.clip_vision import CLIPVisionModelWithProjection
from realisid_jax.models.modeling_utils import count_params
from realisid_jax.models.unet_2d_condition import UNet2DConditionModel as JaxUNet
from realisid_jax.models.vae import AutoencoderKL as JaxVAE
from realisid_jax.sharding import DEFAULT_RULES, make_mesh
from realisid_jax.text.tokenizer import CLIP_VOCAB_SIZE
from realisid_jax.realisid.components import pretrained_components
from realisid_jax.loading.pipeline_folder import (PipelineComponents, UnsupportedComponentError,
                                                  load_model_folders, load_pipeline_folder)

CONFIG = load_config("configs/sdxl.py:tiny")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(pipeline folder, image-encoder folder, torch pipeline, torch image encoder): ``tiny_sdxl``."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def loaded(sdxl) -> PipelineComponents:
    folder, encoder_folder, _, _ = sdxl
    return load_pipeline_folder(folder, image_encoder=encoder_folder)


def _torch_numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sdxl_components_have_the_index_classes_and_the_weights(sdxl, loaded):
    _, _, pipe, image_encoder = sdxl
    expected = {"unet": (JaxUNet, pipe.unet), "vae": (JaxVAE, pipe.vae),
                "text_encoder": (CLIPTextModel, pipe.text_encoder),
                "text_encoder_2": (CLIPTextModelWithProjection, pipe.text_encoder_2),
                "image_encoder": (CLIPVisionModelWithProjection, image_encoder)}
    assert set(loaded.models()) == set(expected)
    for name, (cls, reference) in expected.items():
        model = getattr(loaded, name)
        assert type(model) is cls, name
        assert count_params(model) == _torch_numel(reference), name
    # One weight per model, through each class's rename and transpose.
    np.testing.assert_array_equal(loaded.vae.decoder.conv_out.kernel[...],
                                  pipe.vae.decoder.conv_out.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded.unet.conv_in.kernel[...],
                                  pipe.unet.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded.text_encoder_2.text_projection.kernel[...],
                                  pipe.text_encoder_2.text_projection.weight.detach().numpy().T)
    np.testing.assert_array_equal(loaded.image_encoder.visual_projection.kernel[...],
                                  image_encoder.visual_projection.weight.detach().numpy().T)


def test_tokenizers_and_scheduler_config(loaded):
    assert len(loaded.tokenizers) == len(loaded.text_encoders) == 2
    for tokenizer in loaded.tokenizers:
        assert isinstance(tokenizer, transformers.CLIPTokenizer) and len(tokenizer) == CLIP_VOCAB_SIZE
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert loaded.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert loaded.scheduler_config["timestep_spacing"] == "leading"
    assert loaded.model_index["_class_name"] == "StableDiffusionXLPipeline"


def _assert_on_mesh(models: dict, mesh, dtype):
    for name, model in models.items():
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        assert {leaf.dtype for leaf in leaves} == {jnp.dtype(dtype)}, name
        assert all(isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh for leaf in leaves)
    # A kernel the rules split: the UNet's first Linear of the time embedding, ("embed", "mlp").
    spec = models["unet"].time_embedding.linear_1.kernel[...].sharding.spec
    assert spec != jax.sharding.PartitionSpec()


def test_bfloat16_on_a_mesh(sdxl):
    folder, _, _, _ = sdxl
    mesh = make_mesh((2, 2, 2))
    components = load_pipeline_folder(folder, dtype=jnp.bfloat16, mesh=mesh)
    assert components.image_encoder is None
    _assert_on_mesh(components.models(), mesh, jnp.bfloat16)


def test_trainer_loads_every_model_of_the_config_on_a_mesh(sdxl, loaded):
    folder, encoder_folder, _, _ = sdxl
    mesh = make_mesh((2, 2, 2))
    config = load_config("configs/sdxl.py:tiny", ["frozen_param_dtype=bfloat16"])
    frozen = pretrained_components(config, folder, encoder_folder, mesh=mesh, rules=DEFAULT_RULES)
    models = {name: getattr(frozen, name) for name in loaded.models()}
    assert {name: type(m) for name, m in models.items()} == {n: type(m) for n, m in loaded.models().items()}
    _assert_on_mesh(models, mesh, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(frozen.image_encoder.visual_projection.kernel[...]),
                                  np.asarray(loaded.image_encoder.visual_projection.kernel[...], jnp.bfloat16))


def _edited_copy(folder, tmp_path, **index_changes):
    copy = tmp_path / "pipeline"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index.update(index_changes)
    (copy / "model_index.json").write_text(json.dumps(index))
    return copy


def test_sd15_layout_and_image_encoder_listed_in_the_index(sdxl, tmp_path):
    """No text_encoder_2 / tokenizer_2 (SD 1.5's index), and an image_encoder sub-folder named by the index."""
    folder, encoder_folder, _, _ = sdxl
    copy = _edited_copy(folder, tmp_path, text_encoder_2=[None, None], tokenizer_2=[None, None],
                        image_encoder=["transformers", "CLIPVisionModelWithProjection"])
    shutil.copytree(encoder_folder, copy / "image_encoder")
    components = load_pipeline_folder(copy)
    assert components.text_encoder_2 is None and components.tokenizer_2 is None
    assert len(components.text_encoders) == len(components.tokenizers) == 1
    assert isinstance(components.image_encoder, CLIPVisionModelWithProjection)


def test_missing_component_folder_is_named(sdxl, tmp_path):
    folder, _, _, _ = sdxl
    copy = _edited_copy(folder, tmp_path)
    shutil.rmtree(copy / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"pipeline/text_encoder_2/ not found, although model_index.json "
                                                 r"lists text_encoder_2 \(CLIPTextModelWithProjection\)"):
        load_pipeline_folder(copy)


def test_unsupported_class_is_rejected(sdxl, tmp_path):
    folder, _, _, _ = sdxl
    copy = _edited_copy(folder, tmp_path, text_encoder_2=["transformers", "T5EncoderModel"])
    with pytest.raises(UnsupportedComponentError, match="text_encoder_2 is a T5EncoderModel"):
        load_pipeline_folder(copy)


def test_required_component_and_tokenizer_pairing(sdxl, tmp_path):
    folder, _, _, _ = sdxl
    with pytest.raises(ValueError, match=r"lists no \['unet'\]"):
        load_pipeline_folder(_edited_copy(folder, tmp_path / "a", unet=[None, None]))
    with pytest.raises(ValueError, match="only one of text_encoder_2 / tokenizer_2"):
        load_pipeline_folder(_edited_copy(folder, tmp_path / "b", tokenizer_2=[None, None]))


def test_missing_model_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline_folder(tmp_path)


def test_config_decides_what_is_loaded_and_checks_it(sdxl, tmp_path):
    folder, encoder_folder, _, _ = sdxl
    copy = _edited_copy(folder, tmp_path)
    (copy / "model_index.json").unlink()
    shutil.rmtree(copy / "unet")
    # SD 1.5 / SDXL text encoders still carry transformers' legacy special-token ids: no architecture change.
    text_config = json.loads((copy / "text_encoder" / "config.json").read_text())
    (copy / "text_encoder" / "config.json").write_text(json.dumps({**text_config, "bos_token_id": 0,
                                                                   "eos_token_id": 2}))
    models = load_model_folders(copy, CONFIG, components=["text_encoder", "vae"])
    assert models["text_encoder"].config.eos_token_id == 2 and isinstance(models["vae"], JaxVAE)
    # The default: what the config describes and the folders hold; the image encoder from its own folder.
    assert set(load_model_folders(None, CONFIG, image_encoder=encoder_folder)) == {"image_encoder"}
    with pytest.raises(FileNotFoundError, match=r"unet/ not found, although the config describes unet "
                                                r"\(UNet2DConditionModel\)"):
        load_model_folders(copy, CONFIG, components=["vae", "unet"])
    sd15 = load_config("configs/sdxl.py:tiny")
    sd15.model.text_encoder_2 = None
    with pytest.raises(ValueError, match=r"describes no \['text_encoder_2'\]"):
        load_model_folders(copy, sd15, components=["text_encoder_2"])
    other = load_config("configs/sdxl.py:tiny", ["model.vae.norm_num_groups=4"])
    with pytest.raises(ValueError, match="vae: norm_num_groups: folder 8, config 4"):
        load_model_folders(copy, other)
