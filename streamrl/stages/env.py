"""The env stage: steps a vector of envs, asks the policy stage for actions, emits chunks.

::

    env_stage = EnvStage("env", GymEnv("CartPole-v1", num_envs=8), frames_per_chunk=256, total_frames=100_000)
    pipeline.connect("env.policy", "policy.requests", capacity=0)
    pipeline.connect("env.chunks", "writer.chunks")

Each step: ask the policy for actions (a :class:`~streamrl.stages.policy.PolicyRequest` on the ``policy``
exchange port; with ``capacity=0`` and the policy in this process, a direct hand-off: see
:mod:`streamrl.exchange`), step the envs, write the step into preallocated buffers
(:class:`~streamrl.envs.chunks.ChunkBuilder`). Once ``frames_per_chunk`` frames are buffered, the stage publishes
a ``chunk`` event (lockstep subscribers may edit the chunk, as TorchRL's ``batch_process`` hooks do) and sends
the chunk downstream. It stops when ``total_frames`` frames were emitted
or when a stop is requested, at a chunk boundary: at the first chunk that reaches ``total_frames``, so a run
collects at least ``total_frames`` frames and less than one chunk more. A chunk holds ``frames_per_chunk`` frames
when the envs reset on the step that ends an episode; gymnasium's native vector envs reset on the next step, which
is no transition and is left out of the chunk (``valid``), so their chunks hold fewer frames and the budget may
take one chunk more than ``total_frames / frames_per_chunk``.

Liveness: every ``reset`` and ``step`` of the env must return within ``step_timeout`` seconds (default 60; None:
no limit). One that does not ends the run with :class:`~streamrl.errors.EnvStepTimeout` naming the env, the call,
the stage's frame count and, for subprocess workers, the worker's index and pid. Subprocess workers that owe an
answer are killed; a call stuck in a thread of this process is left behind in a daemon thread (a Python thread
cannot be killed; it does not keep the process from exiting); a call on the event loop's thread (the fast path of
in-process vector envs) is interrupted. See :mod:`streamrl.envs.deadlines`.

Double buffering: two env stages (``group=0`` and ``group=1``) may ask one policy stage (connect both to
``policy.requests``); while one group waits for inference the other steps its envs. That pays off when envs step
in subprocesses (``backend="subprocess"``: the stage awaits the workers without blocking the loop) or inference
runs on a GPU. For in-process vector envs a single group is faster.

Seeds and episode ids: the envs are seeded with ``env.seed`` (or, when it is None, the run's seed) plus
``7919 * group``, ``104729 * segment`` (the resumes so far) and ``1000003 * replica`` (``ctx.run.replica_id``: which
replica of a replicated group runs the stage, 0 when not replicated; a Ray replica started again after its actor
died counts on past the replicas: ``replica + restarts * replicas``), so that no two replicas, groups or resumed
segments replay the same episodes. Episode ids (``traj_id``) count up from
``(segment << 40) | (replica << 32) | (group << 28)``: unique in a replay store across resumes, replicas and
groups (up to 2**28 episodes per group and segment).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import anyio
import structlog
import torch
from tensordict import TensorDict

from streamrl.envs.base import EnvBase
from streamrl.envs.chunks import ChunkBuilder, TensorDictChunkBuilder
from streamrl.envs.deadlines import CallInterrupted, CallThread, CallTimedOut, LoopDeadline
from streamrl.envs.gym import GymEnv
from streamrl.envs.workers import describe_workers, kill_unanswered
from streamrl.errors import ConfigError, EnvStepTimeout
from streamrl.stages.base import Stage, StageContext
from streamrl.stages.policy import PolicyRequest

log = structlog.get_logger("streamrl.stages.env")
REPLICA_SEED_STRIDE = 1_000_003  # a prime: replica r's envs are seeded r * this apart
SUBPROCESS_MARGIN = 2.0  # extra seconds a thread waits on subprocess workers, so that their own timeout reports first


class EnvStage(Stage):
    """Steps ``env`` and emits chunks of ``frames_per_chunk`` frames; see the module docstring."""

    outputs = ("policy", "chunks")
    exchanges = frozenset({"policy"})
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
        step_timeout: float | None = 60.0,
    ) -> None:
        super().__init__(name)
        if step_timeout is not None and (isinstance(step_timeout, bool) or not step_timeout > 0):
            raise ConfigError(f"EnvStage {name!r}: step_timeout must be a number of seconds > 0 (or None: no limit), "
                              f"got {step_timeout!r}")
        if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < 16:
            raise ConfigError(f"EnvStage {name!r}: group must be an int in [0, 16) (it sets seeds and traj_ids "
                              f"apart), got {group!r}")
        if total_frames is not None and (isinstance(total_frames, bool) or total_frames < 1):
            raise ConfigError(f"EnvStage {name!r}: total_frames must be >= 1 (or None: no budget), got "
                              f"{total_frames!r}; a run of no frames has nothing to do")
        if frames_per_chunk < 1 or frames_per_chunk % env.num_envs:
            raise ConfigError(
                f"EnvStage {name!r}: frames_per_chunk={frames_per_chunk} must be a positive multiple of "
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
        self.replica = 0  # which replica of its group runs the stage (ctx.run.replica, set by run())
        self.step_timeout = step_timeout
        self._thread: CallThread | None = None  # steps the TensorDict path, made in run() (threads do not pickle)

    def _gym_env(self) -> GymEnv | None:
        """The gymnasium env under the transforms, if there is one."""
        env: Any = self.env
        while not isinstance(env, GymEnv):
            env = getattr(env, "base_env", None)
            if env is None:
                return None
        return env

    def _env_name(self) -> str:
        gym_env = self._gym_env()
        return gym_env.name if gym_env is not None else type(self.env).__name__

    def _timed_out(self, call: str, frame: int, what: str,
                   workers: tuple[tuple[int, int | None], ...] = ()) -> EnvStepTimeout:
        """The run's error for a ``call`` that outlived ``step_timeout``; ``what`` says what became of it."""
        name = self._env_name()
        return EnvStepTimeout(
            f"env {name!r} (stage {self.name!r}): {call} did not return within step_timeout={self.step_timeout:g} s, "
            f"at frame {frame}; {what}. An env call that hangs ends the run; if the env is this slow on purpose, "
            "give the stage a larger EnvStage(step_timeout=...)", env=name, call=call, frames=frame, workers=workers)

    def _uses_arrays(self) -> bool:
        """The fast path: a plain gymnasium vector env with one ``observation`` array."""
        env = self.env
        return isinstance(env, GymEnv) and list(env.observation_spec.keys()) == ["observation"]

    async def run(self, ctx: StageContext) -> None:
        seed = self.env.seed if self.env.seed is not None else ctx.run.seed
        self.replica = ctx.run.replica_id  # the replica, or past its restarts (Ray actors) a fresh id
        if self.replica >= 256:
            raise ConfigError(f"EnvStage {self.name!r}: replica id {self.replica} (replica {ctx.run.replica} after "
                              f"{ctx.run.restarts} restarts) does not fit the 8 bits traj_ids give it; use fewer "
                              "replicas or a lower max_restarts")
        seed += 7919 * self.group + 104_729 * self.segment + REPLICA_SEED_STRIDE * self.replica
        gym_env = self._gym_env()
        if gym_env is not None:
            gym_env.step_timeout = self.step_timeout  # bounds the waits for its subprocess workers
            if ctx.run.deterministic and not gym_env.is_open:  # workers' timing would change the schedule
                gym_env.backend = "sync"
        if self._uses_arrays():
            await self._run_arrays(ctx, seed)
        else:
            await self._run_tensordict(ctx, seed)

    async def _run_arrays(self, ctx: StageContext, seed: int) -> None:
        """The fast path: numpy rows into preallocated buffers; in-process envs step on the event loop's thread
        (bounded by a :class:`~streamrl.envs.deadlines.LoopDeadline`), subprocess workers are awaited."""
        env = self.env
        assert isinstance(env, GymEnv)
        builder: ChunkBuilder | None = None

        def where() -> tuple[str, int]:
            """The call that hung and the frame it was at: no builder yet means the first reset."""
            return ("reset", self.frames) if builder is None else ("step", self._frame(builder.t))

        # subprocess workers are waited for with a timeout of their own: nothing to interrupt on this thread
        with LoopDeadline(None if env.is_subprocess else self.step_timeout) as deadline:
            try:
                deadline.started = time.monotonic()
                observation = env.reset_arrays(seed=seed)
                deadline.started = 0.0
                builder = ChunkBuilder(env.num_envs, self.steps_per_chunk, observation,
                                       drops_rows=env.autoreset == "next_step", first_traj=self.first_traj)
                await self._step_arrays(ctx, env, builder, deadline)
            except CallInterrupted:
                raise self._timed_out(*where(), "the call was interrupted") from None
            except EnvStepTimeout as exc:  # the subprocess workers' own timeout
                raise self._timed_out(*where(), _killed(exc.workers), exc.workers) from exc

    async def _step_arrays(self, ctx: StageContext, env: GymEnv, builder: ChunkBuilder,
                           deadline: LoopDeadline) -> None:
        td = TensorDict({"observation": torch.from_numpy(builder.current_obs)}, batch_size=[env.num_envs])
        ask = ctx.asker("policy").ask
        chunks = ctx.output("chunks")
        extra_keys = [key for key in self.record if key != "action"]
        add = builder.add
        vector_env = env.vector_env
        subprocess = env.is_subprocess
        total = self.total_frames
        steps = self.steps_per_chunk
        timeout = self.step_timeout
        monotonic = time.monotonic
        action_only = not extra_keys  # the policy may then act on the observation tensor alone
        while not ctx.stopping and (total is None or self.frames < total):
            first = True
            for _ in range(steps):  # the hot loop: ask the policy, one env step, numpy row writes
                # td wraps builder.current_obs, which every step updates in place
                answer = await ask(PolicyRequest(td, first, action_only))
                if first:  # weights change only at a chunk's first step
                    first = False
                    builder.version = answer.version
                action = answer.action.numpy()
                for key in extra_keys:
                    builder.record(key, answer.td.get(key).numpy())
                if subprocess:
                    vector_env.step_async(action)
                    with anyio.move_on_after(timeout) as waiting:
                        await env.wait_ready()
                    if waiting.cancelled_caught:
                        hung = kill_unanswered(vector_env)
                        raise self._timed_out("step", self._frame(builder.t), _killed(hung), hung)
                    result = vector_env.step_wait(timeout=None)  # answered: wait_ready bounded the wait
                else:
                    deadline.started = monotonic()
                    result = vector_env.step(action)
                    deadline.started = 0.0
                    if deadline.expired:  # it returned late: an event loop off the main thread cannot interrupt it
                        raise self._timed_out("step", self._frame(builder.t), "it returned late (an event loop off "
                                              "the main thread cannot interrupt a call)")
                add(action, *result)
            await self._send_chunk(ctx, chunks, builder)

    async def _run_tensordict(self, ctx: StageContext, seed: int) -> None:
        """Any env with the TensorDict API (transforms, pixels): each call runs in a daemon thread
        (:class:`~streamrl.envs.deadlines.CallThread`), so that the event loop serves other stages (a second env
        group, the learner) while envs step or render, and a hung call ends the run after ``step_timeout``."""
        env = self.env
        thread = self._thread = CallThread(f"env stage {self.name}")
        gym_env = self._gym_env()
        inline = ctx.run.deterministic  # a thread's timing would change a deterministic schedule

        async def call_env(timeout: float | None, fn: Any, *args: Any) -> Any:
            return fn(*args) if inline else await thread.call(timeout, fn, *args)

        call, frame = "reset", self.frames
        try:
            if gym_env is not None:  # opened first: does the thread wait on subprocess workers?
                await call_env(self.step_timeout, partial(gym_env.open, same_step=True))
            timeout = self.step_timeout
            if timeout is not None and self._steps_in_subprocesses():
                timeout += SUBPROCESS_MARGIN  # the workers' own timeout names them: let it report first
            env.set_seed(seed)
            root = await call_env(timeout, env.reset)
            builder = TensorDictChunkBuilder(env.num_envs, self.steps_per_chunk, first_traj=self.first_traj)
            ask = ctx.asker("policy").ask
            chunks = ctx.output("chunks")
            total = self.total_frames
            call = "step"
            while not ctx.stopping and (total is None or self.frames < total):
                for t in range(self.steps_per_chunk):
                    first = t == 0
                    if first:
                        before = set(root.keys())
                    answer = await ask(PolicyRequest(root, first))
                    td = answer.td
                    if first:  # the policy's outputs are the same every step: decide once which are not recorded
                        builder.version = answer.version
                        builder.drop = set(td.keys()) - before - {"action", *self.record}
                    frame = self._frame(t)
                    td, root = await call_env(timeout, env.step_and_maybe_reset, td)
                    builder.add(td)
                await self._send_chunk(ctx, chunks, builder)
        except CallTimedOut:
            what = ("it runs in a thread of this process, which cannot be stopped: the thread is left behind (a "
                    "daemon thread: it does not keep the process from exiting)")
            raise self._timed_out(call, frame, what) from None
        except EnvStepTimeout as exc:  # the subprocess workers' own timeout
            raise self._timed_out(call, frame, _killed(exc.workers), exc.workers) from exc

    def _steps_in_subprocesses(self) -> bool:
        """Whether the env (opened) runs subprocess workers."""
        gym_env = self._gym_env()
        return gym_env is not None and getattr(gym_env, "resolved_backend", None) == "subprocess"

    def _frame(self, step: int) -> int:
        """The frame count at ``step`` of the chunk being collected."""
        return self.frames + step * self.env.num_envs

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
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.close()
            if thread.stuck and not self._steps_in_subprocesses():
                log.warning("env not closed: a call of it is stuck in a thread", stage=self.name, env=self._env_name())
                return  # closing it under the stuck call could hang too
        self.env.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_thread"] = None  # a thread does not travel to a worker process
        return state

    @property
    def first_traj(self) -> int:
        """The first ``traj_id`` of this segment, replica and group: ids stay unique in a replay store across
        resumes, replicas and groups (see the module docstring)."""
        return (self.segment << 40) | (self.replica << 32) | (self.group << 28)

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


def _killed(workers: tuple[tuple[int, int | None], ...]) -> str:
    if not workers:
        return "no subprocess worker owed an answer any more"
    return f"{describe_workers(workers)} did not answer and {'was' if len(workers) == 1 else 'were'} killed"
