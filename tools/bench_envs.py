"""Pixel env throughput: our transformed pixel env in an env stage, against a hand-written loop, in one run.

    python tools/bench_envs.py [--frames 3000] [--repeats 3] [--workers 1 2]

Every side renders CartPole-v1 in gymnasium subprocess workers (one env each, observations in shared memory) and
preprocesses the frames the same way: uint8 HWC → float CHW / 255 → grayscale → bilinear resize to 64x64 → a
stack of the last 4 frames (restarted at each reset) → normalisation with a fixed mean and std. Actions are
random.

* **plain**: the loop users write by hand: ``step``, preprocess with torch calls in the main process, keep the
  frame stack.
* **streamrl** (the stack in the collector's process): ``TransformedEnv(GymEnv(..., from_pixels=True),
  Compose(ToTensorImage(), GrayScale(), Resize(64, 64), CatFrames(4), ObservationNorm(...)))``;
* **streamrl_workers** (the stack where the envs step): ``GymEnv(..., from_pixels=True,
  worker_transform=Compose(...the same...))``: each worker preprocesses its own frames and shares the 4x64x64
  stack instead of the 400x600x3 render.

The streamrl sides are stepped by an ``EnvStage`` (a random policy stage, a sink counting frames), chunks of 32
steps, timed from ``streamrl.run`` to its return. Runs alternate (plain, streamrl, streamrl_workers, plain, ...)
because a machine's speed drifts; a ratio is the median of the paired ratios against plain. With as many workers
as cores, the three sides compete for the same cores and differ little; the workers' side grows with more cores
than workers. The last line is JSON: ``{"workers_1": {"streamrl": fps, "streamrl_workers": fps, "plain": fps,
"ratio": r, "ratio_workers": r}, ...}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import gymnasium as gym
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers import AddRenderObservation
from tensordict.nn import TensorDictModuleBase

from streamrl import GymEnv
from streamrl.testing import collection_fps
from streamrl.transforms import CatFrames, Compose, GrayScale, ObservationNorm, Resize, ToTensorImage, TransformedEnv

GRAY = torch.tensor([0.2989, 0.587, 0.114]).view(3, 1, 1)
LOC, SCALE = 0.9, 0.2  # a fixed normalisation: (x - LOC) / SCALE


def plain_loop(workers: int, frames: int) -> float:
    envs = gym.make_vec("CartPole-v1", num_envs=workers, vectorization_mode="async", render_mode="rgb_array",
                        wrappers=[AddRenderObservation],
                        vector_kwargs={"shared_memory": True, "autoreset_mode": AutoresetMode.SAME_STEP})

    def preprocess(pixels):
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        x = (x * GRAY).sum(-3, keepdim=True)
        x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        return x

    obs, _ = envs.reset(seed=0)
    stack = preprocess(obs).repeat(1, 4, 1, 1)
    steps = frames // workers
    start = time.perf_counter()
    for _ in range(steps):
        obs, reward, terminated, truncated, info = envs.step(envs.action_space.sample())
        frame = preprocess(obs)
        stack = torch.cat([stack[:, 1:], frame], dim=1)
        done = torch.from_numpy(terminated | truncated)
        if done.any():  # the rows of reset envs restart from their first frame
            stack[done] = frame[done].repeat(1, 4, 1, 1)
        policy_input = (stack - LOC) / SCALE  # noqa: F841 - what a policy would read
    elapsed = time.perf_counter() - start
    envs.close()
    return steps * workers / elapsed


class RandomAction(TensorDictModuleBase):
    in_keys, out_keys = ["pixels"], ["action"]

    def forward(self, td):
        return td.set("action", torch.randint(0, 2, td.batch_size))


def pixel_stack() -> Compose:
    norm = ObservationNorm(loc=LOC, scale=SCALE, standard_normal=True, in_keys=["pixels"])
    return Compose(ToTensorImage(), GrayScale(), Resize(64, 64), CatFrames(4, dim=-3), norm)


def pixel_env(workers: int, *, in_workers: bool) -> TransformedEnv | GymEnv:
    """The pixel env with the stack in this process (a TransformedEnv) or in the env workers."""
    if in_workers:
        return GymEnv("CartPole-v1", num_envs=workers, from_pixels=True, backend="subprocess", seed=0,
                      worker_transform=pixel_stack())
    base = GymEnv("CartPole-v1", num_envs=workers, from_pixels=True, backend="subprocess", seed=0)
    return TransformedEnv(base, pixel_stack())


def streamrl_pipeline(workers: int, frames: int, *, in_workers: bool = False, steps_per_chunk: int = 32) -> float:
    env = pixel_env(workers, in_workers=in_workers)
    return collection_fps(env, RandomAction(), frames=frames, frames_per_chunk=workers * steps_per_chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=3000, help="frames per segment and side")
    parser.add_argument("--repeats", type=int, default=3, help="alternating segments per side (median)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="env worker counts to measure")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for workers in args.workers:
        plain, ours, ours_workers = [], [], []
        for _ in range(args.repeats):
            plain.append(plain_loop(workers, args.frames))
            ours.append(streamrl_pipeline(workers, args.frames))
            ours_workers.append(streamrl_pipeline(workers, args.frames, in_workers=True))
        p, s, w = statistics.median(plain), statistics.median(ours), statistics.median(ours_workers)
        ratio = statistics.median(x / y for x, y in zip(ours, plain, strict=True))
        ratio_workers = statistics.median(x / y for x, y in zip(ours_workers, plain, strict=True))
        print(f"{workers} worker(s): plain {p:8,.0f} frames/s   streamrl {s:8,.0f} frames/s (ratio {ratio:.3f})   "
              f"stack in the workers {w:8,.0f} frames/s (ratio {ratio_workers:.3f})")
        results[f"workers_{workers}"] = {"streamrl": round(s, 1), "streamrl_workers": round(w, 1),
                                         "plain": round(p, 1), "ratio": round(ratio, 3),
                                         "ratio_workers": round(ratio_workers, 3)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
