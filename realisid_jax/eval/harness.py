"""Scores generated images against their reference persons: one ``PersonResult`` row per (image, person).

Per image: find every face (``FaceAnalyzer``, policy "all"); embed the generated faces and the references
with the identity embedder; match faces to references greedily (``matching``); for each matched pair
compute identity similarity, CLIP-I, and the pose and expression errors against the person's pose target
(the pose photo when given, else the reference, as RealisID's c_pe); CLIP-T and ASP (aesthetic score) once
per image, from one CLIP embedding of the whole image, even when it shows no face. An image
without a face, or a person left unmatched, still gives rows (``face_found`` / ``matched`` false, metrics
NaN) so that misses are counted, never dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from realisid_jax.eval.aesthetic import AestheticScorer
from realisid_jax.eval.clip_score import ClipScorer
from realisid_jax.eval.identity import FaceEmbedder, cosine_matrix, is_fallback
from realisid_jax.eval.manifest import ManifestEntry, ManifestPerson
from realisid_jax.eval.matching import match_faces
from realisid_jax.eval.pose import pose_expression_error
from realisid_jax.eval.report import face_size_bucket, is_small_face
from realisid_jax.face.analysis import Face, FaceAnalyzer
from realisid_jax.face.errors import FaceError
from realisid_jax.face.image import load_image

NAN = float("nan")


@dataclasses.dataclass
class PersonResult:
    """One (generated image, reference person) row of the report; NaN where a metric is undefined.

    ``face_found``: the generated image holds at least one face. ``matched``: one of them was assigned to
    this person. ``face_fraction``: longer side of the requested box (else of the matched face's landmark
    box) over the image's longer edge; ``bucket``/``small_face`` follow from it (``report``).
    ``identity_is_fallback``: the identity column comes from the CLIP fallback, not a face-recognition
    model. ``asp``: aesthetic score of the whole image (NaN without a predictor), ``aesthetic_predictor``
    its label ("" without one). ``error``: why a row could not be scored (unreadable file, no face in the reference).
    """

    image_id: str
    image: str
    prompt: str
    person: int
    identity: str
    reference: str
    identity_embedder: str
    identity_is_fallback: bool
    face_found: bool
    faces_in_image: int
    extra_faces: int
    matched: bool
    identity_similarity: float = NAN
    clip_i: float = NAN
    clip_t: float = NAN
    asp: float = NAN
    aesthetic_predictor: str = ""
    yaw_error: float = NAN
    pitch_error: float = NAN
    roll_error: float = NAN
    pose_error: float = NAN
    expression_error: float = NAN
    face_fraction: float = NAN
    bucket: str = ""
    small_face: bool | None = None
    generated_box: tuple[float, ...] | None = None
    requested_box: tuple[float, ...] | None = None
    seed: int | None = None
    error: str = ""

    def as_dict(self) -> dict:
        """JSON-ready: NaN becomes ``None``."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True, eq=False)
class _Analysed:
    image: np.ndarray | None
    face: Face | None
    error: str


