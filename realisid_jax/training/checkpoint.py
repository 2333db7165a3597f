"""Training checkpoints: orbax ``CheckpointManager`` with composite items, restored straight onto shardings.

A checkpoint ``<workdir>/checkpoints/<step>/`` holds three items:

* ``train`` (``StandardSave``): the train state pytree — trainable parameters, optimiser state, step,
  RNG key. Written asynchronously; every process writes its own shards.
* ``data`` (:class:`IteratorStateHandler`): the input iterator's state, one JSON file per process
  (``process_<i>-of-<n>.json``): on multi-host each process reads a different shard of the data, so a
  single JSON written by the primary process (``JsonSave``) would restore every host to host 0's position.
* ``meta`` (``JsonSave``): step and the config as JSON, for humans and tools.

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<n>`` and renames it when every item is
finalised, so a process killed during a write leaves a temporary folder that ``latest_step`` ignores and
the previous checkpoint restores unchanged; the next run deletes such temporary folders when it starts.
A write that fails (a full disk, a quota) raises ``CheckpointWriteError`` (one line: the step, the folder, the
reason, the checkpoint kept) and its temporary folder is removed at once, so the space it took is free again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
from etils import epath

from realisid_jax.errors import DISK_FULL, disk_full, first_line


class CheckpointError(RuntimeError):
    """A checkpoint that does not restore (truncated or missing files, another model's shapes); the message is
    one line naming the step and the file or folder, with the underlying error's first line."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (no space left on the device, a quota, a permission): the message is one line
    naming the step, the folder and the reason, and the newest finished checkpoint, which still restores."""


class _QuietDiskFull(logging.Filter):
    """Drops orbax's ERROR records (a traceback each, from its writer threads) of a write that failed for lack of
    space: ``CheckpointWriteError`` says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + str(record.exc_info[1])
        return record.levelno < logging.ERROR or not DISK_FULL.search(text)


_QUIET_DISK_FULL = _QuietDiskFull()


class _QuietFailedReads(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" records of orbax's array reads: when one array of a
    checkpoint fails to read, its sibling reads fail too and nobody awaits them, so the garbage collector logs each
    one (a traceback and a JSON spec dump) at some later moment, in the middle of another command's output. The
    failed restore is already reported as one ``CheckpointError`` line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("Task exception was never retrieved")
                    and "orbax/checkpoint" in record.getMessage())


_QUIET_FAILED_READS = _QuietFailedReads()


def _summary(step: int, directory: epath.Path, error: BaseException) -> str:
    # orbax/TensorStore errors run to dozens of lines ending in a JSON spec dump: keep the first line and name
    # the first file of the step it mentions (else the step's folder).
    text = first_line(error)
    step_dir = f"{directory}/{step}"
    found = re.findall(re.escape(step_dir) + r"[^\s'\"]*", str(error))
    where = max(found, key=len).rstrip(".,:;)]}") if found else step_dir
    return f"checkpoint step {step} ({where}) does not restore: {type(error).__name__}: {text[:300]}"


class StatefulIterator(Protocol):
    """What the trainer needs of an input iterator: ``next`` plus a JSON-able or bytes position."""

    def __next__(self) -> Any: ...
    def get_state(self) -> Any: ...
    def set_state(self, state: Any) -> None: ...


class IteratorStateHandler(ocp.CheckpointHandler):
    """Saves ``iterator.get_state()`` (JSON-able or bytes) per process and restores it with ``set_state``."""

    def save(self, directory: epath.Path, args: IteratorStateSave) -> None:
        state = args.iterator.get_state()
        record = {"bytes": state.decode()} if isinstance(state, bytes) else {"json": state}
        _process_file(directory).write_text(json.dumps(record))

    def restore(self, directory: epath.Path, args: IteratorStateRestore) -> Any:
        path = _process_file(directory)
        if not path.exists():
            raise FileNotFoundError(f"no input-iterator state {path} (saved with another process count?)")
        record = json.loads(path.read_text())
        state = record["bytes"].encode() if "bytes" in record else record["json"]
        args.iterator.set_state(state)
        return args.iterator

    def metadata(self, directory: epath.Path) -> None:
        return None


def _process_file(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
    iterator: StatefulIterator


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
    iterator: StatefulIterator


class TrainCheckpointer:
    """Saves and restores ``(train_state, iterator position)`` under ``directory``.

    Args:
      directory: checkpoint root (created); a local path or a ``gs://`` URL (needed on multi-host, where
        every process writes its shards into the same checkpoint).
      max_to_keep: number of newest checkpoints kept (``config.train.keep_checkpoints``); ``None``: all.
      async_save: write ``train`` in a background thread (the step loop continues); ``wait`` blocks.
      read_only: only restore (no save, no deletion, no clean-up of temporary folders).
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = None, async_save: bool = True,
                 read_only: bool = False):
        # Local paths are made absolute (orbax requires it); gs:// and other URLs pass through.
        self.directory = epath.Path(directory if "://" in str(directory) else Path(directory).absolute())
        # cleanup_tmp_directories: a write killed midway leaves ``<step>.orbax-checkpoint-tmp-*``; it is
        # removed when the next run opens the manager.
        # read_only (readers such as `realisid export`): nothing is written or deleted, so a run writing into
        # the same folder meanwhile keeps its in-progress temporary checkpoint.
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                               cleanup_tmp_directories=not read_only, read_only=read_only,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("train", "data", "meta"))
        self._async = async_save
        self._pending: int | None = None  # the step being written (async), until ``wait`` returns
        self._failed = False  # a write failed (reported): orbax may raise its error again on wait and close
        logging.getLogger("asyncio").addFilter(_QUIET_FAILED_READS)  # a logger keeps one copy of a filter
        if not read_only:
            logging.getLogger("absl").addFilter(_QUIET_DISK_FULL)

    def latest_step(self) -> int | None:
        """Newest finalised step, or ``None``; temporary (unfinished) step folders are not counted."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, train_state: Any, iterator: StatefulIterator | None, meta: dict) -> None:
        """Starts writing checkpoint ``step`` (returns before the arrays are on disk when async).

        The iterator's position is read now, so call it right after the step that consumed the batch.

        Raises:
          CheckpointWriteError: this write, or the previous asynchronous one, failed (e.g. the disk is full);
            its temporary folder is removed, the checkpoints finished before it are kept.
        """
        items = {"train": ocp.args.StandardSave(train_state), "meta": ocp.args.JsonSave(meta)}
        if iterator is not None:
            items["data"] = IteratorStateSave(iterator)
        self.wait()  # a failed asynchronous write is reported as its own step's
        self._pending = step
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise self._write_failed(err) from err
        if not self._async:  # written: nothing pending
            self._pending = None

    def restore(self, abstract_train_state: Any, iterator: StatefulIterator | None,
                step: int | None = None) -> tuple[Any, int]:
        """Loads a checkpoint onto the shardings of ``abstract_train_state`` and repositions ``iterator``.

        Args:
          abstract_train_state: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set: each array is
            read straight onto its devices (no host copy of the whole state).
          iterator: repositioned in place with ``set_state``, or ``None`` to skip the data item.
          step: default the newest finalised step that restores: walking back from the newest, each one that
            fails is reported on stderr (one line: step, file, error) and skipped.

        Returns:
          ``(train_state, step)``.

        Raises:
          FileNotFoundError: no finalised checkpoint under the directory (or not ``step``).
          CheckpointError: ``step`` (or every finalised step) does not restore.
        """
        steps = self.all_steps()
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no finished checkpoint {step} under {self.directory} "
                                    f"(finished: {steps or 'none'})")
        if not steps:
            raise FileNotFoundError(f"no finished checkpoint under {self.directory}")
        if step is not None:
            return self._restore_or_raise(abstract_train_state, iterator, step)
        for candidate in reversed(steps):
            try:
                return self._restore_or_raise(abstract_train_state, iterator, candidate)
            except CheckpointError as err:
                older = [s for s in steps if s < candidate]
                print(f"warning: {err}; {f'trying step {older[-1]}' if older else 'no older checkpoint'}",
                      file=sys.stderr, flush=True)
        raise CheckpointError(f"none of the checkpoints {steps} under {self.directory} restores (see above)")

    def _restore_or_raise(self, abstract_train_state: Any, iterator: StatefulIterator | None,
                          step: int) -> tuple[Any, int]:
        try:
            return self._restore(abstract_train_state, iterator, step)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(_summary(step, self.directory, err)) from err

    def _restore(self, abstract_train_state: Any, iterator: StatefulIterator | None, step: int) -> tuple[Any, int]:
        items = {"train": ocp.args.StandardRestore(abstract_train_state)}
        if iterator is not None:
            items["data"] = IteratorStateRestore(iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))["train"]
        # orbax rebuilds containers generically (e.g. optax's named tuples as tuples): put the leaves back into
        # the target's exact structure, which the jitted step's shardings are keyed on.
        return jax.tree.unflatten(jax.tree.structure(abstract_train_state), jax.tree.leaves(restored)), step

    def meta(self, step: int) -> dict:
        """The ``meta`` item of checkpoint ``step``. Raises CheckpointError: it does not restore."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(_summary(step, self.directory, err)) from err

    def wait(self) -> None:
        """Blocks until pending asynchronous writes are finalised.

        Raises:
          CheckpointWriteError: the pending write failed (its temporary folder is removed).
        """
        try:
            self._manager.wait_until_finished()
        except (OSError, ValueError, RuntimeError) as err:
            if not (self._failed and self._pending is None):
                raise self._write_failed(err) from err
            # else: orbax repeats the error of a write already reported as CheckpointWriteError
        self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except (OSError, ValueError, RuntimeError):
                if not self._failed:
                    raise

    def _write_failed(self, error: BaseException) -> CheckpointWriteError:
        """The one-line error for the failed write of step ``self._pending``; removes its temporary folder."""
        step, self._pending, self._failed = self._pending, None, True
        if "://" not in str(self.directory):  # a local disk: free what the failed write took
            for tmp in Path(str(self.directory)).glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        reason = disk_full(error) or f"{type(error).__name__}: {first_line(error)[:300]}"
        kept = [s for s in self.all_steps() if s != step]
        then = (f"the checkpoint of step {kept[-1]} is kept and restores; free space and run train again to resume "
                f"from it" if kept else "no checkpoint was written before it")
        return CheckpointWriteError(f"writing checkpoint step {step} to {self.directory} failed: {reason}; {then}")

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
