"""``realisid sample-batch --requests FILE.jsonl --out DIR``: many requests, batched over every device of every
process, resumable.

One JSON request per line (``parse_request`` lists the fields). Every request is checked (fields, sizes, boxes,
every photo analysed) before any model loads; a bad one is one ``error:`` line naming its line, exit 2, nothing
written. Requests are grouped by compiled shape (size, person bucket, steps, scheduler; ``realisid.batch``),
each group compiles once and its images fill device batches of ``--batch-size`` split over the data axes of the
mesh. Each image is written once, by the process whose devices hold it, as ``DIR/images/<id>-<j>.png`` (through
a temporary file renamed into place) with its generation record (``realisid sample --from-png`` re-runs it);
``DIR/manifest.jsonl`` lists the images made. A re-run of the same command skips the images already there;
SIGTERM finishes the current batch and exits 0. Multi-host: the start-up of ``realisid train``
(``realisid_jax.training.distributed``: ``REALISID_DISTRIBUTED=1`` or ``JAX_COORDINATOR_ADDRESS``, ...).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from realisid_jax.commands.weights import add_weight_arguments, build_pipeline, enable_compilation_cache
from realisid_jax.errors import one_line

MANIFEST = "manifest.jsonl"
IMAGES = "images"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_FIELDS = ("id", "prompt", "negative_prompt", "persons", "seed", "height", "width", "num_inference_steps",
           "scheduler", "text_guidance_scale", "id_guidance_scale", "id_start_fraction", "num_images")
_PERSON_FIELDS = ("photo", "box", "pose")


class RequestError(ValueError):
    """A request line that cannot be run; the message names the file and the line."""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``sample-batch`` subcommand; its handler is ``args.func(args) -> int``."""
    p = subparsers.add_parser("sample-batch", help="sample a file of requests on every device, resumable",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/sdxl.py:tiny", help="config file (default: configs/sdxl.py:tiny)")
    p.add_argument("--requests", required=True, type=Path, help="JSON lines file, one request per line")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder (images/, manifest.jsonl); an earlier run's images there are kept and skipped")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per device batch, a multiple of the mesh's batch shards (default: one per shard)")
    add_weight_arguments(p)
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------------------------------------ requests
def parse_request(fields: dict, *, line: int, folder: Path):
    """A ``SampleRequest`` from one JSON object. Fields (all but ``prompt`` optional; ``null`` = the config's
    ``sampling`` default): ``id`` (letters, digits, ``._+-``; default ``line<N>``), ``prompt``,
    ``negative_prompt``, ``persons`` (list of ``{"photo": path, "box": [x0, y0, x1, y1], "pose": path}``, paths
    relative to the request file's folder, ``pose`` optional), ``seed``, ``height``, ``width``,
    ``num_inference_steps``, ``scheduler``, ``text_guidance_scale`` (λ_t), ``id_guidance_scale`` (λ_i),
    ``id_start_fraction``, ``num_images`` (default 1).

    Raises:
      ValueError: an unknown or ill-typed field (the message names it).
    """
    from realisid_jax.realisid.batch import SampleRequest
    from realisid_jax.realisid.conditions import Person
    from realisid_jax.schedulers import SCHEDULERS

    if not isinstance(fields, dict):
        raise ValueError(f"a request is a JSON object, got {type(fields).__name__}")
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; a request has {', '.join(_FIELDS)}")
    get = {k: fields.get(k) for k in _FIELDS}
    request_id = _typed(get, "id", str) or f"line{line}"
    if not _ID.fullmatch(request_id):
        raise ValueError(f"id {request_id!r} must be letters, digits and ._+- (it names the image files)")
    if not isinstance(get["prompt"], str):
        raise ValueError("prompt must be a string")
    for name in ("seed", "height", "width", "num_inference_steps", "num_images"):
        value = _typed(get, name, int)
        if value is not None and (value < (0 if name == "seed" else 1) or value > 2**63 - 1):
            raise ValueError(f"{name} {value} is out of range")
    for name in ("text_guidance_scale", "id_guidance_scale", "id_start_fraction"):
        value = _typed(get, name, (int, float))
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be finite")
    if get["id_start_fraction"] is not None and not 0 <= get["id_start_fraction"] <= 1:
        raise ValueError(f"id_start_fraction {get['id_start_fraction']} is not between 0 and 1")
    if _typed(get, "scheduler", str) is not None and get["scheduler"] not in SCHEDULERS:
        raise ValueError(f"scheduler {get['scheduler']!r} is not one of {', '.join(sorted(SCHEDULERS))}")
    _typed(get, "negative_prompt", str)
    persons = []
    for k, person in enumerate(get["persons"] or []):
        if not isinstance(person, dict) or set(person) - set(_PERSON_FIELDS) or "photo" not in person:
            raise ValueError(f"person {k + 1} must be an object with photo, box and optional pose")
        box = person.get("box")
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise ValueError(f"person {k + 1}: box must be [x0, y0, x1, y1] (four numbers, output pixels)")
        pose = person.get("pose")
        persons.append(Person(str(folder / person["photo"]), tuple(float(v) for v in box),
                              None if pose is None else str(folder / pose)))
    return SampleRequest(id=request_id, prompt=get["prompt"], persons=tuple(persons),
                         negative_prompt=get["negative_prompt"], seed=get["seed"], height=get["height"],
                         width=get["width"], num_inference_steps=get["num_inference_steps"],
                         scheduler=get["scheduler"], text_guidance_scale=_float(get["text_guidance_scale"]),
                         id_guidance_scale=_float(get["id_guidance_scale"]),
                         id_start_fraction=_float(get["id_start_fraction"]),
                         num_images=1 if get["num_images"] is None else get["num_images"], line=line)


def _typed(fields: dict, name: str, kind):
    value = fields[name]
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "number"
        raise ValueError(f"{name} must be a {'string' if kind is str else names}, got {json.dumps(value)}")
    return value


def _float(value) -> float | None:
    return None if value is None else float(value)


def read_requests(path: Path, config) -> list:
    """The requests of a JSON lines file (blank lines skipped), config defaults filled in.

    Raises:
      RequestError: unreadable file, no request, bad JSON or field, or a repeated id; naming the line.
    """
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RequestError(f"--requests {path}: {getattr(err, 'strerror', None) or err}") from None
    requests, seen = [], {}
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            request = parse_request(json.loads(text), line=n, folder=path.parent).with_defaults(config.sampling)
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            raise RequestError(f"{path} line {n}: {err}") from None
        if request.id in seen:
            raise RequestError(f"{path} line {n}: id {request.id!r} is already used on line {seen[request.id]}")
        seen[request.id] = n
        requests.append(request)
    if not requests:
        raise RequestError(f"{path} holds no request")
    return requests


class Conditions:
    """Prepared persons per request (``pipeline.prepare_conditions``), analysed once per distinct set of photos,
    boxes and size, and kept for the last ``keep`` sets (reference crops are large at SDXL size)."""

    def __init__(self, config, analyzer=None, keep: int = 256):
        from realisid_jax.realisid.pipeline import reference_analyzer

        self.config, self.keep = config, keep
        self.analyzer = analyzer or reference_analyzer(config)
        self._cache: OrderedDict = OrderedDict()

    def __call__(self, request):
        """The request's ``PersonConditions``. Raises the ``prepare_conditions`` errors."""
        from realisid_jax.realisid.pipeline import prepare_conditions

        key = (request.height, request.width, tuple((_photo_key(p.reference), tuple(p.box), _photo_key(p.pose))
                                                    for p in request.persons))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        conditions = prepare_conditions(self.config, list(request.persons), request.height, request.width,
                                        self.analyzer)
        self._cache[key] = conditions
        if len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return conditions

    def check(self, requests: Sequence, path: Path | str | None = None) -> None:
        """Prepares every request's persons (size, boxes, person count, a usable face in every photo).

        Raises:
          RequestError: naming the request's line of ``path`` (without ``path``: the request's id).
        """
        for request in requests:
            try:
                self(request)
            except (ValueError, OSError) as err:  # the face and condition errors are ValueErrors
                where = f"request {request.id}" if path is None else f"{path} line {request.line}"
                raise RequestError(f"{where}: {one_line(err)}") from None


def _photo_key(photo):
    # A file by its path, an in-memory photo (numpy array, unhashable) by identity: it lives as long as its request.
    return None if photo is None else str(photo) if isinstance(photo, (str, Path)) else id(photo)


# ---------------------------------------------------------------------------------------------------- plan
def plan_groups(requests: Sequence, max_persons: int) -> OrderedDict:
    """GroupKey -> [(request, image index)], groups in order of their first request, images in request order."""
    from realisid_jax.realisid.batch import group_key

    groups: OrderedDict = OrderedDict()
    for request in requests:
        groups.setdefault(group_key(request, max_persons), []).extend((request, j) for j in range(request.num_images))
    return groups


def finished(out: Path, names: Sequence[str]) -> np.ndarray:
    """(len(names),) bool: the images some process has already written (``images/<name>.png`` on its file
    system; OR-ed over the processes, so all agree on what is left)."""
    import jax

    done = np.array([(out / IMAGES / f"{name}.png").is_file() for name in names], bool)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        done = np.any(multihost_utils.process_allgather(done), axis=0)
    return done


@dataclasses.dataclass
class Summary:
    """What a run did: images ``made`` by all processes, ``skipped`` (already there), ``compiles`` (groups
    compiled), ``compile_seconds``, ``seconds`` (wall time of the sampling loop), per group the images made,
    ``stopped`` (SIGTERM)."""

    made: int = 0
    skipped: int = 0
    compiles: int = 0
    compile_seconds: float = 0.0
    seconds: float = 0.0
    per_group: dict = dataclasses.field(default_factory=dict)
    stopped: bool = False

    def line(self) -> str:
        rate = self.made / max(self.seconds - self.compile_seconds, 1e-9)
        groups = ", ".join(f"{k}: {n}" for k, n in self.per_group.items()) or "none"
        return (f"{self.made} images in {self.seconds:.1f} s ({rate:.2f} images/s after {self.compile_seconds:.1f} s "
                f"compiling {self.compiles} group(s)); {self.skipped} already there; per group: {groups}")


def sample_requests(pipeline, requests: Sequence, out: Path, *, conditions: Conditions, batch_size: int,
                    record: Callable | None = None, progress: bool = True) -> Summary:
    """Samples every image of ``requests`` not yet in ``out/images`` and writes it with its record.

    Args:
      pipeline: a ``RealisIDPipeline`` (its mesh spans the devices to use).
      requests: ``SampleRequest``s with defaults filled in, checked (``Conditions.check``).
      conditions: the prepared persons of each request.
      batch_size: images per device batch (``check_batch_size``).
      record: ``(request, conditions, index) -> Generation`` for the image's PNG record; None writes none.

    Returns:
      ``Summary``; ``stopped`` when SIGTERM ended the run after a batch.

    Raises:
      OSError: an image could not be written (e.g. a full disk); the images written so far are kept, whole.
    """
    import jax
    from tqdm.auto import tqdm

    from realisid_jax.realisid.batch import BatchSampler, Row
    from realisid_jax.training.preemption import PreemptionGuard

    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    groups = plan_groups(requests, pipeline.config.realisid.max_persons)
    todo, already = OrderedDict(), []
    for key, images in groups.items():
        done = finished(out, [r.image_name(j) for r, j in images])
        todo[key] = [image for image, d in zip(images, done) if not d]
        already += [image for image, d in zip(images, done) if d]
    summary = Summary(skipped=len(already))
    main = jax.process_index() == 0
    if main:
        _rewrite_manifest(out, already)
    batches = [(key, images[i:i + batch_size]) for key, images in todo.items()
               for i in range(0, len(images), batch_size)]
    sampler = BatchSampler(pipeline, batch_size)

    def host(batch):
        key, images = batch
        rows = [Row(r, conditions(r), j) for r, j in images]
        return sampler.host_inputs(key, rows), rows

    start = time.perf_counter()
    total = sum(len(images) for _, images in batches)
    with (PreemptionGuard() as guard, concurrent.futures.ThreadPoolExecutor(1) as pool,
          tqdm(total=total, unit="img", desc="sample-batch", disable=not (progress and main)) as bar):
        pending = pool.submit(host, batches[0]) if batches else None
        for n, (key, images) in enumerate(batches):
            inputs, rows = pending.result()
            result = sampler.run(key, inputs)
            if n + 1 < len(batches):  # the next batch's photos and prompts are prepared while the devices work
                pending = pool.submit(host, batches[n + 1])
            _write_held(out, result, rows, record)
            summary.made += len(images)
            summary.per_group[str(key)] = summary.per_group.get(str(key), 0) + len(images)
            bar.update(len(images))
            stop = guard.requested()  # collective: after every process's writes, so the manifest lines are true
            if main:
                _append_manifest(out, images)
            if stop:
                summary.stopped = True
                break
    summary.compiles = len(sampler.compile_seconds)
    summary.compile_seconds = sum(sampler.compile_seconds.values())
    summary.seconds = time.perf_counter() - start
    return summary


def _write_held(out: Path, images_array, rows: Sequence, record) -> None:
    """Writes the rows of ``images_array`` whose first copy is on this process's devices (padding rows and
    replicas are skipped), each whole or not at all."""
    from PIL import Image

    from realisid_jax.app.metadata import png_info
    from realisid_jax.commands.sample import _write_pngs

    for shard in images_array.addressable_shards:
        if shard.replica_id != 0:
            continue
        held = range(*shard.index[0].indices(images_array.shape[0])) if shard.index else range(images_array.shape[0])
        data = None
        for offset, row in enumerate(held):
            if row >= len(rows):
                continue
            data = np.asarray(shard.data) if data is None else data
            r = rows[row]
            info = None if record is None else png_info(record(r.request, r.conditions, r.index))
            _write_pngs(out / IMAGES, [(f"{r.request.image_name(r.index)}.png", Image.fromarray(data[offset]), info)])


def _entry(request, index: int) -> dict:
    return {"image": f"{IMAGES}/{request.image_name(index)}.png", "id": request.image_name(index),
            "request": request.id, "line": request.line, "index": index, "seed": request.seed,
            "prompt": request.prompt}


def _rewrite_manifest(out: Path, images: Sequence) -> None:
    """``manifest.jsonl`` anew, atomically, for the ``(request, index)`` images already made (a line that a kill
    cut short, or one of an image not there, is dropped)."""
    import os
    import tempfile

    lines = [json.dumps(_entry(r, j)) + "\n" for r, j in images]
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".jsonl.tmp")
    with os.fdopen(fd, "w") as f:
        f.writelines(lines)
    os.replace(tmp, out / MANIFEST)