class Evaluator:
    """Scores manifest entries.

    Args:
      embedder: the identity ``FaceEmbedder`` (FaceNet, or the CLIP fallback, or any other).
      clip: optional ``ClipScorer`` for CLIP-I (and CLIP-T when it has a text model).
      aesthetic: optional ``AestheticScorer`` for ASP, on ``clip``'s whole-image embeddings.
      analyzer: face analysis (default ``FaceAnalyzer(policy="all")``).
      min_similarity: generated faces less similar than this to every free reference stay unmatched.

    Raises:
      ValueError: ``aesthetic`` without ``clip``, or ``clip``'s embedding width is not the predictor's input.
    """

    def __init__(self, embedder: FaceEmbedder, clip: ClipScorer | None = None, *,
                 aesthetic: AestheticScorer | None = None, analyzer: FaceAnalyzer | None = None,
                 min_similarity: float | None = None):
        if aesthetic is not None:
            _check_aesthetic(aesthetic, clip)
        self.embedder = embedder
        self.clip = clip
        self.aesthetic = aesthetic
        self.analyzer = analyzer or FaceAnalyzer(policy="all")
        self.min_similarity = min_similarity
        self._references: dict[str, _Analysed] = {}
        self._embeds: dict[tuple[str, str], np.ndarray] = {}

    def reference(self, path: str) -> _Analysed:
        """The largest face of a reference / pose photo, analysed once per path."""
        if path not in self._references:
            try:
                image = load_image(path)
                face = self.analyzer.analyze(image, policy="largest", source=path)[0]
                self._references[path] = _Analysed(image, face, "")
            except FaceError as err:
                self._references[path] = _Analysed(None, None, str(err))
        return self._references[path]

    def _reference_embed(self, kind: str, path: str) -> np.ndarray:
        """(1, D) identity ("id") or CLIP-I ("clip") vector of a reference face, computed once per path."""
        if (kind, path) not in self._embeds:
            ref = self.reference(path)
            embed = self.embedder.embed if kind == "id" else self.clip.face_embeds
            self._embeds[kind, path] = embed(ref.image, [ref.face])
        return self._embeds[kind, path]

    def faces(self, image: np.ndarray, source: str) -> list[Face]:
        """All faces of a generated image, largest first; [] when there is none (never raises for that)."""
        try:
            return self.analyzer.analyze(image, policy="all", source=source)
        except FaceError:
            return []

    def evaluate(self, entry: ManifestEntry) -> list[PersonResult]:
        """The rows of one generated image (one per person; one row with ``person=-1`` for no persons)."""
        base = dict(image_id=entry.id, image=entry.image, prompt=entry.prompt, seed=entry.seed,
                    identity_embedder=self.embedder.label, identity_is_fallback=is_fallback(self.embedder.label),
                    aesthetic_predictor="" if self.aesthetic is None else self.aesthetic.label)
        try:
            image = load_image(entry.image)
        except FaceError as err:
            return [PersonResult(**base, **_person_fields(p, k), face_found=False, faces_in_image=0, extra_faces=0,
                                 matched=False, error=str(err)) for k, p in _persons_or_none(entry)]
        faces = self.faces(image, entry.image)
        clip_t, asp = self._image_scores(entry.prompt, image)
        refs = [self.reference(p.reference) for p in entry.persons]
        usable = [k for k, r in enumerate(refs) if r.face is not None]
        similarity = np.full((len(faces), len(entry.persons)), np.nan)
        if faces and usable:
            generated = self.embedder.embed(image, faces)
            for k in usable:
                reference = self._reference_embed("id", entry.persons[k].reference)
                similarity[:, k] = cosine_matrix(generated, reference)[:, 0]
        matching = match_faces(similarity, min_similarity=self.min_similarity)
        rows = []
        for k, person in _persons_or_none(entry):
            row = PersonResult(**base, **_person_fields(person, k), face_found=bool(faces), faces_in_image=len(faces),
                               extra_faces=len(matching.unmatched_generated), matched=False, clip_t=clip_t, asp=asp)
            if person is not None and refs[k].face is None:
                row.error = refs[k].error
            g = matching.face_of(k) if person is not None else None
            if g is not None:
                self._score_pair(row, image, faces[g], person, refs[k], float(similarity[g, k]))
            _size(row, image.shape, None if g is None else faces[g])
            rows.append(row)
        return rows

    def _image_scores(self, prompt: str, image: np.ndarray) -> tuple[float, float]:
        """(CLIP-T, ASP) of a whole generated image, NaN where the model is absent; one CLIP embedding."""
        has_text = self.clip is not None and self.clip.has_text
        if not has_text and self.aesthetic is None:
            return NAN, NAN
        embed = self.clip.image_embeds([image])
        clip_t = self.clip.clip_t(prompt, embed[0]) if has_text else NAN
        asp = float(self.aesthetic.score(embed)[0]) if self.aesthetic is not None else NAN
        return clip_t, asp

    def _score_pair(self, row: PersonResult, image: np.ndarray, face: Face, person: ManifestPerson,
                    ref: _Analysed, similarity: float) -> None:
        row.matched = True
        row.identity_similarity = similarity
        row.generated_box = tuple(float(v) for v in face.box)
        if self.clip is not None:
            reference = self._reference_embed("clip", person.reference)[0]
            row.clip_i = float(self.clip.face_embeds(image, [face])[0] @ reference)
        target = ref if person.pose is None else self.reference(person.pose)
        if target.face is None:
            row.error = target.error
            return
        errors = pose_expression_error(face.landmarks, target.face.landmarks)
        row.yaw_error, row.pitch_error, row.roll_error = errors.yaw, errors.pitch, errors.roll
        row.pose_error, row.expression_error = errors.pose, errors.expression

    def evaluate_all(self, entries: Sequence[ManifestEntry], *, progress=None) -> list[PersonResult]:
        """Rows of every entry, in manifest order; ``progress(i, n, entry)`` is called before each image."""
        rows = []
        for i, entry in enumerate(entries):
            if progress is not None:
                progress(i, len(entries), entry)
            rows.extend(self.evaluate(entry))
        return rows


def _check_aesthetic(aesthetic: AestheticScorer, clip: ClipScorer | None) -> None:
    if clip is None:
        raise ValueError("the aesthetic score needs a CLIP vision model (--clip-vision): it scores the CLIP "
                         "image embedding of the whole image")
    width = clip.vision_model.config.projection_dim
    if width != aesthetic.input_size:
        raise ValueError(f"{aesthetic.label} takes {aesthetic.input_size}-d CLIP image embeddings but "
                         f"{clip.label} gives {width}-d ones: pass the CLIP model the predictor was trained on "
                         "(LAION's: OpenAI ViT-L/14, 768-d)")


def _persons_or_none(entry: ManifestEntry):
    return list(enumerate(entry.persons)) or [(-1, None)]


def _person_fields(person: ManifestPerson | None, k: int) -> dict:
    if person is None:
        return dict(person=-1, identity="", reference="", requested_box=None)
    return dict(person=k, identity=person.name, reference=person.reference, requested_box=person.box)


def _size(row: PersonResult, shape: tuple[int, ...], face: Face | None) -> None:
    """Face size from the requested box (the experiment's setting), else from the matched face."""
    box = row.requested_box if row.requested_box is not None else (None if face is None else face.box)
    if box is None:
        return
    row.face_fraction = float(max(box[2] - box[0], box[3] - box[1]) / max(shape[:2]))
    row.bucket = face_size_bucket(row.face_fraction)
    row.small_face = is_small_face(row.face_fraction)
