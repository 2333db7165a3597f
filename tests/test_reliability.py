"""Bad input and faults: one ``error:`` line and exit code 2 before any model loads, nothing written; the work
directory lock; the fallback past a corrupt newest checkpoint; ``metrics.jsonl`` one row per step.

The CLI's argument and input checks run in-process through ``realisid_jax.cli.main`` (each ends before any model
is built: milliseconds, where a subprocess pays seconds of imports); a subprocess only where the behaviour needs
another process (the lock holder, killed with SIGKILL). Checkpoint tests use a small fake train state with
``TrainCheckpointer`` directly.
"""

import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realisid_jax.cli import main
from realisid_jax.training.checkpoint import CheckpointError, TrainCheckpointer
from realisid_jax.training.summary import truncate_metrics
from realisid_jax.training.trainer import restore_or_start
from realisid_jax.training.workdir_lock import WorkdirLock, WorkdirLockedError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_repo_without_models(monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths (configs/sdxl.py:tiny) are relative to the repository, as in the README

    def no_models(*_args, **_kwargs):
        raise AssertionError("a bad input reached the model build")

    monkeypatch.setattr("realisid_jax.commands.sample.build_pipeline", no_models)


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Runs ``realisid ARGS`` in-process: (exit code, stderr). argparse errors end in ``SystemExit(2)``."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _assert_one_line_error(result: tuple[int, str], message: str) -> None:
    code, stderr = result
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("extra, message", [
    (["--height", "0"], "argument --height: must be a positive multiple of 64 pixels, got 0"),
    (["--width", "100"], "argument --width: must be a positive multiple of 64"),
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--steps", "-3"], "argument --steps: must be at least 1, got -3"),
    (["--num-images", "0"], "argument --num-images: must be at least 1"),
    (["--seed", "-1"], "argument --seed: must be 0 or more"),
    (["--config.sampling.nonexistent=1"], "config has no field 'sampling.nonexistent'"),
    (["--config.sampling.num_inference_steps=abc"], "num_inference_steps=abc: expected int, got str"),
    (["--face", "x.png", "--box", "a,b,c,d"], "--box 'a,b,c,d' is not x0,y0,x1,y1"),
    (["--face", "x.png", "--box", "0,0,64,64", "--face", "y.png", "--box", "900,900,1000,1000", "--height", "256",
      "--width", "256"], "error: person 2: box 900,900,1000,1000 lies wholly outside the 256x256 image"),
])
def test_sample_bad_values_refused_before_models_load(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    _assert_one_line_error(_cli(capsys, "sample", "--out", str(out), *extra), message)
    assert not out.exists()


def test_sample_out_is_a_file_or_holds_earlier_images(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    _assert_one_line_error(_cli(capsys, "sample", "--out", str(afile)), "is an existing file, not a folder")
    assert afile.read_text() == "keep"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "image_001.png").write_bytes(b"old")
    _assert_one_line_error(_cli(capsys, "sample", "--out", str(earlier)), "pass --overwrite")
    assert sorted(p.name for p in earlier.iterdir()) == ["image_001.png"]


def test_sample_warns_when_a_box_is_made_square(tmp_path, capsys, face_models):
    from PIL import Image
    from skimage import data

    face = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(face)
    args = ["sample", "--out", str(tmp_path / "out"), "--face", str(face), "--height", "256", "--width", "256"]
    for box, warning in (("10,20,110,60", "warning: --box 10,20,110,60 -> 10,0,110,100: the square of its longer "
                                          "edge around its centre, inside the 256x256 image, as in training"),
                         ("10,20,110,120", None)):
        capsys.readouterr()
        with pytest.raises(AssertionError, match="reached the model build"):  # warned before any model loads
            main([*args, "--box", box])
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert warnings == ([warning] if warning else []), warnings
    assert not (tmp_path / "out").exists()


def _tmpfs(tmp_path, size: str):
    """A ``size`` tmpfs mounted at ``tmp_path/disk``: a disk that fills up. Needs root (CI runs as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only)."""
    yield from _tmpfs(tmp_path, "64k")


@pytest.fixture
def checkpoint_disk(tmp_path):
    """A 1 MiB tmpfs (root only): room for a few checkpoints of ``_state``."""
    yield from _tmpfs(tmp_path, "1m")


def test_sample_on_a_full_disk_keeps_no_image(small_disk, capsys, monkeypatch, face_models):
    # The images as generated (random pixels: PNGs of ~200 KB, which the 64 KiB disk cannot hold); what is tested
    # is the writing of the result.
    noise = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), np.uint8)

    def pipeline(prompt, conditions, **kwargs):
        return types.SimpleNamespace(images=noise, conditions=conditions)

    monkeypatch.setattr("realisid_jax.commands.sample.build_pipeline", lambda config, args: pipeline)
    out = small_disk / "out"
    code, stderr = _cli(capsys, "sample", "--out", str(out), "--num-images", "2")
    assert code == 1, stderr
    assert [line for line in stderr.splitlines() if "error:" in line] == [
        f"error: writing {out}/ failed: No space left on device; no image of this run was kept"], stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("reference_size, kept", [
    (32, 4),  # the per-photo results (~25 KB) fit on the 64 KiB disk, the dataset's array_record shard (128 KiB) not
    (224, None),  # the disk fills up while the per-photo results are cached (the astronaut's takes 68 KB)
])
def test_prepare_data_on_a_full_disk_keeps_no_dataset_that_looks_complete(small_disk, tmp_path, capsys, monkeypatch,
                                                                          face_models, reference_size, kept):
    from realisid_jax.data.sample_data import write_sample_source

    src, out = tmp_path / "src", small_disk / "out"
    write_sample_source(src, 2)
    prepare = ("prepare-data", "--src", str(src), "--out", str(out), "--resolution", "64", "--reference-size",
               str(reference_size), "--workers", "0", "--min-face-px", "8")
    code, stderr = _cli(capsys, *prepare)
    assert code == 1, stderr
    assert [line for line in stderr.splitlines() if "error:" in line] == [
        f"error: writing {out}/ failed: No space left on device; no part of the dataset was kept; free space and run "
        f"prepare-data again (it reuses the per-photo results in {out}/_work/)"], stderr
    assert "Traceback" not in stderr
    # No summary, no dataset file, no temporary file: only the per-photo results cached, each one whole.
    assert [p for p in out.rglob("*") if p.is_file() and p.parent.parent.parent.name != "_work"] == []
    cached = len(list(out.rglob("*.npz")))
    assert cached == kept if kept else cached < 4, cached

    def trained(*args, **kwargs):
        raise AssertionError("reached the model build")

    monkeypatch.setattr("realisid_jax.training.trainer.train", trained)
    train = ("train", "--config", "configs/sdxl.py:tiny", "--workdir", str(tmp_path / "work"), "--data", str(out),
             "--config.train.batch_size=2")
    _assert_one_line_error(_cli(capsys, *train), f"--data {out} is not a prepared dataset")

    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)  # space again
    code, stderr = _cli(capsys, *prepare, "--overwrite")
    assert code == 0, stderr
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert (summary["analysed"], summary["cached"], summary["written"]) == (4 - cached, cached, 2)  # results kept
    with pytest.raises(AssertionError, match="reached the model build"):  # the dataset passes train's checks
        main(list(train))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """A prepared dataset of 6 examples at 64 px."""
    from realisid_jax.data.prepare import PrepareOptions, prepare_dataset
    from realisid_jax.data.sample_data import write_sample_source

    root = tmp_path_factory.mktemp("faces")
    write_sample_source(root / "src", 6)
    prepare_dataset(root / "src", root / "data", workers=0,
                    options=PrepareOptions(resolution=64, reference_size=224, min_face_px=8))
    return root / "data"


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist; prepare one with `realisid prepare-data"),
    ("empty", "is not a prepared dataset"),
    ("small", "holds 6 examples: fewer than one batch of 8 per process"),
])
def test_train_checks_data_before_building_models(tmp_path, capsys, small_dataset, case, message):
    data = {"missing": tmp_path / "nope", "empty": tmp_path, "small": small_dataset}[case]
    work = tmp_path / "work"
    result = _cli(capsys, "train", "--config", "configs/sdxl.py:tiny", "--workdir", str(work), "--data", str(data),
                  "--config.train.batch_size=8")
    _assert_one_line_error(result, message)
    assert not work.exists()


def test_export_of_a_missing_workdir(tmp_path, capsys):
    result = _cli(capsys, "export", "--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    _assert_one_line_error(result, "holds no checkpoints/ folder")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- prepare-data


def test_captions_decoded_as_utf8_else_windows_1252_else_latin1(tmp_path):
    from realisid_jax.data.sources import read_caption

    cases = {
        "utf8.txt": ("café “noir”".encode(), ("café “noir”", "utf-8")),
        "bom.txt": (b"\xef\xbb\xbfcaf\xc3\xa9", ("café", "utf-8")),
        "utf16.txt": ("café".encode("utf-16"), ("café", "utf-16")),
        "latin1.txt": (b"caf\xe9 au lait", ("café au lait", "cp1252")),
        "cp1252.txt": (b"\x93quoted\x94", ("“quoted”", "cp1252")),
        "undefined.txt": (b"caf\xe9 \x81", ("café \x81", "latin-1")),  # 0x81: no Windows-1252 character
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert read_caption(tmp_path / name) == expected, name


@pytest.fixture(scope="module")
def odd_source(tmp_path_factory, face_models):
    """A source folder with two face photos (one with a Latin-1 caption), a photo without a face, a corrupt one,
    a caption without a photo, a captions.jsonl line naming a missing photo and a file that is no photo; prepared
    once through ``realisid prepare-data``."""
    from realisid_jax.data.sample_data import write_sample_source

    root = tmp_path_factory.mktemp("odd")
    src = root / "src"
    write_sample_source(src, 2)  # astronaut.jpg, lfw_000.png, no_face.png, corrupt.jpg + their .txt
    (src / "lfw_000.txt").write_bytes(b"a portrait in a caf\xe9")  # Latin-1
    (src / "ghost.txt").write_text("a caption whose photo was deleted")
    (src / "captions.jsonl").write_text(json.dumps({"file": "gone.png", "text": "another lost caption"}) + "\n")
    (src / "notes.md").write_text("not a photo")
    return src, root / "out"


def _prepare(capsys, src, out, *extra):
    return _cli(capsys, "prepare-data", "--src", str(src), "--out", str(out), "--resolution", "64",
                "--workers", "0", "--min-face-px", "8", *extra)


def test_prepare_data_accounts_for_every_source_file(odd_source, capsys, caplog):
    from realisid_jax.data.builder import open_split

    src, out = odd_source
    code, stderr = _prepare(capsys, src, out)
    assert code == 0, stderr
    assert "caption file lfw_000.txt is not UTF-8: read as cp1252" in caplog.messages  # a log line on stderr
    summary = json.loads((out / "prepare_summary.json").read_text())
    names = sorted(p.name for p in src.iterdir())
    assert summary["files"] == {"total": len(names), "photos": 4, "captions": 6, "not_photos": 1}
    assert summary["written"] + sum(summary["skipped"].values()) + len(summary["errors"]) == 4
    assert summary["caption_encodings"] == {"lfw_000.txt": "cp1252"} and summary["orphan_captions"] == 2
    listed = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {(e["file"], e["reason"]) for e in listed} == {
        ("corrupt.jpg", "corrupt_image"), ("no_face.png", "no_face"), ("ghost.txt", "orphan_caption"),
        ("captions.jsonl:1", "orphan_caption"), ("notes.md", "not_a_photo")}
    # Every file is in the dataset (a photo or its caption), or listed with its reason.
    kept = {"astronaut.jpg", "astronaut.txt", "lfw_000.png", "lfw_000.txt", "captions.jsonl",
            "corrupt.txt", "no_face.txt"}
    assert kept | {e["file"] for e in listed if ":" not in e["file"]} == set(names)
    records = open_split(out)
    captions = {records[i]["source"].decode(): records[i]["caption"].decode() for i in range(len(records))}
    assert captions["lfw_000.png"] == "a portrait in a café" and len(captions) == summary["written"] == 2


def test_prepare_data_refuses_a_finished_or_foreign_out_unless_overwrite(odd_source, capsys, tmp_path):
    import shutil

    src, prepared = odd_source
    if not (prepared / "prepare_summary.json").exists():
        assert _prepare(capsys, src, prepared)[0] == 0
    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    _assert_one_line_error(_prepare(capsys, src, out), "already holds a prepared dataset (prepare_summary.json)")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    code, stderr = _prepare(capsys, src, out, "--overwrite")
    assert code == 0, stderr
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert (summary["analysed"], summary["cached"], summary["written"]) == (0, 4, 2)  # the cache is reused
    # An interrupted run (its cache only) resumes without --overwrite; a folder of other files is refused.
    (out / "prepare_summary.json").unlink()
    (out / "skipped.jsonl").unlink()
    assert _prepare(capsys, src, out)[0] == 0
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"keep")
    _assert_one_line_error(_prepare(capsys, src, foreign), "is not empty and not an interrupted prepare-data run")
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]


# --------------------------------------------------------------------------------------- lock, checkpoints


def test_workdir_lock_names_holder_and_is_released_by_the_os(tmp_path):
    # The holder is another process (flock conflicts between processes, or open files, not within a depth).
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from realisid_jax.training.workdir_lock import WorkdirLock\n"
        f"with WorkdirLock({str(tmp_path)!r}):\n print('locked', flush=True); time.sleep(600)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # waits on the event, not on a clock
        with pytest.raises(WorkdirLockedError, match=rf"in use by another training run \(pid {holder.pid} on host"):
            with WorkdirLock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: the lock file stays, the OS drops the lock
        holder.wait()
    assert (tmp_path / ".lock").exists()
    with WorkdirLock(tmp_path), WorkdirLock(tmp_path):  # free again; re-entrant within a process
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()


def _state(value: float) -> dict:
    return {"params": {"w": jnp.full((4, 3), value)}, "step": jnp.int32(value)}


def _abstract() -> dict:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), _state(0.0))


def _corrupt(step_dir: Path) -> None:
    for path in step_dir.glob("train/**/d/*"):
        with path.open("r+b") as f:
            f.truncate(10)


def test_restore_walks_back_past_a_corrupt_newest_checkpoint(tmp_path, capfd):
    with TrainCheckpointer(tmp_path, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state(float(step)), None, {"step": step})
        ckpt.wait()
    _corrupt(tmp_path / "3")
    with TrainCheckpointer(tmp_path, read_only=True) as ckpt:
        state, step = ckpt.restore(_abstract(), None)
        assert step == 2
        np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 2.0))
        warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and "checkpoint step 3 (" in warnings[0] and "trying step 2" in warnings[0]
        assert str(tmp_path / "3" / "train") in warnings[0]
        with pytest.raises(CheckpointError, match=r"^checkpoint step 3 \(.*\) does not restore: [^\n]*$"):
            ckpt.restore(_abstract(), None, step=3)
        with pytest.raises(FileNotFoundError, match="no finished checkpoint 7"):
            ckpt.restore(_abstract(), None, step=7)


class _Position:
    """A stand-in input iterator whose position is one number."""

    def __init__(self, position: int = 0):
        self.position = position

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = state["position"]


def test_train_says_whether_it_resumes_and_from_which_checkpoint(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"

    def start(resume_step=None) -> tuple[int, int, list[str]]:
        """(step, data position, stdout lines) of a run starting in ``tmp_path``."""
        iterator = _Position()
        with TrainCheckpointer(ckpts, async_save=False) as ckpt:
            _, step = restore_or_start(ckpt, str(tmp_path), _abstract, lambda: _state(0.0), iterator, resume_step)
        return step, iterator.position, capsys.readouterr().out.splitlines()

    capsys.readouterr()
    assert start() == (0, 0, [f"starting a new run in {tmp_path}"])
    with TrainCheckpointer(ckpts, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state(float(step)), _Position(10 * step), {"step": step})
        ckpt.wait()
    assert start() == (3, 30, [f"resuming from step 3 ({ckpts / '3'}), data position restored"])
    _corrupt(ckpts / "3")
    assert start() == (2, 20, [f"resuming from step 2 ({ckpts / '2'}), data position restored; newer step 3 did "
                               "not restore (warnings above)"])
    assert start(1) == (1, 10, [f"resuming from step 1 ({ckpts / '1'}), data position restored; picked by "
                                "--resume-step (newer: 2, 3)"])


def test_export_walks_back_past_a_corrupt_newest_checkpoint(tmp_path, capsys, monkeypatch):
    from flax import nnx

    from realisid_jax.config import load_config
    from realisid_jax.training import checkpoint_export
    from realisid_jax.training.optimizer import make_optimizer
    from realisid_jax.training.state import initial_train_state

    # A one-layer stand-in for the branches (the real ones' 850 arrays take ~30 s to write and read back here;
    # test_train exports real ones): the walk-back and the CLI are what is tested. Every parameter of step s is s.
    monkeypatch.setattr(checkpoint_export, "abstract_branches",
                        lambda config: nnx.eval_shape(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
    exported = []
    monkeypatch.setattr(checkpoint_export, "export_branches", lambda module, out: exported.append(module))
    config = load_config(ROOT / "configs/sdxl.py:tiny")
    _, params, _ = nnx.split(checkpoint_export.abstract_branches(config), nnx.Param, ...)
    abstract = jax.eval_shape(lambda p: initial_train_state(make_optimizer(config.train)[0], p, 0),
                              params.to_pure_dict())
    with TrainCheckpointer(tmp_path / "checkpoints", async_save=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, jax.tree.map(lambda x: jnp.full(x.shape, step, x.dtype), abstract), None,
                      {"step": step, "config": json.loads(config.to_json_best_effort())})
        ckpt.wait()
    _corrupt(tmp_path / "checkpoints" / "2")
    capsys.readouterr()
    assert main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint step 2 (" in warnings[0] and "trying step 1" in warnings[0], err
    assert out.startswith("exported step 1 of")
    np.testing.assert_array_equal(exported[0].kernel.get_value(), np.ones((2, 3)))
    # The corrupt step asked for by name is one error line, exit code 2.
    _assert_one_line_error(_cli(capsys, "export", "--workdir", str(tmp_path), "--out", str(tmp_path / "o2"),
                                "--step", "2"), "checkpoint step 2 (")
    assert len(exported) == 1


def test_unawaited_failed_reads_of_a_corrupt_checkpoint_log_nothing_later(tmp_path, caplog):
    # When one array of a corrupt checkpoint fails to read, orbax's sibling reads fail unawaited, and asyncio logs
    # each one whenever the garbage collector frees it: in CI, in the middle of a later command. Those go; any
    # other asyncio error still shows.
    TrainCheckpointer(tmp_path, read_only=True)
    unawaited = ("Task exception was never retrieved\nfuture: <Task finished name='Task-436' coro=<async_deserialize()"
                 " done, defined at .venv/lib/python3.11/site-packages/orbax/checkpoint/_src/serialization/"
                 "serialization.py:394> exception=ValueError('OUT_OF_RANGE: Error opening \"cast\" driver')>")
    logging.getLogger("asyncio").error(unawaited)
    logging.getLogger("asyncio").error("Task exception was never retrieved\nfuture: <Task coro=<mine()>>")
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == [
        "Task exception was never retrieved\nfuture: <Task coro=<mine()>>"]


def test_metrics_keep_one_row_per_step_after_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def _fill(disk: Path) -> Path:
    """Fills ``disk`` up with one file, which is returned (delete it to free the space)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_disk_full_during_a_checkpoint_save_stops_the_run_and_keeps_the_last_checkpoint(checkpoint_disk, tmp_path,
                                                                                          capfd, caplog):
    small_disk = checkpoint_disk
    from realisid_jax.training.checkpoint import CheckpointWriteError
    from realisid_jax.training.loop import run
    from realisid_jax.training.summary import ProgressLog

    def step_fn(state, batch):  # a state that counts its steps, and the batch (the data position) it saw
        state = {"params": {"w": state["params"]["w"] + 1.0}, "step": jnp.int32(batch)}
        return state, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0)}

    def batches(position):
        while True:
            position.position += 1
            yield position.position

    filled = []

    def loop(state, start, position, fill=False):
        def fill_after_step_1(step, state):  # the disk fills up once checkpoint 1 is written, while step 2 runs
            if fill and step == 2:
                ckpt.wait()
                filled.append(_fill(small_disk))

        with TrainCheckpointer(small_disk / "checkpoints") as ckpt, ProgressLog(
                tmp_path / "logs", start_step=start, num_steps=3, log_every=1) as log:
            return run(step_fn, state, batches(position), start_step=start, num_steps=3, checkpointer=ckpt,
                       data_iterator=position, checkpoint_every=1, log=log, learning_rate=lambda s: 0.0, meta={},
                       hooks=[fill_after_step_1])

    with pytest.raises(CheckpointWriteError) as stopped:
        loop(_state(0.0), 0, _Position(), fill=True)
    assert str(stopped.value) == (
        f"writing checkpoint step 2 to {small_disk / 'checkpoints'} failed: No space left on device; the checkpoint "
        "of step 1 is kept and restores; free space and run train again to resume from it")
    assert isinstance(stopped.value, CheckpointError)  # the CLI prints it as one `error:` line
    err = capfd.readouterr().err
    assert "Traceback" not in err and not [r for r in caplog.records if r.levelname == "ERROR"], err
    assert sorted(p.name for p in (small_disk / "checkpoints").iterdir()) == ["1"]  # the failed write is gone

    filled[0].unlink()  # space again: the re-run resumes exactly where the checkpoint of step 1 was
    position = _Position()
    with TrainCheckpointer(small_disk / "checkpoints") as ckpt:
        state, step = ckpt.restore(_abstract(), position)
    assert (step, position.position) == (1, 1)
    result = loop(state, step, position)
    assert result.step == 3 and int(result.state["step"]) == 3
    np.testing.assert_array_equal(result.state["params"]["w"], np.full((4, 3), 3.0))


@pytest.mark.parametrize("damage, message", [
    ("cut", r"array_record-00000-of-00001 does not read, cut short or damaged \(RuntimeError: Corrupted Riegeli"),
    ("flipped", r"array_record-00000-of-00001 example \d does not read \(RuntimeError: Corrupted Riegeli"),
])
def test_a_damaged_dataset_shard_is_named(small_dataset, tmp_path, capsys, monkeypatch, damage, message):
    import shutil

    from realisid_jax.data.builder import DatasetReadError
    from realisid_jax.data.input_pipeline import make_train_iterator

    shutil.copytree(small_dataset / "realisid_faces", tmp_path / "realisid_faces")
    shard, = (tmp_path / "realisid_faces").rglob("*.array_record-*")
    content = bytearray(shard.read_bytes())
    if damage == "cut":  # an interrupted copy: the index at the file's end is gone
        shard.write_bytes(content[:len(content) // 2])
    else:  # bytes changed in the middle: found when the example is read
        content[len(content) // 2:len(content) // 2 + 4096] = bytes(4096)
        shard.write_bytes(bytes(content))
    with pytest.raises(DatasetReadError, match=message + r".*; prepare the dataset again with `realisid prepare-data "
                                                         r"--overwrite`") as stopped:
        for _ in make_train_iterator(tmp_path, batch_size=2, seed=0, read_threads=2, num_epochs=1):
            pass
    assert "\n" not in str(stopped.value) and str(shard) in str(stopped.value)  # grain adds only a note
    from realisid_jax.cli import _user_errors

    assert isinstance(stopped.value, _user_errors())  # the CLI prints it as one `error:` line, exit 2
    if damage == "cut":  # its index is gone: `train` names the file before it builds any model
        def trained(*args, **kwargs):
            raise AssertionError("a damaged shard reached the model build")

        monkeypatch.setattr("realisid_jax.training.trainer.train", trained)
        work = tmp_path / "work"
        result = _cli(capsys, "train", "--config", "configs/sdxl.py:tiny", "--workdir", str(work), "--data",
                      str(tmp_path), "--config.train.batch_size=2")
        _assert_one_line_error(result, f"error: {shard} does not read, cut short or damaged (RuntimeError: Corrupted")
        assert not work.exists()


