"""Property-based bad-input campaign (hypothesis): generated argument sets for ``sample``, ``prepare-data``,
``train`` and ``export`` run in-process through ``realisid_jax.cli.main``.

Property: every run either goes through or exits with code 2 and exactly one ``error:`` line on stderr, never a
traceback, and leaves nothing half-written: its output folder is as it was (``prepare-data``: but for its cache
of per-photo analysis results, each written whole, which a corrected re-run reuses; a run that goes through
leaves a summary and no temporary file).

``prepare-data`` runs whole (its face analysis and dataset writing at 64 px take a fraction of a second per
photo). ``sample``, ``train`` and ``export`` stop where their models would be built or their result written: an
input that gets there has passed every check, and generating or training is tested elsewhere (seconds to minutes
per run here). At that point the test checks what the model stage takes for granted (a seed ``jax.random.key``
accepts, a batch of at least one example). ``export`` restores real checkpoints of a one-layer stand-in for the
branches.

Examples are few and derandomised (the same cases each run, a bounded time: ~1 minute on 2 cores). Run with
``-s`` to see how many cases ran and the distinct errors seen.
"""

import collections
import contextlib
import io
import json
import re
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from realisid_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/sdxl.py:tiny"
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

CASES: collections.Counter = collections.Counter()  # command -> generated cases run
OUTCOMES: collections.Counter = collections.Counter()  # "accepted" / "refused"
ERRORS: dict[str, set[str]] = collections.defaultdict(set)  # command -> distinct error messages (paths, numbers
# replaced)


class ModelsReached(Exception):
    """Raised where a command would build its models or write its result: the input was accepted."""


# ----------------------------------------------------------------------------------------------- harness


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print(f"\nbad-input campaign: {sum(CASES.values())} generated cases ({dict(CASES)}), "
          f"{OUTCOMES['accepted']} accepted, {OUTCOMES['refused']} refused; "
          f"{sum(len(v) for v in ERRORS.values())} distinct errors:")
    for command, errors in ERRORS.items():
        for error in sorted(errors):
            print(f"  {command}: {error}")


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths are relative to the repository, as in the README
    # The persistent compilation cache stays the test session's (conftest.py).
    monkeypatch.setattr("realisid_jax.commands.weights.enable_compilation_cache", lambda: None)
    monkeypatch.setattr("realisid_jax.commands.sample.enable_compilation_cache", lambda: None)


def _snapshot(path: Path) -> dict | None:
    """Every file and folder under ``path`` with its size and modification time; None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": (path.stat().st_size, path.stat().st_mtime_ns)}
    return {str(p.relative_to(path)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


def _run(command: str, argv: list[str]) -> str:
    """Runs ``realisid ARGV`` in-process and checks the property; returns "accepted" or "refused"."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
        except ModelsReached:
            code = None
    err = stderr.getvalue()
    assert "Traceback" not in err, f"realisid {argv}:\n{err}"
    errors = [line for line in err.splitlines() if "error:" in line]
    CASES[command] += 1
    if code is None or code == 0:
        assert not errors, f"realisid {argv} went through with:\n{err}"
        OUTCOMES["accepted"] += 1
        return "accepted"
    assert code == 2 and len(errors) == 1, f"realisid {argv} exited {code}:\n{err}"
    ERRORS[command].add(_template(errors[0]))
    OUTCOMES["refused"] += 1
    return "refused"


def _template(error: str) -> str:
    """An error line with its absolute paths and numbers replaced, so that cases differing only in them count as
    one error."""
    text = re.sub(r"/[^\s'\",;:()]+", "<path>", error)
    text = re.sub(r"\b\d+x\d+\b", "NxN", text)  # image sizes
    return re.sub(r"(?<![A-Za-z_\d.])-?\d+(\.\d+)?(e[-+]?\d+)?", "N", text)


