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
from tensordict import TensorDict, TensorDictBase

from streamrl.envs.gym import VectorStep


class ChunkBuilder:
    """Collects ``steps`` steps of ``num_envs`` envs into one chunk at a time.

    Buffers are env-major (``[num_envs, steps, ...]``): a step writes one column of each, and a finished chunk
    takes the buffers over as they are (no transposition, no copy); fresh buffers are allocated for the next.
    """

    def __init__(self, num_envs: int, steps: int, first_obs: np.ndarray, *, drops_rows: bool,
                 first_traj: int = 0) -> None:
        """``drops_rows``: the env auto-resets on the next step (gymnasium's NEXT_STEP mode). ``first_traj``:
        the first ``traj_id`` to hand out."""
        self.num_envs = num_envs
        self.steps = steps
        self.drops_rows = drops_rows
        n = num_envs
        self.current_obs = first_obs.copy()  # what the policy sees now; callers wrap it once in a tensor
        self._obs_shape, self._obs_dtype = first_obs.shape[1:], first_obs.dtype
        self.version = 0  # the policy version that acted; weights change only between chunks
        self.recorded: dict[str, np.ndarray] = {}
        self._allocate()
        self.obs[:, 0] = first_obs
        self.t = 0
        self._finals: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._ended_last = np.zeros(n, dtype=bool)  # done at the previous chunk's last step
        self.episodes = EpisodeTracker(n, drops_rows=drops_rows, first_traj=first_traj)

    def _allocate(self) -> None:
        n, T = self.num_envs, self.steps
        self.obs = np.empty((n, T + 1, *self._obs_shape), dtype=self._obs_dtype)
        self.reward = np.empty((n, T), dtype=np.float32)
        self.terminated = np.empty((n, T), dtype=bool)
        self.truncated = np.empty((n, T), dtype=bool)
        self.recorded = {k: np.empty_like(v) for k, v in self.recorded.items()}

    # -- per step ------------------------------------------------------------------------------------------
    def record(self, key: str, value: np.ndarray) -> None:
        """Record a policy output other than ``action`` (e.g. ``sample_log_prob``) for the current step."""
        buf = self.recorded.get(key)
        if buf is None:
            buf = self.recorded[key] = np.empty((self.num_envs, self.steps, *value.shape[1:]), dtype=value.dtype)
        buf[:, self.t] = value

    def add(self, action: np.ndarray, obs: np.ndarray, reward: np.ndarray, terminated: np.ndarray,
            truncated: np.ndarray, info: dict[str, Any]) -> None:
        """Record the step's action and what the vector env's ``step`` returned for it."""
        t = self.t
        action_buf = self.recorded.get("action")
        if action_buf is None:
            self.record("action", action)
        else:
            action_buf[:, t] = action
        self.obs[:, t + 1] = obs
        self.current_obs[...] = obs
        self.reward[:, t] = reward
        self.terminated[:, t] = terminated
        self.truncated[:, t] = truncated
        if not self.drops_rows:
            final = info.get("_final_obs")
            if final is not None and final.any():
                done = np.flatnonzero(final)
                self._finals.append((t, done, np.stack([info["final_obs"][i] for i in done])))
        self.t = t + 1

    def add_step(self, action: np.ndarray, step: VectorStep) -> None:
        """Record an action and the :class:`VectorStep` (as :meth:`GymEnv.step` returns it) it led to."""
        info: dict[str, Any] = {}
        if step.next_observation is not step.observation:
            done = np.logical_or(step.terminated, step.truncated)
            info = {"_final_obs": done, "final_obs": step.next_observation}
        self.add(action, step.observation, step.reward, step.terminated, step.truncated, info)

    @property
    def ready(self) -> bool:
        return self.t == self.steps

    # -- per chunk -----------------------------------------------------------------------------------------
    def emit(self) -> tuple[TensorDict, dict[str, Any]]:
        """Return the chunk ``[num_envs, steps]`` and its finished episodes (returns, lengths)."""
        if not self.ready:
            raise RuntimeError(f"chunk not ready: {self.t} of {self.steps} steps buffered")
        T, n = self.steps, self.num_envs
        obs, reward, terminated, truncated = self.obs, self.reward, self.terminated, self.truncated
        observation = obs[:, :T]
        next_observation = obs[:, 1:]
        if self._finals:  # same-step auto-reset: the terminal observations were returned apart
            next_observation = next_observation.copy()
            for t, envs, finals in self._finals:
                next_observation[envs, t] = finals
            self._finals.clear()
        done = terminated | truncated
        if self.drops_rows:  # next-step auto-reset: the step after an episode end only resets that env
            valid = np.empty_like(done)
            valid[:, 0] = ~self._ended_last
            valid[:, 1:] = ~done[:, :-1]
            self._ended_last = done[:, -1].copy()
        else:
            valid = np.ones_like(done)
        traj_id, step_count, episodes = self.episodes.update(reward, done, valid)
        content: dict[str, Any] = {
            "observation": torch.from_numpy(observation),
            **{k: torch.from_numpy(v) for k, v in self.recorded.items()},
            "step_count": torch.from_numpy(step_count),
            "traj_id": torch.from_numpy(traj_id),
            "policy_version": torch.full((n, T), self.version, dtype=torch.int64),
            "next": {
                "observation": torch.from_numpy(next_observation),
                "reward": torch.from_numpy(reward[..., None]),
                "done": torch.from_numpy(done[..., None]),
                "terminated": torch.from_numpy(terminated[..., None]),
                "truncated": torch.from_numpy(truncated[..., None]),
            },
        }
        if self.drops_rows:
            content["valid"] = torch.from_numpy(valid)
            episodes["frames"] = int(valid.sum())
        else:
            episodes["frames"] = n * T
        last_obs = obs[:, T]
        self._allocate()  # the chunk keeps the filled buffers
        self.obs[:, 0] = last_obs
        self.t = 0
        return TensorDict(content, batch_size=[n, T]), episodes



