"""Collection throughput: env stage + policy stage + a sink, against a plain gymnasium loop, in one run.

    python tools/bench_collect.py [--frames 400000] [--repeats 3]

Both sides step gymnasium's native vector CartPole-v1 and choose actions with the same 64-unit MLP (two hidden
layers of 64, tanh, greedy argmax), one torch thread each. The plain loop only steps and infers; the streamrl
side also records every transition into chunks (observation, action, reward, done flags, next observation,
episode bookkeeping) and hands them to a sink stage. Runs alternate (plain, streamrl, plain, ...) and each figure
is the median over the repeats. The last line is JSON:
``{"envs_8": {"streamrl": fps, "plain": fps, "ratio": r}, "envs_64": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import gymnasium as gym
import torch

import streamrl
from streamrl import MLP, EnvStage, GymEnv, Pipeline, PolicyStage, QValueActor
from streamrl.testing import CountFrames


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(2, in_features=4, num_cells=(64, 64), activation=torch.nn.Tanh)


def plain_loop(num_envs: int, frames: int) -> float:
    """Frames per second of the plain loop: step, infer, repeat."""
    envs = gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="vector_entry_point")
    net = make_net()
    obs, _ = envs.reset(seed=0)
    steps = frames // num_envs
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            action = net(torch.from_numpy(obs)).argmax(-1).numpy()
            obs, _reward, _terminated, _truncated, _info = envs.step(action)
    elapsed = time.perf_counter() - start
    envs.close()
    return steps * num_envs / elapsed


def streamrl_pipeline(num_envs: int, frames: int, steps_per_chunk: int = 64) -> float:
    """Frames per second of env stage + policy stage + sink, whole run (start-up and shutdown included)."""
    p = Pipeline("bench_collect")
    p.add(
        EnvStage("env", GymEnv("CartPole-v1", num_envs=num_envs, seed=0),
                 frames_per_chunk=num_envs * steps_per_chunk, total_frames=frames),
        PolicyStage("policy", QValueActor(make_net())),
        CountFrames("sink"),
    )
    p.connect("env.requests", "policy.requests", capacity=1)
    p.connect("policy.actions", "env.actions", capacity=1)
    p.connect("env.chunks", "sink.chunks", capacity=4)
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        result = streamrl.run(p, run_dir, handle_signals=False)
        elapsed = time.perf_counter() - start
    return float(result.summary["frames"]) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=400_000, help="frames per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements per side (median)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for num_envs in (8, 64):
        frames = args.frames if num_envs == 8 else args.frames * 4
        plain, ours = [], []
        for _ in range(args.repeats):
            plain.append(plain_loop(num_envs, frames))
            ours.append(streamrl_pipeline(num_envs, frames))
        p, s = statistics.median(plain), statistics.median(ours)
        print(f"{num_envs:3d} envs: plain {p:10,.0f} frames/s   streamrl {s:10,.0f} frames/s   ratio {s / p:.3f}"
              f"   (runs: plain {[round(x) for x in plain]}, streamrl {[round(x) for x in ours]})")
        results[f"envs_{num_envs}"] = {"streamrl": round(s, 1), "plain": round(p, 1), "ratio": round(s / p, 3)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
