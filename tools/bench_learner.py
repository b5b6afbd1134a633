"""Learner throughput: DQN updates per second on CPU and on CUDA (pinned batches, non-blocking copies).

    python tools/bench_learner.py [--updates 2000] [--batch-sizes 128 4096]

Runs the sampler + learner stages of `pipelines/dqn_cartpole.py` on a replay pre-filled with random CartPole-like
transitions, once per device and batch size, and checks on CUDA that batches arrive in pinned memory. The last
line is JSON: ``{"cpu": {"128": updates_per_s, ...}, "cuda": {...}}``.
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
from streamrl.testing import random_chunks

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "dqn_cartpole.py"


def learn_only(module, device: str, batch_size: int, updates: int) -> tuple[float, dict]:
    frames = int(updates / 0.125)
    cfg = apply_overrides(module.Config(), [f"device={device}", f"batch_size={batch_size}", f"total_frames={frames}",
                                            "eval_every=1_000_000_000"])
    p = module.build(cfg)
    for name in ("collect_env", "collect_policy", "writer"):
        del p.stages[name]
        del p.stage_group[name]
    p.edges = [e for e in p.edges if {e.src_stage, e.dst_stage}.isdisjoint({"collect_env", "collect_policy", "writer"})]
    sampler = p.stages["sampler"]
    replay = sampler.buffer
    replay.storage = streamrl.RamStorage(cfg.buffer_size)
    for chunk in random_chunks(max(1, frames // 1000), num_envs=10, steps=100):
        replay.extend(chunk)
    replay.limiter.inserted(frames)
    replay.limiter.close_inserts()
    on_device = []
    p.on("batch", lambda event: on_device.append(event.data["batch"].device.type == device))
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        result = streamrl.run(p, run_dir, device=device, handle_signals=False)
        elapsed = time.perf_counter() - start
    steps = result.summary["optim_steps"]
    return steps / elapsed, {"steps": steps, "batches_on_device": all(on_device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 4096])
    args = parser.parse_args()
    module = load_module(PIPELINE, module_name_for(PIPELINE))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results: dict[str, dict[str, float]] = {}
    for device in devices:
        for batch in args.batch_sizes:
            rate, info = learn_only(module, device, batch, args.updates)
            results.setdefault(device, {})[str(batch)] = round(rate, 1)
            print(f"{device:5s} batch {batch:5d}: {rate:8.1f} updates/s  {info}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
