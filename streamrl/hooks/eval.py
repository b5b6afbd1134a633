"""Periodic evaluation: the deterministic policy, N episodes, its own env, an optional target return.

::

    pipeline.add_hook(Evaluate(GymEnv("CartPole-v1", num_envs=20), actor, every_frames=5_000,
                               episodes=20, stop_at_return=475.0))

Every ``every_frames`` collected frames the hook copies the policy (the learner's current weights, in the main
process), plays ``episodes`` full episodes in a worker thread with exploration off
(``InteractionType.DETERMINISTIC``), and publishes an ``eval`` event with the mean, min, max and std of the
returns. An env holding a :class:`~streamrl.transforms.VideoRecorder` records env 0 of each evaluation into
``<run_dir>/eval_<frames>.gif`` (listed in the event's ``videos``). When ``stop_at_return`` is set and the
mean reaches it, the event says ``solved`` and the run is asked to stop (the pipeline drains and the summary
records frames and wall time to solve).
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import torch
from tensordict.nn import InteractionType, TensorDictModuleBase, set_interaction_type

from streamrl.envs.base import EnvBase
from streamrl.events import Event, Hook
from streamrl.execution.context import RunContext, off_loop
from streamrl.transforms.video import video_recorders


def evaluate(env: EnvBase, policy: TensorDictModuleBase, *, episodes: int, seed: int,
             max_steps: int = 100_000) -> list[float]:
    """Play ``episodes`` episodes with ``policy`` in deterministic mode; return their returns (blocking).

    Every env of ``env`` plays its first episode of a round; rounds (reseeded) repeat until enough episodes.
    """
    returns: list[float] = []
    round_index = 0
    while len(returns) < episodes:
        env.set_seed(seed + 1000 * round_index)
        td = env.reset()
        running = torch.zeros(env.num_envs, dtype=torch.float64)
        finished = torch.zeros(env.num_envs, dtype=torch.bool)
        for _ in range(max_steps):
            with torch.no_grad(), set_interaction_type(InteractionType.DETERMINISTIC):
                policy(td)
            td, root = env.step_and_maybe_reset(td)
            live = ~finished
            running[live] += td.get(("next", "reward")).reshape(-1)[live].double().cpu()
            finished |= live & td.get(("next", "done")).reshape(-1).cpu()
            if finished.all():
                break
            td = root
        returns.extend(running[finished].tolist())
        round_index += 1
    return returns[:episodes]


class Evaluate(Hook):
    """Evaluates the policy every ``every_frames`` frames; see the module docstring."""

    events = ("chunk",)
    mode = "lossy"
    main_only = True

    def __init__(
        self,
        env: EnvBase,
        policy: TensorDictModuleBase,
        *,
        every_frames: int,
        episodes: int = 20,
        stop_at_return: float | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.env = env
        self.policy = policy
        self.every_frames = every_frames
        self.episodes = episodes
        self.stop_at_return = stop_at_return
        self.next_at = every_frames
        self.evals = 0
        self.run: RunContext | None = None

    async def start(self, run: RunContext) -> None:
        self.run = run
        if run.recorder is not None:
            self.next_at = run.recorder.frames + self.every_frames

    async def on_event(self, event: Event) -> None:
        assert self.run is not None and self.run.recorder is not None
        frames = self.run.recorder.frames
        if frames < self.next_at or self.run.stopping:
            return
        self.next_at = frames + self.every_frames
        await self.evaluate_now(frames)

    async def evaluate_now(self, frames: int) -> dict[str, Any]:
        assert self.run is not None
        snapshot = copy.deepcopy(self.policy).to("cpu")
        seed = self.run.seed + 10_000 + 97 * self.evals
        recorders = video_recorders(self.env)
        for recorder in recorders:
            recorder.clear()
        returns = await off_loop(self.run, lambda: evaluate(self.env, snapshot, episodes=self.episodes, seed=seed))
        run_dir = self.run.run_dir
        videos = [r.dump(run_dir / f"eval_{frames}{f'_{i}' if i else ''}.gif") for i, r in enumerate(recorders)]
        self.evals += 1
        mean = statistics.fmean(returns)
        solved = self.stop_at_return is not None and mean >= self.stop_at_return
        data: dict[str, Any] = {"mean_return": mean, "min_return": min(returns), "max_return": max(returns),
                "std_return": statistics.pstdev(returns), "episodes": len(returns), "frames": frames,
                "solved": solved}
        if any(videos):
            data["videos"] = [str(v) for v in videos if v is not None]
        await self.run.bus.publish("eval", self.name, data)
        if solved:
            self.run.request_stop("solved")
        return data

    async def close(self, run: RunContext) -> None:
        self.env.close()