@contextlib.contextmanager
def _scratch():
    folder = Path(tempfile.mkdtemp(prefix="campaign-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------- strategies

# Numbers as a user types them: plausible, negative, huge, not finite, not numbers at all.
INTS = st.one_of(st.sampled_from(["0", "1", "2", "64", "128", "256", "-1", "-64", "192"]),
                 st.integers(-10**22, 10**22).map(str), st.sampled_from(["9223372036854775808", "1e3", "2.5"]))
NUMBERS = st.one_of(INTS, st.floats(allow_nan=True, allow_infinity=True).map(str),
                    st.sampled_from(["nan", "inf", "-inf", "", "abc", "0x40", " 64", "1,2"]))


def _mostly(good: list[str], bad: st.SearchStrategy = NUMBERS) -> st.SearchStrategy:
    """One of ``good`` three times in four, else ``bad``: a case with one bad value among good ones reaches the
    later checks, where a case of bad values only would stop at the first."""
    # hypothesis leans to the first of a sampled list (it shrinks towards it): the good values come first.
    return st.sampled_from(["good", "good", "good", "bad"]).flatmap(
        lambda kind: st.sampled_from(good) if kind == "good" else bad)


BOXES = _mostly(["16,16,80,80", "0,0,64,64", "100,20,140,90", "-20,-20,40,40", "200,200,300,300"], st.one_of(
    st.tuples(*[st.integers(-300, 600)] * 4).map(lambda b: ",".join(map(str, b))),
    st.lists(NUMBERS, min_size=2, max_size=5).map(",".join),
    st.sampled_from(["900,900,1000,1000", "0,0,64,600", "10,10,10,40"])))
OVERRIDES = st.builds("--config.{}={}".format,
                      st.sampled_from(["sampling.num_inference_steps", "sampling.scheduler", "sampling.seed",
                                       "train.batch_size", "train.checkpoint_every", "train.num_steps", "train.seed", "realisid.max_persons",
                                       "sampling.nonexistent", "nosection.field", "sampling", "train"]),
                      st.sampled_from(["3", "0", "-1", "abc", "None", "1.5", "[1, 2]", "'ddim'", "", "True"]))
# Names in the pool of files (``pool``); "missing" and "folder" are a path that does not exist and a folder.
PHOTOS = _mostly(["astronaut.jpg"], st.sampled_from(["no_face.png", "corrupt.jpg", "text.png", "empty.png",
                                                     "missing", "folder", "record.png"])).map("{pool}/".__add__)
OUT_KINDS = _mostly(["new", "new/nested", "empty_folder"], st.sampled_from(["earlier_run", "a_file"]))
CONFIGS = _mostly([CONFIG], st.sampled_from(["configs/nope.py", "{pool}/not_python.py",
                                             "configs/sdxl.py:no_such_variant"]))


def _flags(draw, flags: dict) -> list[str]:
    """Each of ``flags`` (name -> value strategy) given or not."""
    argv = []
    for flag, values in flags.items():
        if draw(st.booleans()):
            argv += [f"{flag}={draw(values)}"]  # "=": a value may start with a minus sign
    return argv


def _overrides(draw) -> list[str]:
    """A config override in one case of four."""
    return [draw(OVERRIDES)] if draw(st.integers(0, 3)) == 3 else []


def _out(kind: str, scratch: Path, earlier: str) -> Path:
    """An output path of ``kind``: not there yet, an empty folder, a folder of an earlier run, a file."""
    out = scratch / "out"
    if kind == "new/nested":
        return out / "a" / "b"
    if kind == "empty_folder":
        out.mkdir()
    elif kind == "earlier_run":
        out.mkdir()
        (out / earlier).write_bytes(b"from an earlier run")
    elif kind == "a_file":
        out.write_text("keep me")
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory, face_models):
    """The files the cases pick from: photos with and without a face, a truncated JPEG, text and empty files
    named as images, a PNG with a generation record, each photo with a caption; a configured config file that
    is not Python."""
    from PIL import Image
    from skimage import data

    from realisid_jax.app.metadata import Generation, save_png
    from realisid_jax.data.sample_data import write_sample_source

    root = tmp_path_factory.mktemp("pool")
    write_sample_source(root, 1)  # astronaut.jpg, no_face.png, corrupt.jpg and their .txt captions
    (root / "text.png").write_text("this is not an image")
    (root / "empty.png").write_bytes(b"")
    (root / "folder").mkdir()
    (root / "not_python.py").write_text("this is { not python\n")
    generation = Generation(prompt="p", negative_prompt="", seed=1, steps=1, boxes=((16, 16, 80, 80),),
                            scheduler="ddim", text_guidance_scale=7.5, id_guidance_scale=5.0,
                            id_start_fraction=0.2, height=128, width=128, num_images=1, config=CONFIG,
                            config_overrides=(), weights={}, references=(data.astronaut(),),
                            poses=(None,), rotations=(None,))
    save_png(Image.new("RGB", (128, 128)), root / "record.png", generation.for_image(0))
    return root


def _photo(pool: Path, name: str) -> str:
    return str(pool / name)


# ------------------------------------------------------------------------------------------------ sample


@st.composite
def sample_cases(draw):
    """(argv without --out, out kind, --overwrite): persons with boxes (counts may not match), sizes, steps,
    counts, seeds, a recorded PNG, config files and overrides."""
    argv = ["sample", "--config", draw(CONFIGS)]
    faces = draw(st.integers(0, 2))
    for _ in range(faces):
        argv += ["--face", draw(PHOTOS)]
    for _ in range(draw(_mostly([faces], st.sampled_from([faces + 1, max(faces - 1, 0)])))):
        argv += [f"--box={draw(BOXES)}"]  # "=": a box may start with a minus sign
    if faces and draw(st.booleans()):
        argv += ["--pose", draw(_mostly(["-"], st.sampled_from(["{pool}/no_face.png", "{pool}/missing"])))] * faces
    argv += _flags(draw, {"--height": _mostly(["128", "256"]), "--width": _mostly(["128", "256"]),
                          "--steps": _mostly(["1", "30"]), "--num-images": _mostly(["1", "2"]),
                          "--seed": _mostly(["0", "7", "4294967296"])})
    if draw(st.integers(0, 7)) == 7:  # a pose of a square subject: needs another config than the tiny one
        argv += ["--rotation", draw(_mostly(["-", "30"]))] * faces
    if draw(st.integers(0, 7)) == 7:
        argv += ["--from-png", "{pool}/" + draw(st.sampled_from(["record.png", "astronaut.jpg", "missing"]))]
    argv += _overrides(draw)
    return argv, draw(OUT_KINDS), draw(st.booleans())


def _pipeline_reached(config, args):
    jax.random.key(args.seed if args.seed is not None else config.sampling.seed)  # the seed's noise
    raise ModelsReached


@SETTINGS
@given(case=sample_cases())
@example(case=(["sample", "--config", "{pool}/not_python.py"], "new", False))
@example(case=(["sample", "--config", "configs/sdxl.py:no_such_variant"], "new", False))
@example(case=(["sample", "--seed=9223372036854775808"], "new", False))
@example(case=(["sample", "--face", "{pool}/astronaut.jpg", "--box=900,900,1000,1000", "--height=256"], "new", False))
def test_sample_either_runs_or_refuses_in_one_line(pool, monkeypatch, case):
    monkeypatch.setattr("realisid_jax.commands.sample.build_pipeline", _pipeline_reached)
    argv, out_kind, overwrite = case
    with _scratch() as scratch:
        out = _out(out_kind, scratch, "image_000.png")
        before = _snapshot(out)
        argv = [a.replace("{pool}", str(pool)) for a in argv] + ["--out", str(out)] + ["--overwrite"] * overwrite
        _run("sample", argv)
        assert _snapshot(out) == before


# ------------------------------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """``--data`` folders: prepared-looking ones of 16 and 4 examples (what ``train`` checks before building its
    models is the dataset's info file and that its shard holds that many records), one whose info is not JSON, one
    without info."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from realisid_jax.data.builder import dataset_dir

    root = tmp_path_factory.mktemp("datasets")
    for name, info in (("sixteen", {"splits": [{"name": "train", "shardLengths": ["16"]}]}),
                       ("four", {"splits": [{"name": "train", "shardLengths": ["4"]}]}),
                       ("no_split", {"splits": []}), ("not_json", "{ cut off")):
        dataset_dir(root / name).mkdir(parents=True)
        text = info if isinstance(info, str) else json.dumps(info)
        (dataset_dir(root / name) / "dataset_info.json").write_text(text)
        for lengths in ([] if isinstance(info, str) else [s["shardLengths"] for s in info["splits"]]):
            path = dataset_dir(root / name) / "realisid_faces-train.array_record-00000-of-00001"
            writer = ArrayRecordWriter(str(path), "group_size:1")
            for _ in range(int(lengths[0])):
                writer.write(b"an example")
            writer.close()
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a dataset")
    return root


@st.composite
def train_cases(draw):
    """(argv without --workdir, workdir kind): config files and overrides, datasets, a resume step, weight
    paths."""
    data = st.sampled_from(["sixteen"] * 4 + ["four", "no_split", "not_json", "empty", "a_file", "missing"])
    argv = ["train", "--config", draw(CONFIGS), "--data", "{data}/" + draw(data)]
    argv += _flags(draw, {"--resume-step": _mostly(["0", "3"])})
    if draw(st.integers(0, 3)) == 3:
        argv += _flags(draw, {"--pretrained": PHOTOS, "--lora": PHOTOS, "--image-encoder": PHOTOS,
                              "--variant": st.sampled_from(["fp16", ""])})
    argv += _overrides(draw)
    return argv, draw(_mostly(["new", "new/nested", "empty_folder"], st.just("a_file")))


def _trainer_reached(config, workdir, **kwargs):
    assert config.train.batch_size >= 1 and config.train.checkpoint_every >= 1, "the step loop cannot run these"
    raise ModelsReached


@SETTINGS
@given(case=train_cases())
@example(case=(["train", "--config", CONFIG, "--data", "{data}/not_json"], "new"))
@example(case=(["train", "--config", CONFIG, "--data", "{data}/sixteen", "--config.train.batch_size=0"], "new"))
@example(case=(["train", "--config", CONFIG, "--data", "{data}/sixteen", "--config.train.checkpoint_every=None"], "new"))
def test_train_either_runs_or_refuses_in_one_line(pool, datasets, monkeypatch, case):
    monkeypatch.setattr("realisid_jax.training.trainer.train", _trainer_reached)
    argv, workdir_kind = case
    with _scratch() as scratch:
        workdir = _out(workdir_kind, scratch, "")
        before = _snapshot(workdir)
        argv = [a.replace("{pool}", str(pool)).replace("{data}", str(datasets)) for a in argv]
        _run("train", [*argv, "--workdir", str(workdir)])
        assert _snapshot(workdir) == before


# ------------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``--workdir`` folders: a run with checkpoints 1 and 2 of a one-layer stand-in for the branches, one whose
    newest checkpoint is truncated, one whose only checkpoint is, one with a step folder of junk, one with an
    empty checkpoints/, and a folder that is no run."""
    from flax import nnx

    from realisid_jax.config import load_config
    from realisid_jax.training.checkpoint import TrainCheckpointer
    from realisid_jax.training.optimizer import make_optimizer
    from realisid_jax.training.state import initial_train_state

    root = tmp_path_factory.mktemp("runs")
    config = load_config(ROOT / CONFIG)
    _, params, _ = nnx.split(_stand_in(config), nnx.Param, ...)
    abstract = jax.eval_shape(lambda p: initial_train_state(make_optimizer(config.train)[0], p, 0),
                              params.to_pure_dict())
    meta = {"config": json.loads(config.to_json_best_effort())}
    for name, steps in (("good", (1, 2)), ("corrupt_newest", (1, 2)), ("all_corrupt", (1,))):
        with TrainCheckpointer(root / name / "checkpoints", async_save=False) as ckpt:
            for step in steps:
                ckpt.save(step, jax.tree.map(lambda x: jnp.full(x.shape, step, x.dtype), abstract), None,
                          {"step": step, **meta})
            ckpt.wait()
    for name, step in (("corrupt_newest", 2), ("all_corrupt", 1)):
        for path in (root / name / "checkpoints" / str(step)).glob("train/**/d/*"):
            path.write_bytes(path.read_bytes()[:10])
    (root / "junk_step" / "checkpoints" / "3").mkdir(parents=True)
    (root / "junk_step" / "checkpoints" / "3" / "junk").write_text("junk")
    (root / "empty_checkpoints" / "checkpoints").mkdir(parents=True)
    (root / "no_run").mkdir()
    return root


def _stand_in(config):
    from flax import nnx

    return nnx.eval_shape(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0)))


def _export_reached(module, out):
    raise ModelsReached


@st.composite
def export_cases(draw):
    """(argv without --out, out kind): runs with good, corrupt and junk checkpoints, or none; a step."""
    run = st.sampled_from(["good"] * 4 + ["corrupt_newest", "all_corrupt", "junk_step", "empty_checkpoints", "no_run",
                                          "missing"])
    argv = ["export", "--workdir", "{runs}/" + draw(run)]
    argv += _flags(draw, {"--step": _mostly(["1", "2"])})
    return argv, draw(OUT_KINDS)


@SETTINGS
@given(case=export_cases())
def test_export_either_runs_or_refuses_in_one_line(runs, monkeypatch, case):
    # The branches' 850 arrays take ~30 s to write and read back here: a one-layer stand-in is restored instead.
    monkeypatch.setattr("realisid_jax.training.checkpoint_export.abstract_branches", _stand_in)
    monkeypatch.setattr("realisid_jax.training.checkpoint_export.export_branches", _export_reached)
    argv, out_kind = case
    with _scratch() as scratch:
        out = _out(out_kind, scratch, "local_branch")
        before = _snapshot(out)
        argv = [a.replace("{runs}", str(runs)) for a in argv]
        _run("export", [*argv, "--out", str(out)])
        assert _snapshot(out) == before


# ------------------------------------------------------------------------------------------ prepare-data

SOURCE_EXTRAS = st.sets(st.sampled_from(["no_face", "corrupt", "text_as_image", "empty_image", "orphan_caption",
                                         "latin1_caption", "empty_caption", "captions_jsonl", "bad_captions_jsonl",
                                         "folder"]), max_size=3)


def _source(pool: Path, folder: Path, files: set[str]) -> None:
    """A ``--src`` folder holding ``files`` (names of ``SOURCE_FILES``), each photo with its caption."""
    folder.mkdir()
    for name in files & {"astronaut", "no_face", "corrupt"}:
        photo = next(pool.glob(f"{name}.*[gG]"))
        shutil.copy(photo, folder)
        shutil.copy(pool / f"{name}.txt", folder)
    extras = {"text_as_image": ("text.png", b"this is not an image"), "empty_image": ("empty.png", b""),
              "orphan_caption": ("ghost.txt", b"a caption without its photo"),
              "latin1_caption": ("astronaut.txt", b"a caf\xe9 portrait"),
              "empty_caption": ("no_face.txt", b""),
              "captions_jsonl": ("captions.jsonl", json.dumps({"file": "corrupt.jpg", "text": "cut"}).encode()),
              "bad_captions_jsonl": ("captions.jsonl", b'{"file": "astronaut.jpg", "te')}
    for name in sorted(files & extras.keys()):
        path, data = extras[name]
        (folder / path).write_bytes(data)
    if "folder" in files:
        (folder / "sub").mkdir()


@st.composite
def prepare_cases(draw):
    """(argv without --src and --out, src kind, its files, out kind, --overwrite): sizes, thresholds, formats,
    configs, precompute flags; source folders of good, bad and odd files."""
    # 64 px photos (fast) hold the astronaut's face at ~15 px: a smaller --min-face-px keeps it.
    argv = ["prepare-data", f"--workers={draw(_mostly(['0'], st.sampled_from(['-1', 'x'])))}",
            f"--resolution={draw(_mostly(['64'], st.sampled_from(['100', '0', '-64', 'abc', '1e3'])))}",
            f"--min-face-px={draw(_mostly(['8']))}"]
    argv += _flags(draw, {"--reference-size": _mostly(["32"], st.sampled_from(["0", "-5", "x"])),
                          "--max-other-face-ratio": _mostly(["0.5"]),
                          "--image-format": _mostly(["jpeg", "png"], st.just("gif")),
                          "--config": _mostly([CONFIG], st.just("configs/nope.py"))})
    if draw(st.integers(0, 7)) == 7:  # the encoders' weights: refused here (none given that load)
        argv += ["--precompute", *_flags(draw, {"--base": st.sampled_from(["{pool}/missing", "{pool}/text.png"])})]
    if any(a.startswith("--config=") for a in argv):
        argv += _overrides(draw)
    files = draw(SOURCE_EXTRAS) | ({"astronaut"} if draw(_mostly([True], st.just(False))) else set())
    return argv, draw(_mostly(["folder"], st.sampled_from(["missing", "a_file"]))), files, draw(OUT_KINDS), \
        draw(st.booleans())


@settings(SETTINGS, max_examples=30)
@given(case=prepare_cases())
def test_prepare_data_either_runs_or_refuses_in_one_line(pool, case):
    from realisid_jax.data.prepare import SUMMARY_FILE, WORK_DIR

    argv, src_kind, files, out_kind, overwrite = case
    with _scratch() as scratch:
        src = scratch / "src"
        if src_kind == "folder":
            _source(pool, src, files)
        elif src_kind == "a_file":
            src.write_text("not a folder")
        out = _out(out_kind, scratch, "notes.md")
        before = _snapshot(out)
        argv = [a.replace("{pool}", str(pool)) for a in argv]
        outcome = _run("prepare-data", [*argv, "--src", str(src), "--out", str(out)] + ["--overwrite"] * overwrite)
        after = _snapshot(out) or {}
        assert not [name for name in after if "tmp" in name or "incomplete" in name]
        if outcome == "accepted":
            assert (out / SUMMARY_FILE).is_file()
        else:  # as it was, but for the per-photo analysis cache, which a corrected re-run reuses
            assert {k: v for k, v in after.items() if not k.startswith(WORK_DIR)} == (before or {})
