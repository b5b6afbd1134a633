"""Collection throughput: env stage + policy stage + a sink, against a plain gymnasium loop, in one run.

    python tools/bench_collect.py [--frames 400000] [--repeats 3]

Both sides step gymnasium's native vector CartPole-v1 and choose actions with the same 64-unit MLP (two hidden
layers of 64, tanh, greedy argmax), one torch thread each.

* **plain**: the loop users write by hand (CleanRL style): infer, step, store observation, action, reward and the
  done flags into preallocated numpy rollout buffers of ``steps_per_chunk`` steps.
* **bare** (for reference): infer and step, storing nothing.
* **streamrl**: ``EnvStage`` + ``PolicyStage`` + a sink stage in one event loop: env and policy joined by a
  rendezvous exchange (``capacity=0``: the env stage calls the policy's handler directly, which acts on the
  observation tensor alone), chunks to the sink by a bounded stream; the env stage records every transition into
  chunks of 256 steps per env (TensorDicts with next observations, episode ids, step counts, policy versions).
  Timed from ``streamrl.run`` to its return. (Chunks of 128 steps cost about 2 % more at 8 envs: per-chunk work
  is amortized over fewer steps.)

Both sides count frames the same way: env steps x envs. (A run's summary counts transitions instead: with
gymnasium's next-step auto-reset, the step after an episode end only resets that env and is not a transition;
under this untrained policy CartPole episodes last ~9 steps, so ~10 % of the steps are such resets.)

Runs alternate (plain, bare, streamrl, plain, ...) in short segments, because this machine's speed drifts; the
ratio is the median over the segments of streamrl / plain measured side by side. The last line is JSON:
``{"envs_8": {"streamrl": fps, "plain": fps, "ratio": r, "bare": fps}, "envs_64": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import gymnasium as gym
import numpy as np
import torch

from streamrl import MLP, GymEnv, QValueActor
from streamrl.testing import collection_fps


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(2, in_features=4, num_cells=(64, 64), activation=torch.nn.Tanh)


def plain_loop(num_envs: int, frames: int, steps_per_chunk: int = 256, store: bool = True) -> float:
    """Frames per second of a hand-written collection loop (``store=False``: infer and step only)."""
    envs = gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="vector_entry_point")
    net = make_net()
    obs, _ = envs.reset(seed=0)
    T = steps_per_chunk
    observations = np.zeros((T + 1, num_envs, 4), dtype=np.float32)
    actions = np.zeros((T, num_envs), dtype=np.int64)
    rewards = np.zeros((T, num_envs), dtype=np.float32)
    terminateds = np.zeros((T, num_envs), dtype=bool)
    truncateds = np.zeros((T, num_envs), dtype=bool)
    observations[0] = obs
    steps = frames // num_envs
    t = 0
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            action = net(torch.from_numpy(obs)).argmax(-1).numpy()
            obs, reward, terminated, truncated, _info = envs.step(action)
            if store:
                actions[t] = action
                observations[t + 1] = obs
                rewards[t] = reward
                terminateds[t] = terminated
                truncateds[t] = truncated
                t += 1
                if t == T:
                    observations[0] = observations[T]
                    t = 0
    elapsed = time.perf_counter() - start
    envs.close()
    return steps * num_envs / elapsed


def streamrl_pipeline(num_envs: int, frames: int, steps_per_chunk: int = 256) -> float:
    """Frames per second of env stage + policy stage + sink, whole run (start-up and shutdown included)."""
    env = GymEnv("CartPole-v1", num_envs=num_envs, seed=0)
    return collection_fps(env, QValueActor(make_net()), frames=frames, frames_per_chunk=num_envs * steps_per_chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100_000, help="frames per segment at 8 envs (x4 at 64)")
    parser.add_argument("--repeats", type=int, default=9, help="alternating segments per side (median)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for num_envs in (8, 64):
        frames = args.frames if num_envs == 8 else args.frames * 4
        plain, bare, ours = [], [], []
        for _ in range(args.repeats):
            plain.append(plain_loop(num_envs, frames))
            bare.append(plain_loop(num_envs, frames, store=False))
            ours.append(streamrl_pipeline(num_envs, frames))
        p, b, s = statistics.median(plain), statistics.median(bare), statistics.median(ours)
        ratio = statistics.median(x / y for x, y in zip(ours, plain, strict=True))
        bare_ratio = statistics.median(x / y for x, y in zip(ours, bare, strict=True))
        print(f"{num_envs:3d} envs: plain {p:10,.0f} frames/s   streamrl {s:10,.0f} frames/s   ratio {ratio:.3f}"
              f"   (bare loop {b:,.0f} frames/s, ratio to it {bare_ratio:.3f})")
        results[f"envs_{num_envs}"] = {"streamrl": round(s, 1), "plain": round(p, 1), "ratio": round(ratio, 3),
                                       "bare": round(b, 1), "ratio_to_bare": round(bare_ratio, 3)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
