"""Resume a run from its checkpoint: ``streamrl run FILE --resume RUN_DIR``.

::

    checkpoint = load_checkpoint("runs/dqn/20261122-101500-seed0")
    pipeline = build(cfg)                       # the same pipeline file and config the run started with
    restore(pipeline, checkpoint)               # model, optimizer, counters, limiter, replay, normaliser, ...
    streamrl.run(pipeline, run_dir, resume=checkpoint)    # frames, RNG states and metrics files continue

What a checkpoint holds, and how it is saved, is described in :mod:`streamrl.hooks.checkpoint`. The resumed run
appends to ``metrics.csv`` and ``events.jsonl``, counts frames on from the checkpoint's (so ``total_frames`` is the
budget of the whole run, not of this segment) and reopens the replay store with every row committed before the stop.

Loading is safe and falls back:

* A checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain containers only. A file holding
  anything else (a crafted pickle whose ``__reduce__`` would run code, a checkpoint of an older streamrl holding
  numpy arrays, a bare pickle) is **refused** with a :class:`~streamrl.errors.CheckpointError` naming the file and
  the type it holds; nothing in it is executed, and no older checkpoint is tried in its place.
* A **damaged** newest checkpoint (truncated, empty, failing its archive's CRC check) or a missing one (a save killed
  between its two renames) is passed over for ``checkpoint.prev.pt``, with a warning; the returned checkpoint says
  which file it came from (``loaded_from``) and why (``fallback``).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import structlog
import torch

from streamrl.errors import CheckpointError, ConfigError
from streamrl.hooks.checkpoint import FORMAT, previous_name
from streamrl.pipeline import MAIN, Pipeline

log = structlog.get_logger("streamrl.resume")


class _Damaged(Exception):
    """A checkpoint file that is incomplete or corrupt (as opposed to refused as unsafe)."""


def load_checkpoint(run_dir: str | Path, filename: str = "checkpoint.pt") -> dict[str, Any]:
    """The newest checkpoint of the run in ``run_dir`` that loads; see the module docstring.

    Raises :class:`ConfigError` when the run has none, :class:`CheckpointError` when one is refused as unsafe, is
    not a streamrl checkpoint of this format, or when none loads.
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / filename, run_dir / previous_name(filename)]
    if not any(path.exists() for path in candidates):
        raise ConfigError(f"cannot resume {str(run_dir)!r}: it has no {filename} (add a Checkpoint hook to the "
                          "pipeline, with every_frames= to survive kill -9)")
    problems: list[str] = []
    for path in candidates:
        if not path.exists():
            problems.append(f"{path.name} is missing (a save was interrupted between its renames)")
            continue
        try:
            checkpoint = _read(path)
        except _Damaged as exc:
            problems.append(f"{path.name} is damaged: {exc}")
            continue
        checkpoint["loaded_from"] = path.name
        checkpoint["fallback"] = "; ".join(problems) or None
        if problems:
            log.warning("resuming from an older checkpoint", path=str(path), reason=checkpoint["fallback"])
        return checkpoint
    raise CheckpointError(f"cannot resume {str(run_dir)!r}: no checkpoint loads ({'; '.join(problems)}); start "
                          "the run again without --resume")


def _read(path: Path) -> dict[str, Any]:
    """Load one checkpoint file safely; :class:`_Damaged` if it is incomplete, :class:`CheckpointError` if refused."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != b"PK":  # torch.save writes a zip archive: anything else was never a (complete) checkpoint
        if magic[:1] == b"\x80":
            raise CheckpointError(_refusal(path, "a bare pickle, not a torch.save archive"))
        raise _Damaged("empty or not a torch.save archive")
    try:
        with zipfile.ZipFile(path) as archive:
            corrupt = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        raise _Damaged(f"incomplete archive (truncated?): {exc}") from exc
    if corrupt is not None:
        raise _Damaged(f"its member {corrupt!r} fails its CRC check")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:  # the archive is intact: this is what was written, and it holds code
        found = re.search(r"GLOBAL (\S+)|but got (<class '[^']*'>|\S+)", str(exc))
        held = (found.group(1) or found.group(2)) if found else "an object the safe loader does not accept"
        raise CheckpointError(_refusal(path, f"a pickled object of type {held}")) from exc
    except Exception as exc:  # noqa: BLE001 - whatever else torch raises on an archive it cannot read
        raise _Damaged(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        got = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{str(path)!r} is not a streamrl checkpoint of format {FORMAT!r} (got {got!r}); "
                              "resume it with the streamrl version that wrote it, or start the run again")
    return checkpoint


def _refusal(path: Path, holds: str) -> str:
    return (f"refusing to load {str(path)!r}: it holds {holds}; a streamrl checkpoint holds only tensors and plain "
            "containers, and loading this one could run code. Nothing in it was executed. Resume from a checkpoint "
            "that this streamrl version wrote, from a source you trust")


def restore(pipeline: Pipeline, checkpoint: dict[str, Any]) -> None:
    """Load the checkpoint's stage and hook states into ``pipeline`` (before it runs); names must match."""
    missing = sorted(set(checkpoint["stages"]) - set(pipeline.stages))
    if missing:
        raise ConfigError(f"the checkpoint has stages {missing} that this pipeline lacks: resume with the pipeline "
                          "file the run started with")
    for name, state in checkpoint["stages"].items():
        pipeline.stages[name].load_state_dict(state)
    hooks = {hook.name: hook for hook in pipeline.hooks_in(MAIN)}
    for name, state in checkpoint["hooks"].items():
        if name in hooks:
            hooks[name].load_state_dict(state)