def _append_manifest(out: Path, images: Sequence) -> None:
    with open(out / MANIFEST, "a") as f:
        f.writelines(json.dumps(_entry(r, j)) + "\n" for r, j in images)


def check_batch_size(batch_size: int | None, mesh, rules) -> int:
    """``batch_size`` (default: the mesh's batch shards, one image per shard), checked.

    Raises:
      RequestError: not a positive multiple of the batch shards (the batch would be replicated, not split).
    """
    from realisid_jax.sharding import batch_shards

    shards = batch_shards(mesh, rules)
    if batch_size is None:
        return shards
    if batch_size < 1 or batch_size % shards:
        raise RequestError(f"--batch-size {batch_size} must be a positive multiple of {shards}, the mesh's batch "
                           f"shards; pass --batch-size {shards * max(1, math.ceil(batch_size / shards))}")
    return batch_size


def generation_recorder(args, config) -> Callable:
    """``(request, conditions, index) -> Generation``: the record of one image (``app.metadata``)."""
    from realisid_jax.app.metadata import WEIGHT_FLAGS, Generation, person_photos, pixel_boxes

    photos: OrderedDict = OrderedDict()

    def record(request, conditions, index: int):
        if request.id not in photos:
            photos[request.id] = person_photos(request.persons)
            if len(photos) > 64:
                photos.popitem(last=False)
        references, poses = photos[request.id]
        return Generation(
            prompt=request.prompt, negative_prompt=request.negative_prompt, seed=request.seed,
            boxes=pixel_boxes(conditions.boxes, conditions.valid, request.height, request.width),
            steps=request.num_inference_steps, scheduler=request.scheduler,
            text_guidance_scale=request.text_guidance_scale, id_guidance_scale=request.id_guidance_scale,
            id_start_fraction=request.id_start_fraction, height=request.height, width=request.width,
            num_images=request.num_images, config=str(args.config), config_overrides=tuple(args.config_overrides),
            weights={k: getattr(args, k, None) for k in WEIGHT_FLAGS}, image_index=index, references=references,
            poses=poses, rotations=(None,) * len(request.persons))

    return record


