"""Async overlap: the DQN pipeline against collection alone and learning alone, on the same budget.

    python tools/bench_overlap.py [--frames 50000] [--set key=value ...]

Three runs of `pipelines/dqn_cartpole.py` (its default config, no evaluation, no early stop), each timed from
`streamrl.run` to its return (worker start-up included):

* **collect-only** — the env + policy group (in its worker process) and the replay writer: ``frames`` frames
  (the fork server that starts workers is warmed up before any timing);
* **learn-only** — the sampler and the learner on a replay pre-filled with ``frames`` transitions: the same
  number of updates the rate limiter grants the pipeline (``frames * updates_per_frame``);
* **pipeline** — everything, concurrently.

The bar: pipeline wall <= 0.7 x (collect-only + learn-only). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import streamrl
from streamrl.config import apply_overrides
from streamrl.loader import load_module, module_name_for
from streamrl.pipeline import Pipeline
from streamrl.replay.ratelimit import RateLimiter
from streamrl.testing import random_chunks

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "dqn_cartpole.py"


def without(p: Pipeline, *names: str) -> Pipeline:
    """The pipeline minus some stages and every edge touching them."""
    for name in names:
        del p.stages[name]
        del p.stage_group[name]
    p.edges = [e for e in p.edges if e.src_stage not in names and e.dst_stage not in names]
    return p


def timed(p: Pipeline, seed: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        result = streamrl.run(p, run_dir, seed=seed, handle_signals=False,
                              preload=[(module_name_for(PIPELINE), str(PIPELINE))])
        return time.perf_counter() - start, result.summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    module = load_module(PIPELINE, module_name_for(PIPELINE))
    overrides = [f"total_frames={args.frames}", f"seed={args.seed}", "eval_every=1_000_000_000", *args.set]
    cfg = apply_overrides(module.Config(), overrides)
    torch.set_num_threads(1)
    warm_start = apply_overrides(cfg, ["total_frames=1000"])  # start the fork server before timing anything
    timed(without(module.build(warm_start), "sampler", "learner"), args.seed)

    collect = without(module.build(cfg), "sampler", "learner")
    collect.stages["writer"].buffer.limiter = RateLimiter()  # nothing samples: inserts are not paced
    collect_s, collect_summary = timed(collect, args.seed)

    learn = without(module.build(cfg), "collect_env", "collect_policy", "writer")
    replay = learn.stages["sampler"].buffer
    replay.storage = streamrl.RamStorage(cfg.buffer_size)
    for chunk in random_chunks(args.frames // 1000, num_envs=10, steps=100):
        replay.extend(chunk)
    replay.limiter.inserted(len(replay))
    replay.limiter.close_inserts()  # the learner takes exactly frames * updates_per_frame batches, then ends
    learn_s, learn_summary = timed(learn, args.seed)

    full_s, full_summary = timed(module.build(cfg), args.seed)

    ratio = full_s / (collect_s + learn_s)
    print(f"collect-only: {collect_s:7.2f} s  ({collect_summary['frames']} frames)")
    print(f"learn-only:   {learn_s:7.2f} s  ({learn_summary['optim_steps']} updates)")
    print(f"pipeline:     {full_s:7.2f} s  ({full_summary['frames']} frames, {full_summary['optim_steps']} updates, "
          f"bottleneck {full_summary['stages']['bottleneck']})")
    print(f"pipeline / (collect + learn) = {ratio:.3f}  (bar: <= 0.7)")
    print(json.dumps({"collect_only_s": round(collect_s, 3), "learn_only_s": round(learn_s, 3),
                      "pipeline_s": round(full_s, 3), "ratio": round(ratio, 3),
                      "frames": full_summary["frames"], "updates": full_summary["optim_steps"]}))


if __name__ == "__main__":
    sys.exit(main())
