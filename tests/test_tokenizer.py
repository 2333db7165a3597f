"""CLIP tokenizers: the offline vocabulary built from OpenAI's BPE file, folder loading and its guards."""

import json
import shutil

import numpy as np
import pytest
from transformers import CLIPTokenizer

from realisid_jax import assets
from realisid_jax.text.tokenizer import (CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, TokenizerError, load_tokenizer,
                                    offline_clip_tokenizer, tokenize, tokenizer_cache_dir)
from realisid_jax.folders import HubIdError

A_PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="module")
def bpe_file():
    return assets.clip_bpe_file()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch, bpe_file):
    """An empty ``$REALISID_CACHE`` whose BPE file is the already-fetched one (no download in tests)."""
    monkeypatch.setenv("REALISID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "clip_bpe_file", lambda: bpe_file)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer(bpe_file):
    return offline_clip_tokenizer()


def test_offline_tokenizer_is_built_once_into_the_cache(fresh_cache, monkeypatch):
    tokenizer = offline_clip_tokenizer()
    assert tokenizer_cache_dir() == fresh_cache / "clip_tokenizer"
    assert sorted(p.name for p in fresh_cache.iterdir()) == ["clip_tokenizer"]  # no temporary folder left
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert tokenizer("a photo of a cat").input_ids == A_PHOTO_OF_A_CAT

    def no_second_build():
        raise AssertionError("the cached tokenizer was rebuilt")

    monkeypatch.setattr(assets, "clip_bpe_file", no_second_build)
    assert offline_clip_tokenizer()("a photo of a cat").input_ids == A_PHOTO_OF_A_CAT


def test_vocabulary_layout(tokenizer):
    """OpenAI's order: 256 byte symbols (printable Latin-1 first), their ``</w>`` forms, merges, specials."""
    vocab = tokenizer.get_vocab()
    assert (vocab["!"], vocab["Ā"], vocab["!</w>"], vocab["Ā</w>"]) == (0, 188, 256, 444)
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (49406, 49407)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    ids = tokenizer("Hello, Wörld! 123").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello , wörld ! 1 2 3"


def test_tokenize_pads_and_truncates_to_77(tokenizer):
    ids = tokenize(tokenizer, ["a photo of a cat", "cat " * 100])
    assert ids.shape == (2, CLIP_MAX_LENGTH) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0, :7], A_PHOTO_OF_A_CAT)
    assert (ids[0, 7:] == 49407).all()
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and (ids[1, 1:-1] == 2368).all()
    assert tokenize(tokenizer, "a photo of a cat").shape == (1, CLIP_MAX_LENGTH)


def test_load_tokenizer_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "pipeline" / "tokenizer_2")
    loaded = load_tokenizer(tmp_path / "pipeline", subfolder="tokenizer_2")
    assert len(loaded) == CLIP_VOCAB_SIZE and loaded.model_max_length == CLIP_MAX_LENGTH
    assert loaded("a photo of a cat").input_ids == A_PHOTO_OF_A_CAT


def _copy_of_cache(tokenizer, folder):
    shutil.copytree(tokenizer_cache_dir(), folder)
    return folder


def test_truncated_vocab_gives_clear_error(tokenizer, tmp_path):
    folder = _copy_of_cache(tokenizer, tmp_path / "tok")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    (folder / "vocab.json").write_text(json.dumps(dict(list(vocab.items())[:1000])), encoding="utf-8")
    with pytest.raises(TokenizerError, match=f"cannot load a CLIP tokenizer from {folder}: .*out of vocabulary"):
        load_tokenizer(folder)


def test_missing_vocab_files_give_clear_error(tokenizer, tmp_path):
    """With its tokenizer_config.json but without vocab.json/merges.txt, transformers 5 builds a 3-token
    tokenizer and raises nothing."""
    folder = _copy_of_cache(tokenizer, tmp_path / "tok")
    (folder / "vocab.json").unlink()
    (folder / "merges.txt").unlink()
    assert len(CLIPTokenizer.from_pretrained(str(folder))) < 10
    with pytest.raises(TokenizerError, match=r"has \d+ tokens, expected 49408: vocab.json / merges.txt are missing"):
        load_tokenizer(folder)


def test_unreadable_vocab_gives_clear_error(tokenizer, tmp_path):
    folder = _copy_of_cache(tokenizer, tmp_path / "tok")
    (folder / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="cannot load a CLIP tokenizer from"):
        load_tokenizer(folder)


def test_missing_max_length_is_rejected(tokenizer, tmp_path):
    folder = _copy_of_cache(tokenizer, tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["model_max_length"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="model_max_length"):
        load_tokenizer(folder)


def test_hub_id_is_rejected():
    with pytest.raises(HubIdError):
        load_tokenizer("openai/clip-vit-large-patch14")
