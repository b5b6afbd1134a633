"""Checkpoints: everything ``streamrl run FILE --resume RUN_DIR`` needs, saved atomically, two kept.

::

    pipeline.add_hook(Checkpoint(every_frames=20_000))   # and always at the end of the run

**What it holds.** ``<run dir>/checkpoint.pt`` holds the state dicts of every stage (model, optimizer, learner
counters, the replay buffer's rate limiter, sampler and storage; an env's transforms, e.g. normaliser statistics) and
of the main process's hooks, the frames each collecting stage reached, and the RNG states. Stages in a worker
process are saved from the main process's copy of them plus the progress their events reported (their frame
counts); what changes inside a worker while it runs (epsilon, policy weights) follows from the frames and the
learner's state. A replay store on disk is not copied: the checkpoint names it and :class:`~streamrl.ZarrStorage`
reopens it with every committed row. A RAM storage is saved whole.

**Safe to load.** A checkpoint holds only tensors and plain containers (dicts, lists, tuples, numbers, strings,
``None``), so :func:`streamrl.resume.load_checkpoint` reads it with ``torch.load(weights_only=True)``, which never
runs code. Each save checks that (:func:`audit_payload`): a ``state_dict`` returning anything else (an ndarray, a
TensorDict, an object) fails the save with the entry's path, instead of writing a file that will not load.

**Nothing non-finite.** The same check refuses a payload with a NaN or infinite floating tensor
(:class:`~streamrl.errors.NonFiniteError` naming the entry, e.g. ``stages/learner/loss/value_net.0.weight``):
nothing is written and the previous checkpoints stay. After a learner stopped the run with a ``NonFiniteError``,
the end-of-run save is skipped: its weights are finite (the guard stops before the optimizer step) but they are
those that led to the NaN, and must not push a good checkpoint out of the rotation.

**Consistent.** A save first enters :meth:`~streamrl.stages.base.Stage.held_for_checkpoint` of every stage of the
main process (a replay writer commits its store and holds inserts), reads every state and serializes them while
holding them (no other stage runs during the synchronous read and ``torch.save``: the file is one instant of the
run), then lets go and finishes the file in a thread.

**Atomic, two kept.** The file is written to ``checkpoint.pt.tmp`` and fsynced; then ``checkpoint.pt`` becomes
``checkpoint.prev.pt`` and the new file becomes ``checkpoint.pt`` (two renames). A kill at any instant leaves at
least one complete checkpoint: a resume loads the newest that loads and says when it fell back. A save that fails
(a full disk: :class:`~streamrl.errors.DiskFull`) removes its temporary file and leaves both checkpoints as they
were. A save runs in ``close`` too, which the runtime calls on every exit path (Ctrl-C and a failed stage
included); after ``kill -9`` the last periodic checkpoint is what a resume starts from.
"""

from __future__ import annotations

import contextlib
import errno
import os
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import structlog
import torch

from streamrl.errors import CheckpointError, DiskFull, NonFiniteError, StageFailed
from streamrl.events import Event, Hook
from streamrl.execution.context import RunContext, off_loop
from streamrl.pipeline import MAIN
from streamrl.seeding import rng_state

FORMAT = "streamrl.checkpoint/2"

log = structlog.get_logger("streamrl.checkpoint")

_PLAIN_LEAVES = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device)
_CONTAINERS = (dict, OrderedDict, list, tuple, torch.Size)


