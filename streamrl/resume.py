"""Resume a run from its checkpoint: ``streamrl run FILE --resume RUN_DIR``.

::

    checkpoint = load_checkpoint("runs/dqn/20261122-101500-seed0")
    pipeline = build(cfg)                       # the same pipeline file and config the run started with
    restore(pipeline, checkpoint)               # model, optimizer, counters, limiter, replay, normaliser, ...
    streamrl.run(pipeline, run_dir, resume=checkpoint)    # frames, RNG states and metrics files continue

What a checkpoint holds is described in :mod:`streamrl.hooks.checkpoint`. The resumed run appends to
``metrics.csv`` and ``events.jsonl``, counts frames on from the checkpoint's (so ``total_frames`` is the budget of
the whole run, not of this segment) and reopens the replay store with every row committed before the stop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from streamrl.errors import ConfigError
from streamrl.hooks.checkpoint import FORMAT
from streamrl.pipeline import MAIN, Pipeline


def load_checkpoint(run_dir: str | Path, filename: str = "checkpoint.pt") -> dict[str, Any]:
    """The checkpoint of the run in ``run_dir``; a clear error when there is none."""
    path = Path(run_dir) / filename
    if not path.exists():
        raise ConfigError(f"cannot resume {str(run_dir)!r}: it has no {filename} (add a Checkpoint hook to the "
                          "pipeline, with every_frames= to survive kill -9)")
    checkpoint: dict[str, Any] = torch.load(path, weights_only=False)
    if checkpoint.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r} is not a streamrl checkpoint of format {FORMAT!r}")
    return checkpoint


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