class EpisodeTracker:
    """Episode bookkeeping carried from chunk to chunk: ``traj_id`` and ``step_count`` per row, and the returns
    and lengths of the episodes that end in a chunk."""

    def __init__(self, num_envs: int, *, drops_rows: bool, first_traj: int = 0) -> None:
        n = num_envs
        self.drops_rows = drops_rows
        self._cur_traj = first_traj + np.arange(n, dtype=np.int64)
        self._next_traj = first_traj + n
        self._carry_new = np.zeros(n, dtype=bool)
        self._steps_carry = np.zeros(n, dtype=np.int64)
        self._return_carry = np.zeros(n, dtype=np.float64)

    def update(
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


class TensorDictChunkBuilder:
    """Chunks from TensorDict steps, for envs with the TensorDict API only (transformed envs, pixel envs).

    ``add(td)`` takes a step as ``env.step`` returns it (root, action, policy outputs, ``next``); ``emit()``
    stacks ``steps`` of them into a chunk ``[num_envs, steps]`` with the same layout as :class:`ChunkBuilder`'s
    (``step_count`` and ``traj_id`` added unless a transform wrote them; ``policy_version``). ``drop`` names
    policy outputs that are not recorded.
    """

    def __init__(self, num_envs: int, steps: int, *, first_traj: int = 0) -> None:
        self.num_envs = num_envs
        self.steps = steps
        self.version = 0
        self.drop: set[str] = set()
        self._rows: list[TensorDictBase] = []
        self.episodes = EpisodeTracker(num_envs, drops_rows=False, first_traj=first_traj)

    def add(self, td: TensorDictBase) -> None:
        self._rows.append(td.exclude(*self.drop) if self.drop else td)

    @property
    def ready(self) -> bool:
        return len(self._rows) == self.steps

    def emit(self) -> tuple[TensorDictBase, dict[str, Any]]:
        if not self.ready:
            raise RuntimeError(f"chunk not ready: {len(self._rows)} of {self.steps} steps buffered")
        chunk: TensorDictBase = torch.stack(self._rows, dim=1).contiguous()  # type: ignore[arg-type, assignment]
        self._rows = []
        n, T = self.num_envs, self.steps
        reward = chunk.get(("next", "reward")).reshape(n, T).cpu().numpy()
        done = chunk.get(("next", "done")).reshape(n, T).cpu().numpy()
        traj_id, step_count, episodes = self.episodes.update(reward, done, np.ones_like(done))
        if "step_count" not in chunk.keys():
            chunk.set("step_count", torch.from_numpy(step_count))
        chunk.set("traj_id", torch.from_numpy(traj_id))
        chunk.set("policy_version", torch.full((n, T), self.version, dtype=torch.int64))
        episodes["frames"] = n * T
        return chunk, episodes
