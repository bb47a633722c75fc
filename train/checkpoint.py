"""Checkpoints of the training run: a thin, failure-tolerant wrapper of orbax's ``CheckpointManager``.

What is saved, per step (one orbax ``Composite`` checkpoint):

* ``state``: the train state, any pytree of arrays (params, optimiser state, step counter, RNG key
  data, ...), possibly sharded over the mesh (``ocp.args.StandardSave``). It is restored onto the
  shardings of the abstract state given to ``restore_or_init``, bit for bit.
* ``data``: the grain ``DatasetIterator`` position (``grain.checkpoint.CheckpointSave``), captured
  when ``save`` is called, so a resumed run sees exactly the batches it would have seen.
* ``config``: the operative gin config text, ``{"config_str": ...}`` (``ocp.args.JsonSave``), so a
  checkpoint describes itself; read it back with ``read_config(directory, step)``.

Layout on disk (orbax 0.12.8, local file system)::

    <directory>/
      <step>/                          a finished checkpoint; the name is the step number
        _CHECKPOINT_METADATA           item handlers and commit time (JSON)
        state/                         _METADATA (tree, shapes, dtypes), _sharding, manifest.ocdbt,
                                       d/<hash> (the array data), array_metadatas/
        data/process_<i>-of-<n>.json   one grain iterator state per process
        config/metadata                {"config_str": "<gin text>"}
      <step>.orbax-checkpoint-tmp/     a save in progress, or one interrupted by a crash
      corrupt/<step>-<UTC time>/       checkpoints that could not be read, moved aside (never deleted)
      corrupt/<step>-<UTC time>.txt    why
      superseded/<step>-<UTC time>/    good checkpoints of an abandoned timeline, moved aside (see save)

orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` once every
item is written (on GCS, where rename is not atomic, it writes ``commit_success.txt`` last
instead). Only finalized steps are ever listed, so an interrupted save is invisible: it is never
restored, never counts towards ``keep``, and a later save of the same step replaces it.

Which checkpoint ``restore_or_init`` restores: it walks the finalized steps from the newest down
and classifies each attempt:

1. *Restored*: done. Newer steps that were found corrupt on the way are moved aside.
2. *Mismatch*: the checkpoint's files are intact but do not fit the request. Either its saved tree
   (leaf paths, shapes, dtypes, read from ``state/_METADATA``) differs from ``abstract_state``, or
   the restore failed although all of its files read back fine without the requested shardings
   (shardings that do not fit the mesh, a device out of memory, an iterator of a different
   pipeline or process count), or a data iterator was asked for and the checkpoint was saved
   without one. This is a property of the request (a changed model config, a changed mesh), not
   of the checkpoint, so it raises ``CheckpointMismatchError`` (a ``ValueError``) at once and
   touches nothing: no checkpoint is moved, and an older one is not restored instead, because
   that would silently roll training back and leave a newer checkpoint that later saves collide
   with. Use a new directory, or move the old checkpoints away yourself.
3. *Corrupt*: the metadata cannot be read, an item the checkpoint lists is missing, or the restore
   failed and the files do not read back either (truncated or deleted data files, bad JSON).
   A warning names the step, the path and the error, and the walk goes on to the next older step.

If no step restores and none mismatched, every corrupt step is moved aside and ``init_fn()`` builds
a fresh state (step 0); this is logged. Moving a step aside happens only after the decision, so a
raised mismatch leaves the directory exactly as it was. A ``CheckpointManager`` keeps a cached list
of steps (and ``LatestN`` deletes the oldest of that list after each save), so the manager is
re-created after every move.

Saving a step that already exists on disk: a step this ``Checkpointer`` saved itself is not saved
again (``save`` returns False). Any other finalized step at or above the one being saved belongs to
an abandoned timeline (the run restarted from an older step, or from scratch, in the same
directory); orbax would refuse the save, and ``LatestN`` would count those newer steps first and
delete the fresh checkpoint. They are moved to ``superseded/`` with a warning.

Multi-host: every process lists the steps, meets the others at a barrier, then reads and
classifies; only process 0 moves directories, followed by a barrier. All processes must see the
same files (a shared file system or bucket) and so reach the same verdicts.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

STATE, DATA, CONFIG = "state", "data", "config"
CORRUPT_DIR, SUPERSEDED_DIR = "corrupt", "superseded"


class CheckpointMismatchError(ValueError):
    """An intact checkpoint that does not fit the requested abstract state, mesh or data iterator."""


class Checkpointer:
    """Save every ``every`` steps, keep the newest ``keep``, restore the newest one that reads."""

    def __init__(self, directory, *, keep: int = 3, every: int = 1000, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        directory = epath.Path(directory)
        if not str(directory).startswith(("gs://", "s3://")):  # orbax needs absolute local paths
            directory = epath.Path(os.path.abspath(directory))
        self.directory = directory
        self.keep, self.every, self.async_save = keep, every, async_save
        self.report: list[str] = []  # what the last restore_or_init did, one line per event
        self._saved: set[int] = set()  # steps this instance wrote
        self._barriers = 0
        self._manager = self._new_manager()

    def _new_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(self.keep),
            enable_async_checkpointing=self.async_save,
            create=True,
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def _refresh_manager(self) -> None:
        self._manager.close()
        self._manager = self._new_manager()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.every == 0 and step not in self._saved

    def save(self, step: int, state, *, data_iterator=None, config_str: str | None = None,
             force: bool = False) -> bool:
        """Start saving ``state`` (and the iterator position and config) as ``step``; True if started.

        Asynchronous when ``async_save``: arrays are copied to host before this returns, so the
        caller may update or donate them; ``wait()`` blocks until the files are committed.
        """
        step = int(step)
        if not force and not self.should_save(step):
            return False
        if step in self._saved:
            log.info("checkpoint step %d was already saved by this run; not saving it again", step)
            return False
        if self._saved and step < max(self._saved):
            raise ValueError(f"save(step={step}): this run already saved step {max(self._saved)}; "
                             "steps must increase within a run")
        stale = [(s, p) for s, p in _finalized_steps(self.directory) if s >= step]
        self._sync("listed_for_save")  # every process lists before process 0 moves anything
        if stale:
            self._manager.wait_until_finished()
            for s, path in stale:
                self._move_aside(s, path, SUPERSEDED_DIR,
                                 f"step {s} is at or after step {step}, which a run that restarted from an "
                                 "older step is saving now")
            self._refresh_manager()
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        if config_str is not None:
            items[CONFIG] = ocp.args.JsonSave({"config_str": config_str})
        started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if started:
            self._saved.add(step)
        return started

    def latest_good_step(self) -> int | None:
        """The newest finalized step whose state metadata reads (arrays are checked at restore)."""
        for step, path in reversed(_finalized_steps(self.directory)):
            try:
                _read_tree_metadata(path)
                return step
            except Exception:  # noqa: BLE001 - any unreadable checkpoint is skipped here
                continue
        return None

    def restore_or_init(self, abstract_state, init_fn: Callable[[], Any], *, data_iterator=None):
        """``(state, step, restored)`` from the newest restorable checkpoint, else ``(init_fn(), 0, False)``.

        ``abstract_state``: pytree of ``jax.ShapeDtypeStruct`` with shardings; the arrays come back
        on them. ``data_iterator`` (a grain ``DatasetIterator``) is set to the saved position in place.
        Raises ``CheckpointMismatchError`` as described in the module docstring.
        """
        self._manager.wait_until_finished()
        self._manager.reload()
        self.report = []
        for tmp in ocp.path.step.all_temporary_paths(self.directory):
            self._note(logging.INFO, f"ignoring the unfinished save {tmp.get()}")
        wanted = _leaf_specs(abstract_state)
        start_position = data_iterator.get_state() if data_iterator is not None else None
        corrupt: list[tuple[int, epath.Path, str]] = []
        steps = _finalized_steps(self.directory)
        self._sync("listed_for_restore")
        for step, path in reversed(steps):
            try:
                state = self._restore(step, path, abstract_state, wanted, data_iterator)
            except CheckpointMismatchError:
                if data_iterator is not None:
                    data_iterator.set_state(start_position)
                raise
            except Exception as err:  # noqa: BLE001 - classified as corruption by _restore
                error = f"{type(err).__name__}: {err}"
                corrupt.append((step, path, error))
                self._note(logging.WARNING, f"checkpoint step {step} at {path} could not be restored and "
                                            f"is treated as corrupt: {_shorten(error)}")
                continue
            self._set_aside(corrupt)
            self._note(logging.INFO, f"restored checkpoint step {step} from {path}")
            return state, step, True
        self._set_aside(corrupt)
        if data_iterator is not None:  # a failed composite restore may have moved it
            data_iterator.set_state(start_position)
        self._note(logging.WARNING if corrupt else logging.INFO,
                   f"no restorable checkpoint in {self.directory}; initialising a fresh state at step 0")
        return init_fn(), 0, False

    def _restore(self, step: int, path: epath.Path, abstract_state, wanted, data_iterator):
        """The restored state; raises CheckpointMismatchError, or anything else for corruption."""
        problem = _structure_problem(_leaf_specs(_read_tree_metadata(path)), wanted)
        if problem:
            raise CheckpointMismatchError(
                f"checkpoint step {step} at {path} does not match the requested state ({problem}). "
                "Was the model or optimiser config changed? Use a new checkpoint directory, or move "
                "the old checkpoints away; nothing was moved or deleted.")
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if not (path / DATA).exists() and DATA not in _listed_items(path):
                raise CheckpointMismatchError(
                    f"checkpoint step {step} at {path} was saved without a data iterator, so the data "
                    "position cannot be restored; pass data_iterator=None to restore only the state")
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]
        except Exception as err:
            if _unreadable(path) is not None:
                raise
            raise CheckpointMismatchError(
                f"checkpoint step {step} at {path} reads back intact, but restoring it as requested "
                f"failed ({type(err).__name__}: {_shorten(str(err))}). Check the shardings of the "
                "abstract state against the mesh, device memory, and the data pipeline; nothing was "
                "moved or deleted.") from err

    def _set_aside(self, corrupt: list[tuple[int, epath.Path, str]]) -> None:
        for step, path, error in corrupt:
            self._move_aside(step, path, CORRUPT_DIR, error)
        if corrupt:
            self._refresh_manager()

    def _move_aside(self, step: int, path: epath.Path, kind: str, reason: str) -> epath.Path:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = self.directory / kind / f"{step}-{stamp}"
        n = 1
        while target.exists():
            target, n = self.directory / kind / f"{step}-{stamp}-{n}", n + 1
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
            target.parent.joinpath(target.name + ".txt").write_text(f"step {step} from {path}\n{reason}\n")
        self._sync(f"moved_{kind}_{step}")
        self._note(logging.WARNING, f"moved checkpoint step {step} from {path} to {target}")
        return target

    def _sync(self, name: str) -> None:
        if jax.process_count() > 1:
            self._barriers += 1
            ocp.multihost.sync_global_processes(f"kda_checkpoint_{name}_{self._barriers}")

    def _note(self, level: int, message: str) -> None:
        self.report.append(message)
        log.log(level, message)
        if level >= logging.WARNING:
            print(f"checkpoint: {message}", file=sys.stderr, flush=True)


def read_config(directory, step: int | None = None) -> str:
    """The gin config text saved with ``step`` (default: the newest finalized step) in ``directory``."""
    steps = dict(_finalized_steps(directory))
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    step = max(steps) if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no finished checkpoint for step {step} in {directory}; "
                                f"there are {sorted(steps)}")
    path = steps[step] / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"checkpoint step {step} in {directory} was saved without a config")
    return ocp.JsonCheckpointHandler().restore(path, ocp.args.JsonRestore())["config_str"]


def _finalized_steps(directory) -> list[tuple[int, epath.Path]]:
    found = ocp.path.step.standard_name_format().find_all(epath.Path(directory))
    return sorted((m.step, m.path) for m in found)


def _read_tree_metadata(step_path: epath.Path):
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.metadata(step_path / STATE).tree
    finally:
        handler.close()


def _listed_items(step_path: epath.Path) -> set[str]:
    """Item names the step's own metadata lists; raises when that metadata is unreadable."""
    meta = json.loads((step_path / "_CHECKPOINT_METADATA").read_text())
    return set(meta.get("item_handlers") or {})