def test_a_damaged_example_stops_training_at_its_step_and_keeps_the_checkpoints(tmp_path):
    from realisid_jax.data.builder import DatasetReadError
    from realisid_jax.training.loop import run
    from realisid_jax.training.summary import ProgressLog

    damaged = DatasetReadError("DATA/realisid_faces-train.array_record-00000-of-00001 example 5 does not read "
                               "(RuntimeError: Corrupted Riegeli/records file); prepare the dataset again")

    def batches(position):  # the batch of step 3 holds the damaged example
        while True:
            if position.position == 2:
                raise damaged
            position.position += 1
            yield position.position

    def step_fn(state, batch):
        return {"params": {"w": state["params"]["w"] + 1.0}, "step": jnp.int32(batch)}, {
            "loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0)}

    position = _Position()
    with pytest.raises(DatasetReadError) as stopped, TrainCheckpointer(tmp_path / "checkpoints") as ckpt, ProgressLog(
            tmp_path / "logs", start_step=0, num_steps=5, log_every=1) as log:
        run(step_fn, _state(0.0), batches(position), start_step=0, num_steps=5, checkpointer=ckpt,
            data_iterator=position, checkpoint_every=1, log=log, learning_rate=lambda s: 0.0, meta={})
    assert stopped.value is damaged  # the CLI prints it as one `error:` line, exit 2
    position = _Position()
    with TrainCheckpointer(tmp_path / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        state, step = ckpt.restore(_abstract(), position)
    assert (step, position.position, int(state["step"])) == (2, 2, 2)
