"""Multi-person evaluation: which generated face is which reference person.

Greedy assignment by identity similarity: repeatedly take the most similar (generated face, reference)
pair among those not yet assigned. A reference left without a face is "unmatched" (counted as a miss, its
identity similarity undefined); a generated face left over is an extra face. Greedy rather than optimal
(Hungarian) assignment is what the evaluation of multi-person identity methods usually does and is
optimal whenever each person's best match is unambiguous.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Matching:
    """Result of ``match_faces``.

    Attributes:
      pairs: ``(generated index, reference index)`` in the order they were taken (most similar first).
      unmatched_references: reference indices without a face, ascending.
      unmatched_generated: generated-face indices assigned to nobody, ascending.
    """

    pairs: tuple[tuple[int, int], ...]
    unmatched_references: tuple[int, ...]
    unmatched_generated: tuple[int, ...]

    def face_of(self, reference: int) -> int | None:
        """The generated face matched to ``reference``, or ``None``."""
        return next((g for g, r in self.pairs if r == reference), None)


def match_faces(similarity: np.ndarray, *, min_similarity: float | None = None) -> Matching:
    """Greedy one-to-one matching of generated faces (rows) to references (columns).

    Args:
      similarity: (G, R) float, e.g. ``identity.cosine_matrix``; G or R may be 0. NaN entries never match.
      min_similarity: pairs below this are not matched (default: any similarity matches).

    Returns:
      ``Matching``. Ties go to the lower (generated, reference) index, so the result is deterministic.

    Raises:
      ValueError: ``similarity`` is not 2-D.
    """
    s = np.asarray(similarity, np.float64)
    if s.ndim != 2:
        raise ValueError(f"similarity must be (generated, references), got shape {s.shape}")
    g_count, r_count = s.shape
    order = sorted(((-s[g, r], g, r) for g in range(g_count) for r in range(r_count) if np.isfinite(s[g, r])))
    used_g, used_r, pairs = set(), set(), []
    for neg, g, r in order:
        if min_similarity is not None and -neg < min_similarity:
            break
        if g not in used_g and r not in used_r:
            pairs.append((g, r))
            used_g.add(g)
            used_r.add(r)
    return Matching(tuple(pairs), tuple(r for r in range(r_count) if r not in used_r),
                    tuple(g for g in range(g_count) if g not in used_g))