def previous_name(filename: str) -> str:
    """The name the rotation gives the previous checkpoint: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(filename)
    return f"{path.stem}.prev{path.suffix}"


def audit_payload(payload: Any) -> None:
    """Check that ``payload`` loads with ``torch.load(weights_only=True)`` and holds only finite tensors.

    Raises :class:`CheckpointError` at the first entry that is not a tensor or a plain container/value, and
    :class:`NonFiniteError` at the first floating tensor holding a NaN or an infinity; both name the entry's path
    (``stages/learner/optimizer/state/0/exp_avg``).
    """
    floating: list[tuple[str, torch.Tensor]] = []
    stack: list[tuple[str, Any]] = [("", payload)]
    while stack:
        path, value = stack.pop()
        kind = type(value)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            if value.is_floating_point() or value.is_complex():
                floating.append((path, value))
        elif kind in (dict, OrderedDict):
            for key, item in reversed(value.items()):
                if type(key) not in (str, int):
                    raise CheckpointError(_not_plain(f"{path}/<key {key!r}>", key))
                stack.append((f"{path}/{key}" if path else str(key), item))
        elif kind in _CONTAINERS:
            stack.extend((f"{path}/{i}", item) for i, item in reversed(list(enumerate(value))))
        elif kind not in _PLAIN_LEAVES:
            raise CheckpointError(_not_plain(path, value))
    for path, tensor in reversed(floating):  # payload order: the first non-finite entry is named
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(
                f"checkpoint entry {path!r} ({tuple(tensor.shape)}) holds NaN or infinite values: nothing was saved "
                "and the previous checkpoints are kept. A learner's weights or optimizer state went non-finite "
                "(lower the learning rate, clip gradients) or a transform or storage holds inf/NaN observations"
            )


def _not_plain(path: str, value: Any) -> str:
    kind = type(value)
    return (f"cannot checkpoint entry {path!r}: it is a {kind.__module__}.{kind.__qualname__}, but a checkpoint holds "
            "only tensors and plain containers (dict, list, tuple, int, float, str, bool, None), so that it loads "
            "with torch.load(weights_only=True), which never runs code. Convert it in the state_dict that returns it "
            "(an ndarray with torch.from_numpy, a TensorDict with .to_dict(), an object as a dict of its fields)")


def _no_save_at_close(error: BaseException | None) -> str | None:
    """Why the run's failure (directly or as a failed stage's cause) forbids the checkpoint at its close, if it does:
    weights that led to a non-finite value, or a full disk (no room, and the store could not commit its rows)."""
    if isinstance(error, StageFailed):
        error = error.error
    if isinstance(error, NonFiniteError):
        return "a non-finite value"
    if isinstance(error, DiskFull):
        return "a full disk"
    return None


class Checkpoint(Hook):
    """Saves the run's state every ``every_frames`` frames (if set) and at the end; see the module docstring."""

    events = ("chunk",)
    mode = "lossy"
    main_only = True

    def __init__(self, *, every_frames: int | None = None, filename: str = "checkpoint.pt",
                 name: str | None = None) -> None:
        super().__init__(name)
        self.every_frames = every_frames
        self.filename = filename
        self.next_at = every_frames or 0
        self.run: RunContext | None = None

    async def start(self, run: RunContext) -> None:
        self.run = run
        if self.every_frames and run.recorder is not None:
            self.next_at = run.recorder.frames + self.every_frames
        self._temporary(Path(run.run_dir) / self.filename).unlink(missing_ok=True)  # a save killed mid-write

    async def on_event(self, event: Event) -> None:
        assert self.run is not None and self.run.recorder is not None
        if self.every_frames and self.run.recorder.frames >= self.next_at:
            self.next_at = self.run.recorder.frames + self.every_frames
            await self.save(self.run)

    def payload(self, run: RunContext) -> dict[str, Any]:
        """What the checkpoint holds, read from the live stages and hooks (tensors are not copied)."""
        assert run.pipeline is not None and run.recorder is not None
        pipeline, progress = run.pipeline, dict(run.recorder.frames_by_source)
        stages = {}
        for stage in pipeline.stages.values():
            state = stage.state_dict()
            process = pipeline.process_of(stage.name)
            if process != MAIN:  # the worker's copy is ahead of ours: take what events said
                if "frames" in state:  # replicas resume from the count of the one that collected least
                    sources = [pipeline.replica_label(stage.name, r) for r in range(pipeline.replicas_of(process))]
                    state["frames"] = min(progress.get(source, state["frames"]) for source in sources)
                if "version" in state:
                    state["version"] = run.recorder.policy_version
            stages[stage.name] = state
        return {
            "format": FORMAT,
            "frames": run.recorder.frames,
            "wall_s": run.elapsed(),
            "progress": progress,
            "stages": stages,
            "hooks": {hook.name: hook.state_dict() for hook in pipeline.hooks_in(MAIN) if hook is not self},
            "rng": rng_state(),
        }

    async def save(self, run: RunContext) -> Path:
        """Write a checkpoint (see the module docstring); returns its path."""
        assert run.pipeline is not None
        path = Path(run.run_dir) / self.filename
        tmp = self._temporary(path)
        try:
            async with contextlib.AsyncExitStack() as held:
                for stage in run.pipeline.stages_in(MAIN):
                    await held.enter_async_context(stage.held_for_checkpoint())
                payload = self.payload(run)
                audit_payload(payload)
                _write_failures(path, lambda: _serialize(payload, tmp))  # in the hold: one instant of the run
            await off_loop(run, _install, tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        await run.bus.publish("checkpoint", self.name, {"path": str(path), "frames": payload["frames"]})
        return path

    async def close(self, run: RunContext) -> None:
        if reason := _no_save_at_close(run.error):
            log.warning(f"no checkpoint at the end of a run stopped by {reason}; the previous ones stay",
                        path=str(Path(run.run_dir) / self.filename))
            return
        await self.save(run)

    @staticmethod
    def _temporary(path: Path) -> Path:
        return path.with_name(path.name + ".tmp")


def _serialize(payload: dict[str, Any], tmp: Path) -> None:
    """``torch.save`` through a Python file, so that a failed write raises its ``OSError`` (ENOSPC included)."""
    with open(tmp, "wb") as f:
        torch.save(payload, f)


def _install(tmp: Path, path: Path) -> None:
    """Make the written ``tmp`` the newest checkpoint: fsync it, rotate the current one to the previous, rename.

    The current file is rotated only if it is a complete archive: a truncated one (left by a crash of an older
    version, or damaged) is simply replaced, so the previous checkpoint stays one that loads.
    """
    def commit() -> None:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if path.exists() and zipfile.is_zipfile(path):
            os.replace(path, path.with_name(previous_name(path.name)))
        os.replace(tmp, path)

    _write_failures(path, commit)
    with contextlib.suppress(OSError):  # make the renames durable where the platform allows it
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_failures(path: Path, write: Any) -> None:
    """Run ``write``; a full disk becomes :class:`DiskFull` naming the checkpoint (other ``OSError``s name their
    file already)."""
    try:
        write()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFull(path, "free space; no checkpoint was saved and the previous ones are kept") from exc
        raise
