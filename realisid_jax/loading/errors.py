"""Errors raised while locating or importing checkpoints."""

from __future__ import annotations


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model: lists every missing, unexpected and wrong-shape key.

    Attributes:
      missing: torch keys the model needs that the checkpoint lacks.
      unexpected: checkpoint keys the model has no place for.
      wrong_shape: ``(key, checkpoint_shape, expected_torch_shape)`` triples.
    """

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]]):
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape
        lines = [f"checkpoint {source} does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        for key, got, want in wrong_shape:
            lines.append(f"  wrong shape: {key}: checkpoint {tuple(got)}, model expects {tuple(want)}")
        super().__init__("\n".join(lines))


class LoraError(ValueError):
    """A LoRA file does not fit the models: its unknown or unmatched keys, incomplete pairs and misfit shapes,
    all in one line; nothing was merged."""
