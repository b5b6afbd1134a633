"""Collection throughput against the number of collector replicas, in one run.

    python tools/bench_scale.py [--replicas 1 2 4 8] [--seconds 8] [--workload cartpole pixels]

Each replica is a collector group (env stage + policy stage, :meth:`Pipeline.add_collector`) in its own worker
process, with one torch thread; chunks fan in to a sink in the main process that counts frames. Two workloads:

* **cartpole**: 64 native-vector CartPole-v1 envs per replica, a 64-unit MLP greedy policy;
* **pixels**: the collector of ``pipelines/dqn_cartpole_pixels.py`` (rendered frames, the pipeline's transform
  stack and Q-network), its ``num_envs`` envs per replica.

Frames/s is measured in the steady state: from the sink's first chunk to the end of the budget (``--seconds`` of
collection at the one-replica rate, scaled by the replica count), so process start-up is not counted. Efficiency
is frames/s at N replicas over N x frames/s at one replica: 1.0 is linear. The figure depends on the machine
(cores): it is printed with ``os.cpu_count()``. Run it alone: a benchmark that shares its cores measures the
neighbours. The last line is JSON: ``{"cpus": n, "cartpole": {"1": {"fps": .., "efficiency": 1.0}, ...}, ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from streamrl import MLP, GymEnv, Pipeline, QValueActor, Stage, StageContext, run
from streamrl.loader import load_module

ROOT = Path(__file__).resolve().parent.parent


class Meter(Stage):
    """Counts chunk rows (env steps x envs) from the first chunk on; stops the run after ``frames`` of them."""

    inputs = ("chunks",)

    def __init__(self, name: str, frames: int) -> None:
        super().__init__(name)
        self.budget = frames
        self.frames = 0
        self.first_at: float | None = None
        self.last_at = 0.0

    async def run(self, ctx: StageContext) -> None:
        async for chunk in ctx.input("chunks"):
            now = time.perf_counter()
            if self.first_at is None:
                self.first_at = now
            else:
                self.frames += chunk.numel()
            self.last_at = now
            if self.frames >= self.budget:
                ctx.run.request_stop("benchmark budget reached")

    def fps(self) -> float:
        return self.frames / max(self.last_at - (self.first_at or self.last_at), 1e-9)


def cartpole_collector() -> tuple[Any, Any, int]:
    torch.manual_seed(0)
    policy = QValueActor(MLP(2, in_features=4, num_cells=(64, 64), activation=torch.nn.Tanh))
    return GymEnv("CartPole-v1", num_envs=64, seed=0), policy, 64 * 64


def pixels_collector() -> tuple[Any, Any, int]:
    module = load_module(ROOT / "pipelines" / "dqn_cartpole_pixels.py")
    built = module.build(module.Config(total_frames=1_000_000))
    env_stage = next(s for s in built.stages.values() if type(s).__name__ == "EnvStage")
    policy_stage = next(s for s in built.stages.values() if type(s).__name__ == "PolicyStage")
    return env_stage.env, policy_stage.policy, env_stage.env.num_envs * 16


def measure(make: Any, replicas: int, frames: int, placement: str = "worker_process",
            frames_per_chunk: int | None = None) -> float:
    """Steady-state frames/s of ``replicas`` copies of ``make()``'s collector (``frames_per_chunk``: its own)."""
    env, policy, own_chunk = make()
    p = Pipeline("bench_scale")
    c = p.add_collector("collect", env, policy, frames_per_chunk=frames_per_chunk or own_chunk, replicas=replicas,
                        weights_from=None, placement=placement)  # type: ignore[arg-type]
    meter = Meter("meter", frames)
    p.add(meter)
    p.connect(c.chunks, "meter.chunks", capacity=2 * replicas)
    with tempfile.TemporaryDirectory() as run_dir:
        run(p, run_dir, handle_signals=False, drain_timeout=2.0)
    return meter.fps()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of collection at the one-replica rate")
    parser.add_argument("--workload", nargs="+", default=["cartpole", "pixels"], choices=["cartpole", "pixels"])
    args = parser.parse_args()
    makers = {"cartpole": cartpole_collector, "pixels": pixels_collector}
    results: dict[str, Any] = {"cpus": os.cpu_count()}
    print(f"machine: {os.cpu_count()} CPUs; one torch thread per replica", file=sys.stderr)
    for workload in args.workload:
        one = measure(makers[workload], 1, 10_000)  # a short probe sizes the budgets
        budget = int(one * args.seconds)
        rows: dict[str, Any] = {}
        base = None
        for n in args.replicas:
            fps = measure(makers[workload], n, budget * n)
            base = base if base is not None else (fps if n == 1 else one)
            rows[str(n)] = {"fps": round(fps, 1), "efficiency": round(fps / (n * base), 3)}
            print(f"{workload:8s} {n:2d} replicas: {fps:12,.0f} frames/s   efficiency {fps / (n * base):.3f}",
                  file=sys.stderr)
        results[workload] = rows
    print(json.dumps(results))


if __name__ == "__main__":
    main()
