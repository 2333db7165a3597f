"""CLIP tokenizers (host side): a checkpoint's ``tokenizer/`` folder, or the standard vocabulary built offline.

transformers 5 builds a 2-token ``CLIPTokenizer`` without complaint when its vocabulary files are missing or
were passed the wrong way (and, with the hub offline, for a hub id); every loader here therefore checks the
vocabulary size. The offline tokenizer is OpenAI CLIP's (``SimpleTokenizer``): vocabulary and merges come from
``bpe_simple_vocab_16e6.txt.gz`` out of the ``open_clip_torch`` wheel (``realisid_jax.assets``).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer

from realisid_jax import assets
from realisid_jax.folders import resolve_folder

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Pad token of each text encoder's tokenizer in stabilityai/stable-diffusion-xl-base-1.0 (``tokenizer/`` pads
# with the end token, ``tokenizer_2/`` with "!"); SD 1.5 has only the first.
STANDARD_PAD_TOKENS = (EOS, "!")
# OpenAI's SimpleTokenizer keeps lines 1 .. 49152-256-2 of the BPE file (line 0 is a version header): 48,894
# merges, so that 256 bytes + 256 word-final bytes + merges + 2 specials = 49,408 entries.
_NUM_MERGES = 49152 - 256 - 2


class TokenizerError(ValueError):
    """A tokenizer folder did not give the 49,408-entry, 77-token CLIP tokenizer."""


def load_tokenizer(folder: str | os.PathLike, *, subfolder: str | None = None) -> CLIPTokenizer:
    """``CLIPTokenizer.from_pretrained`` of a local folder (``vocab.json`` + ``merges.txt``, or
    ``tokenizer.json``), e.g. a diffusers pipeline's ``tokenizer/`` or ``tokenizer_2/``.

    Raises:
      HubIdError / FileNotFoundError / NotADirectoryError: ``folder`` is not a local folder.
      TokenizerError: the files could not be read, the vocabulary does not have 49,408 entries (missing or
        broken ``vocab.json``), or ``model_max_length`` is not 77.
    """
    path = resolve_folder(folder)
    path = resolve_folder(path / subfolder) if subfolder else path
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers/tokenizers raise many error types for unreadable files
        raise TokenizerError(f"cannot load a CLIP tokenizer from {path}: {e}") from e
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise TokenizerError(
            f"the CLIP tokenizer in {path} has {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}: vocab.json / "
            f"merges.txt are missing or broken (folder holds {sorted(p.name for p in path.iterdir())})")
    if tokenizer.model_max_length != CLIP_MAX_LENGTH:
        raise TokenizerError(f"the CLIP tokenizer in {path} has model_max_length {tokenizer.model_max_length}, "
                             f"expected {CLIP_MAX_LENGTH} (tokenizer_config.json missing or wrong)")
    return tokenizer


def tokenizer_cache_dir() -> Path:
    """Folder of the offline tokenizer: ``$REALISID_CACHE/clip_tokenizer`` (default ``~/.cache/realisid_jax``)."""
    return assets.cache_dir() / "clip_tokenizer"


def offline_clip_tokenizer() -> CLIPTokenizer:
    """The standard CLIP tokenizer (``openai/clip-vit-large-patch14``'s vocabulary; pad = ``<|endoftext|>``),
    built once into ``tokenizer_cache_dir()`` from the BPE file, no model hub needed.

    Raises:
      assets.AssetError: the BPE file could not be fetched. TokenizerError: the cached folder is broken
        (delete it to rebuild).
    """
    folder = tokenizer_cache_dir()
    if not (folder / "tokenizer_config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed, so a concurrent or interrupted build never leaves a
        # half-written folder in place.
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".clip_tokenizer-"))
        try:
            write_clip_tokenizer_files(assets.clip_bpe_file(), tmp)
            os.chmod(tmp, 0o755)
            tmp.rename(folder)
        except OSError:
            if not (folder / "tokenizer_config.json").is_file():  # not a lost race with another builder
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(folder)


def standard_tokenizers(count: int, pad_tokens: Sequence[str] | None = None) -> tuple[CLIPTokenizer, ...]:
    """The tokenizers of a base that carries none (a Stability single file; a ``realisid convert`` cache records
    its source's pad tokens): ``offline_clip_tokenizer`` once per text encoder, each padding with its entry of
    ``pad_tokens``, default ``STANDARD_PAD_TOKENS`` (SD 1.5's, SDXL's two).

    Raises:
      ValueError: ``pad_tokens`` has another length than ``count``, or a token the vocabulary lacks.
    """
    pad_tokens = STANDARD_PAD_TOKENS[:count] if pad_tokens is None else tuple(pad_tokens)
    if len(pad_tokens) != count:
        raise ValueError(f"{len(pad_tokens)} pad tokens {pad_tokens} for {count} text encoders")
    tokenizers = []
    for pad in pad_tokens:
        tokenizer = offline_clip_tokenizer()
        if tokenizer.convert_tokens_to_ids(pad) == tokenizer.unk_token_id and pad != tokenizer.unk_token:
            raise ValueError(f"pad token {pad!r} is not in the CLIP vocabulary")
        tokenizer.pad_token = pad
        tokenizers.append(tokenizer)
    return tuple(tokenizers)


def write_clip_tokenizer_files(bpe_file: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Writes ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of the CLIP tokenizer into ``folder``.

    Args:
      bpe_file: OpenAI's ``bpe_simple_vocab_16e6.txt.gz``.
      folder: an existing folder.
    """
    with gzip.open(bpe_file, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    byte_symbols = list(_bytes_to_unicode().values())
    symbols = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    config = dict(tokenizer_class="CLIPTokenizer", model_max_length=CLIP_MAX_LENGTH, bos_token=BOS,
                  eos_token=EOS, unk_token=EOS, pad_token=EOS, do_lower_case=True, errors="replace")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table: the printable Latin-1 bytes map to themselves and come
    first, then the other 68 bytes map to code points 256.. in byte order. This insertion order is the order of
    the vocabulary's first 256 entries."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def tokenize(tokenizer: CLIPTokenizer, prompts: str | Sequence[str], *,
             max_length: int | None = None) -> np.ndarray:
    """Token ids of ``prompts``, each wrapped in ``<|startoftext|>`` … ``<|endoftext|>``, padded with the
    tokenizer's pad token and truncated to ``max_length`` (default ``model_max_length``, 77), as diffusers'
    pipelines tokenise.

    Returns:
      (B, max_length) int32.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                    truncation=True, return_tensors="np").input_ids
    return ids.astype(np.int32)