def _leaf_name(key) -> str:
    # orbax stores every container as a dict of str keys; jax paths use DictKey / SequenceKey / GetAttrKey
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _dtype_name(dtype) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:  # e.g. typed PRNG keys
        return str(dtype)


def _leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"a/b/0": (shape, dtype name)}`` for every array leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_leaf_name(k) for k in keys): (tuple(x.shape), _dtype_name(x.dtype)) for keys, x in leaves}


def _structure_problem(saved: dict, wanted: dict, limit: int = 5) -> str | None:
    """Why the saved leaves do not fit the requested ones (paths, shapes, dtypes), or None."""
    problems = [f"{k}: missing in the checkpoint" for k in sorted(wanted.keys() - saved.keys())]
    problems += [f"{k}: in the checkpoint but not requested" for k in sorted(saved.keys() - wanted.keys())]
    problems += [f"{k}: saved {saved[k][0]} {saved[k][1]}, requested {wanted[k][0]} {wanted[k][1]}"
                 for k in sorted(saved.keys() & wanted.keys()) if saved[k] != wanted[k]]
    if not problems:
        return None
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def _unreadable(step_path: epath.Path) -> Exception | None:
    """Whether the step's files read back without any target: None if they do, else the error.

    Reads every array to host memory (no shardings, no device), every data iterator state and the
    config. It runs only after a failed restore, to tell a corrupt checkpoint from a bad request.
    """
    handler = ocp.PyTreeCheckpointHandler()
    try:
        for item in _listed_items(step_path):
            if not (step_path / item).exists():
                raise FileNotFoundError(f"item {item!r} is listed but {step_path / item} is missing")
        tree = _read_tree_metadata(step_path)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        handler.restore(step_path / STATE, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        if (step_path / DATA).exists():
            states = list((step_path / DATA).glob("process_*.json"))
            if not states:
                raise FileNotFoundError(f"no iterator state in {step_path / DATA}")
            for f in states:
                json.loads(f.read_text())
        if (step_path / CONFIG).exists():
            ocp.JsonCheckpointHandler().restore(step_path / CONFIG, ocp.args.JsonRestore())
    except Exception as err:  # noqa: BLE001 - any failure to read means the files are damaged
        return err
    finally:
        handler.close()
    return None


def _shorten(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."
