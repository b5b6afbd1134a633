"""``VideoRecorder``: the frames of env 0 written as a GIF.

::

    recorder = VideoRecorder(in_key="pixels", path="runs/dqn/rollout.gif", fps=30)
    env = TransformedEnv(GymEnv("CartPole-v1", from_pixels=True, pixels_only=False, backend="sync"), recorder)
    env.rollout(200)
    recorder.dump()                      # writes the GIF (also done by env.close()); returns its path

    eval_env = TransformedEnv(GymEnv("CartPole-v1", num_envs=8, from_pixels=True, pixels_only=False),
                              VideoRecorder(episodes=1))
    Evaluate(eval_env, actor, every_frames=10_000)  # each evaluation's first episode of env 0 goes to
                                                    # <run_dir>/eval_<frames>.gif

Frames may be uint8 ``[H, W, C]`` or float ``[C, H, W]`` in [0, 1] (after ``ToTensorImage``), RGB or one
channel; stacked gray frames (``CatFrames``) show their newest frame. Pillow merges identical consecutive frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDictBase

from streamrl.envs.base import EnvBase
from streamrl.errors import ConfigError
from streamrl.transforms.base import Compose, Transform, TransformedEnv


def _to_image(frame: torch.Tensor) -> np.ndarray:
    """A uint8 ``[H, W, 3]`` or ``[H, W]`` array from a frame in any of the layouts the module docstring lists."""
    x = frame.detach().cpu()
    if x.dtype.is_floating_point:
        x = (x.clamp(0, 1) * 255).round()
    x = x.to(torch.uint8)
    if x.ndim == 3 and x.shape[-1] not in (1, 3):  # channels first; stacked gray frames show the newest
        x = x.permute(1, 2, 0) if x.shape[0] == 3 else x[-1]
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (2, 3):
        raise ValueError(f"VideoRecorder: cannot make an image of a frame of shape {tuple(frame.shape)}")
    return x.numpy()


class VideoRecorder(Transform):
    """Records ``in_key`` of env 0 on every reset and step (every ``every``-th frame, at most ``max_frames``,
    only env 0's first ``episodes`` episodes if given) and writes them as a GIF at ``fps`` on :meth:`dump` or when
    the env closes."""

    def __init__(self, in_key: str = "pixels", path: str | Path | None = None, *, fps: int = 30, every: int = 1,
                 episodes: int | None = None, max_frames: int = 5_000) -> None:
        super().__init__([in_key])
        if every < 1 or fps < 1:
            raise ConfigError(f"VideoRecorder: every and fps must be >= 1, got {every=}, {fps=}")
        self.in_key = in_key
        self.path = None if path is None else Path(path)
        self.fps = fps
        self.every = every
        self.episodes = episodes
        self.max_frames = max_frames
        self.frames: list[np.ndarray] = []
        self._seen = 0
        self._ended = 0  # episodes of env 0 finished since the last clear

    def _record(self, value: torch.Tensor) -> None:
        if self.episodes is not None and self._ended >= self.episodes:
            return
        if self._seen % self.every == 0 and len(self.frames) < self.max_frames:
            self.frames.append(_to_image(value))
        self._seen += 1

    def _call(self, td: TensorDictBase) -> TensorDictBase:
        return td

    def _reset(self, td: TensorDictBase, mask: torch.Tensor | None) -> TensorDictBase:
        if self.in_key in td.keys() and (mask is None or bool(mask.reshape(-1)[0])):
            self._record(td.get(self.in_key).reshape(-1, *td.get(self.in_key).shape[td.batch_dims:])[0])
        return td

    def _step(self, td: TensorDictBase, next_td: TensorDictBase) -> TensorDictBase:
        if self.in_key in next_td.keys():
            value = next_td.get(self.in_key)
            self._record(value.reshape(-1, *value.shape[next_td.batch_dims:])[0])
        if "done" in next_td.keys() and bool(next_td.get("done").reshape(-1)[0]):
            self._ended += 1
        return next_td

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        """On a chunk ``[num_envs, T]``: records env 0's root frames along time."""
        if self.in_key in td.keys() and td.batch_dims >= 1:
            value = td.get(self.in_key)
            lead = value.reshape(-1, td.batch_size[-1], *value.shape[td.batch_dims:])[0]
            for frame in lead:
                self._record(frame)
        return td

    def clear(self) -> None:
        self.frames.clear()
        self._seen = 0
        self._ended = 0

    def dump(self, path: str | Path | None = None) -> Path | None:
        """Write the recorded frames as a GIF at ``path`` (default: the constructor's) and clear them; returns
        the path, or None when there was nothing to write."""
        target = self.path if path is None else Path(path)
        if target is None:
            raise ValueError("VideoRecorder.dump needs a path: VideoRecorder(path=...) or dump(path)")
        if target.suffix.lower() != ".gif":
            raise ValueError(f"VideoRecorder writes GIFs; give a path ending in .gif, got {str(target)!r}")
        if not self.frames:
            return None
        from PIL import Image

        target.parent.mkdir(parents=True, exist_ok=True)
        images = [Image.fromarray(f) for f in self.frames]
        images[0].save(target, save_all=True, append_images=images[1:], duration=max(1, round(1000 / self.fps)),
                       loop=0)
        self.clear()
        return target

    def close(self) -> None:
        if self.path is not None and self.frames:
            self.dump()

    def __repr__(self) -> str:
        return f"VideoRecorder(in_key={self.in_key!r}, path={self.path}, fps={self.fps}, every={self.every})"


def video_recorders(env: EnvBase) -> list[VideoRecorder]:
    """Every :class:`VideoRecorder` in ``env``'s transforms (all TransformedEnv layers)."""
    found: list[VideoRecorder] = []

    def walk(t: Transform) -> None:
        if isinstance(t, VideoRecorder):
            found.append(t)
        elif isinstance(t, Compose):
            for child in t:
                walk(child)

    while isinstance(env, TransformedEnv):
        walk(env.transform)
        env = env.base_env
    return found