def run(args: argparse.Namespace) -> int:
    """Handler of ``realisid sample-batch``: 0 when done or stopped by SIGTERM, 2 for bad requests (before any
    model loads or file is written)."""
    from realisid_jax.training import distributed

    distributed.maybe_initialize()  # before any JAX backend use
    import jax

    from realisid_jax.commands.arguments import check_output_folder
    from realisid_jax.config import load_config
    from realisid_jax.sharding import make_mesh

    config = load_config(args.config, args.config_overrides)
    check_output_folder(args.out)
    try:
        batch_size = check_batch_size(args.batch_size, make_mesh(tuple(config.mesh.shape)), config.mesh.rules)
        requests = read_requests(args.requests, config)
        conditions = Conditions(config)
        conditions.check(requests, args.requests)
    except RequestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out
    groups = plan_groups(requests, config.realisid.max_persons)
    names = [r.image_name(j) for images in groups.values() for r, j in images]
    main = jax.process_index() == 0
    if finished(out, names).all():
        if main:
            print(f"all {len(names)} images of {args.requests} are already in {out}/{IMAGES}")
        return 0
    if main:
        print(f"{len(requests)} requests, {len(names)} images in {len(groups)} group(s); batches of {batch_size} "
              f"over {jax.device_count()} device(s) of {jax.process_count()} process(es)")
    enable_compilation_cache()
    pipeline = build_pipeline(config, args)
    try:
        summary = sample_requests(pipeline, requests, out, conditions=conditions, batch_size=batch_size,
                                  record=generation_recorder(args, config))
    except OSError as err:  # a full disk, a quota: the run failed, not its input
        print(f"error: writing {out}/ failed: {one_line(err)}; the images written so far are whole and kept; "
              f"re-run to finish", file=sys.stderr)
        return 1
    if main:
        print(f"sample-batch: {summary.line()}")
        if summary.stopped:
            print("stopped by SIGTERM after the current batch; re-run the same command to finish")
    return 0
