"""The env stage: steps a vector of envs, asks the policy stage for actions, emits chunks.

::

    env_stage = EnvStage("env", GymEnv("CartPole-v1", num_envs=8), frames_per_chunk=256, total_frames=100_000)
    pipeline.connect("env.requests", "policy.requests", capacity=1)
    pipeline.connect("policy.actions", "env.actions", capacity=1)
    pipeline.connect("env.chunks", "writer.chunks")

Each step: send the current observations to the policy, await its answer, step the envs, write the step into
preallocated buffers (:class:`~streamrl.envs.chunks.ChunkBuilder`). Once ``frames_per_chunk`` frames are
buffered, the stage publishes a ``chunk`` event (lockstep subscribers may edit the chunk, as TorchRL's
``batch_process`` hooks do) and sends the chunk downstream. It stops when ``total_frames`` frames were emitted
or when a stop is requested, at a chunk boundary.

Double buffering: two env stages (``group=0`` and ``group=1``) may share one policy stage; while one group waits
for inference the other steps its envs. That pays off when envs step in subprocesses (``backend="subprocess"``:
the stage awaits the workers without blocking the loop) or inference runs on a GPU. For in-process vector envs a
single group is faster.
"""

from __future__ import annotations

from typing import Any

import anyio
import torch
from tensordict import TensorDict

from streamrl.envs.base import EnvBase
from streamrl.envs.chunks import ChunkBuilder, TensorDictChunkBuilder
from streamrl.envs.gym import GymEnv
from streamrl.errors import ConfigError, WouldBlock
from streamrl.stages.base import Stage, StageContext
from streamrl.stages.policy import StepRequest


class EnvStage(Stage):
    """Steps ``env`` and emits chunks of ``frames_per_chunk`` frames; see the module docstring."""

    inputs = ("actions",)
    outputs = ("requests", "chunks")
    source = True

    def __init__(
        self,
        name: str,
        env: EnvBase,
        *,
        frames_per_chunk: int,
        total_frames: int | None = None,
        group: int = 0,
        record: tuple[str, ...] = ("action",),
    ) -> None:
        super().__init__(name)
        if frames_per_chunk % env.num_envs:
            raise ConfigError(
                f"EnvStage {name!r}: frames_per_chunk={frames_per_chunk} must be a multiple of "
                f"num_envs={env.num_envs}; each chunk holds the same number of steps for every env"
            )
        self.env = env
        self.steps_per_chunk = frames_per_chunk // env.num_envs
        self.total_frames = total_frames
        self.group = group
        self.record = record
        self.frames = 0
        self.chunks = 0
        self.segment = 0  # how many times the run was resumed: each segment gets fresh traj_ids and env seeds

    def _uses_arrays(self) -> bool:
        """The fast path: a plain gymnasium vector env with one ``observation`` array."""
        env = self.env
        return isinstance(env, GymEnv) and list(env.observation_spec.keys()) == ["observation"]

    async def run(self, ctx: StageContext) -> None:
        seed = self.env.seed if self.env.seed is not None else ctx.run.seed + 7919 * self.group
        seed += 104_729 * self.segment
        if not self._uses_arrays():
            await self._run_tensordict(ctx, seed)
            return
        env = self.env
        assert isinstance(env, GymEnv)
        observation = env.open().reset_arrays(seed=seed)
        builder = ChunkBuilder(env.num_envs, self.steps_per_chunk, observation,
                               drops_rows=env.autoreset == "next_step", first_traj=self.first_traj)
        td = TensorDict({"observation": torch.from_numpy(builder.current_obs)}, batch_size=[env.num_envs])
        request = StepRequest(td, self.group)
        requests = ctx.output("requests")
        receive_answer = ctx.input("actions").receive
        chunks = ctx.output("chunks")
        extra_keys = [key for key in self.record if key != "action"]
        add = builder.add
        vector_env = env.vector_env
        subprocess = env.is_subprocess
        total = self.total_frames
        steps = self.steps_per_chunk
        while not ctx.stopping and (total is None or self.frames < total):
            request.new_chunk = True
            first = True
            for _ in range(steps):  # the hot loop: one policy round trip, one env step, numpy row writes
                try:
                    requests.send_nowait(request)  # the policy took the last request: there is room
                except WouldBlock:
                    await requests.send(request)
                answer = await receive_answer()  # the same request object when the policy is in this process
                if first:  # weights change only at a chunk's first step
                    request.new_chunk = first = False
                    builder.version = answer.version
                out = answer.td
                action = out.get("action").numpy()
                for key in extra_keys:
                    builder.record(key, out.get(key).numpy())
                if subprocess:
                    vector_env.step_async(action)
                    await env.wait_ready()
                    result = vector_env.step_wait()
                else:
                    result = vector_env.step(action)
                add(action, *result)
            await self._send_chunk(ctx, chunks, builder)

    async def _run_tensordict(self, ctx: StageContext, seed: int) -> None:
        """Any env with the TensorDict API (transforms, pixels): each step runs in a worker thread, so that the
        event loop serves other stages (a second env group, the learner) while envs step or render."""
        env = self.env
        env.set_seed(seed)
        root = await anyio.to_thread.run_sync(env.reset)
        builder = TensorDictChunkBuilder(env.num_envs, self.steps_per_chunk, first_traj=self.first_traj)
        requests, receive_answer, chunks = ctx.output("requests"), ctx.input("actions").receive, ctx.output("chunks")
        total = self.total_frames
        while not ctx.stopping and (total is None or self.frames < total):
            for t in range(self.steps_per_chunk):
                request = StepRequest(root, self.group)
                request.new_chunk = first = t == 0
                if first:
                    before = set(root.keys())
                await requests.send(request)
                answer = await receive_answer()
                td = answer.td
                if first:  # the policy's outputs are the same every step: decide once which are not recorded
                    builder.version = answer.version
                    builder.drop = set(td.keys()) - before - {"action", *self.record}
                td, root = await anyio.to_thread.run_sync(env.step_and_maybe_reset, td)
                builder.add(td)
            await self._send_chunk(ctx, chunks, builder)

    async def _send_chunk(self, ctx: StageContext, chunks: Any, builder: ChunkBuilder | TensorDictChunkBuilder) -> None:
        """Publish the finished chunk (lockstep hooks may edit it, as TorchRL's ``batch_process``), then send it."""
        chunk, episodes = builder.emit()
        chunk_frames = episodes.pop("frames")
        self.frames += chunk_frames
        self.chunks += 1
        await ctx.publish("chunk", frames=self.frames, chunk_frames=chunk_frames, policy_version=builder.version,
                          chunk=chunk, **episodes)
        await chunks.send(chunk)

    async def close(self, ctx: StageContext) -> None:
        self.env.close()

    @property
    def first_traj(self) -> int:
        """The first ``traj_id`` of this segment: ids stay unique in a replay store across resumes."""
        return self.segment << 40

    def state_dict(self) -> dict[str, Any]:
        """Frames and chunks so far, and the state of the env's transforms (e.g. normaliser statistics)."""
        transform = getattr(self.env, "transform", None)
        return {"frames": self.frames, "chunks": self.chunks, "segment": self.segment,
                "transform": transform.state_dict() if transform is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a checkpointed stage: its counts, transforms, and the next segment (new traj_ids, seeds)."""
        self.frames = state["frames"]
        self.chunks = state["chunks"]
        self.segment = state["segment"] + 1
        if state.get("transform") is not None:
            self.env.transform.load_state_dict(state["transform"])  # type: ignore[attr-defined]
