"""Assemble env steps into chunks: preallocated buffers per step, one TensorDict per chunk.

The per-step path writes numpy rows into time-major buffers (a few hundred nanoseconds each); everything else
(transposition, episode bookkeeping, the TensorDict) happens once per chunk. A chunk has batch dims
``[num_envs, time]`` and the TorchRL layout::

    observation, action, <recorded policy outputs>, step_count, traj_id, policy_version
    next: observation, reward [.., 1], done [.., 1], terminated [.., 1], truncated [.., 1]

Auto-reset: at an episode's last step ``next.observation`` is the terminal observation and the following row of
that env starts from the reset observation. Backends that auto-reset on the *next* step spend one step per
episode end on the reset alone; that row is not a transition. Chunks of such envs carry a ``valid`` mask
``[num_envs, time]`` that is False on these rows, and consumers drop them (the replay writer stores valid rows
only; frames count valid rows).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

from streamrl.envs.gym import VectorStep


class ChunkBuilder:
    """Collects ``steps`` steps of ``num_envs`` envs into one chunk at a time."""

    def __init__(self, num_envs: int, steps: int, first_obs: np.ndarray, *, drops_rows: bool) -> None:
        self.num_envs = num_envs
        self.steps = steps
        self.drops_rows = drops_rows
        n = num_envs
        self.obs = np.zeros((steps + 1, *first_obs.shape), dtype=first_obs.dtype)
        self.obs[0] = first_obs
        self.current_obs = first_obs.copy()  # what the policy sees now; callers wrap it once in a tensor
        self.reward = np.zeros((steps, n), dtype=np.float32)
        self.terminated = np.zeros((steps, n), dtype=bool)
        self.truncated = np.zeros((steps, n), dtype=bool)
        self.version = np.zeros(steps, dtype=np.int64)
        self.valid = np.ones((steps, n), dtype=bool)
        self.recorded: dict[str, np.ndarray] = {}
        self.t = 0
        self._finals: list[tuple[int, np.ndarray, np.ndarray]] = []
        # episode bookkeeping carried from chunk to chunk
        self._cur_traj = np.arange(n, dtype=np.int64)
        self._next_traj = n
        self._carry_new = np.zeros(n, dtype=bool)
        self._steps_carry = np.zeros(n, dtype=np.int64)
        self._return_carry = np.zeros(n, dtype=np.float64)

    # -- per step ------------------------------------------------------------------------------------------
    def record(self, key: str, value: np.ndarray) -> None:
        """Record a policy output (e.g. ``action``) for the current step."""
        buf = self.recorded.get(key)
        if buf is None:
            buf = self.recorded[key] = np.zeros((self.steps, *value.shape), dtype=value.dtype)
        buf[self.t] = value

    def add(self, step: VectorStep, version: int) -> None:
        """Record the env's answer to the current step's actions."""
        t = self.t
        self.obs[t + 1] = step.observation
        self.current_obs[...] = step.observation
        self.reward[t] = step.reward
        self.terminated[t] = step.terminated
        self.truncated[t] = step.truncated
        self.version[t] = version
        if step.valid is not None:
            self.valid[t] = step.valid
        if step.next_observation is not step.observation:
            done = np.flatnonzero(np.logical_or(step.terminated, step.truncated))
            self._finals.append((t, done, step.next_observation[done]))
        self.t = t + 1

    @property
    def ready(self) -> bool:
        return self.t == self.steps

    # -- per chunk -----------------------------------------------------------------------------------------
    def emit(self) -> tuple[TensorDict, dict[str, Any]]:
        """Return the chunk ``[num_envs, steps]`` and its finished episodes (returns, lengths)."""
        if not self.ready:
            raise RuntimeError(f"chunk not ready: {self.t} of {self.steps} steps buffered")
        T, n = self.steps, self.num_envs

        def env_major(buf: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(buf.swapaxes(0, 1))

        next_obs = self.obs[1:].copy()
        for t, envs, finals in self._finals:
            next_obs[t, envs] = finals
        reward, terminated, truncated = env_major(self.reward), env_major(self.terminated), env_major(self.truncated)
        valid = env_major(self.valid)
        done = terminated | truncated
        traj_id, step_count, episodes = self._episodes(reward, done, valid)
        content: dict[str, Any] = {
            "observation": torch.from_numpy(env_major(self.obs[:T])),
            **{k: torch.from_numpy(env_major(v)) for k, v in self.recorded.items()},
            "step_count": torch.from_numpy(step_count),
            "traj_id": torch.from_numpy(traj_id),
            "policy_version": torch.from_numpy(np.repeat(self.version[None, :], n, 0)),
            "next": {
                "observation": torch.from_numpy(env_major(next_obs)),
                "reward": torch.from_numpy(reward[..., None]),
                "done": torch.from_numpy(done[..., None]),
                "terminated": torch.from_numpy(terminated[..., None]),
                "truncated": torch.from_numpy(truncated[..., None]),
            },
        }
        if self.drops_rows:
            content["valid"] = torch.from_numpy(valid)
            episodes["frames"] = int(valid.sum())
            self.valid[:] = True
        else:
            episodes["frames"] = n * T
        self.obs[0] = self.obs[T]
        self.t = 0
        self._finals.clear()
        return TensorDict(content, batch_size=[n, T]), episodes

    def _episodes(
        self, reward: np.ndarray, done: np.ndarray, valid: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """traj_id and step_count per row, and the returns/lengths of episodes that ended in this chunk.

        An episode starts on the row after a done row (same-step auto-reset) or after an invalid row (next-step
        auto-reset: the invalid row is the reset itself and belongs to no episode).
        """
        n, T = done.shape
        boundary = ~valid if self.drops_rows else done
        starts = np.empty((n, T), dtype=bool)
        starts[:, 0] = self._carry_new
        starts[:, 1:] = boundary[:, :-1]
        k = np.cumsum(starts, axis=1)
        new = k[:, -1]
        offset = np.cumsum(new) - new
        traj_id = np.where(k == 0, self._cur_traj[:, None], self._next_traj + offset[:, None] + k - 1)
        self._next_traj += int(new.sum())
        self._cur_traj = traj_id[:, -1].copy()
        idx = np.arange(T)
        last_start = np.maximum.accumulate(np.where(starts, idx, -1), axis=1)
        step_count = np.where(last_start < 0, self._steps_carry[:, None] + idx, idx - last_start)
        cum = np.cumsum(reward, axis=1, dtype=np.float64)
        before = np.take_along_axis(cum - reward, np.maximum(last_start, 0), axis=1)
        episode_return = np.where(last_start < 0, self._return_carry[:, None] + cum, cum - before)
        self._carry_new = boundary[:, -1].copy()
        self._steps_carry = step_count[:, -1] + 1
        self._return_carry = episode_return[:, -1].copy()
        ended = done & valid
        episodes: dict[str, Any] = {
            "episode_returns": episode_return[ended].tolist(),
            "episode_lengths": (step_count[ended] + 1).tolist(),
        }
        return traj_id.astype(np.int64), step_count.astype(np.int64), episodes
