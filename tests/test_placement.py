"""Worker-process placement: chunks and versioned weights cross through shared memory; failures surface."""

import os
import signal
import time

import anyio
import psutil
import pytest
import torch

import streamrl
from streamrl import MLP, EnvStage, GymEnv, Pipeline, PolicyStage, QValueActor, Stage, StageFailed, WorkerDied
from streamrl.stages.policy import weights_message
from streamrl.testing import CountFrames


class Publisher(Stage):
    """Publishes new weights (all parameters set to the version number) after every 10 chunks seen."""

    inputs = ("seen",)
    outputs = ("weights",)

    def __init__(self, name, module, versions):
        super().__init__(name)
        self.module = module
        self.versions = versions

    async def run(self, ctx):
        version = 0
        async for count in ctx.input("seen"):
            if count % 10 == 0 and version < self.versions:
                version += 1
                with torch.no_grad():
                    for p in self.module.parameters():
                        p.fill_(float(version))
                await ctx.output("weights").send(weights_message(self.module, version))


class Check(Stage):
    """Keeps the policy_version of every chunk and tells the publisher how many it saw."""

    inputs = ("chunks",)
    outputs = ("seen",)

    def __init__(self, name):
        super().__init__(name)
        self.versions = []
        self.frames = 0

    async def run(self, ctx):
        async for chunk in ctx.input("chunks"):
            self.versions.append(int(chunk["policy_version"][0, 0]))
            assert (chunk["policy_version"] == chunk["policy_version"][0, 0]).all()
            self.frames += int(chunk.get("valid", torch.ones(chunk.shape, dtype=torch.bool)).sum())
            await ctx.output("seen").send(len(self.versions))


def collector(p: Pipeline, env: GymEnv, policy, *, frames_per_chunk=64, total_frames=None, group="collect"):
    p.add(EnvStage("env", env, frames_per_chunk=frames_per_chunk, total_frames=total_frames),
          PolicyStage("policy", policy), group=group)
    p.connect("env.policy", "policy.requests", capacity=0)


def children():
    """Descendant processes, except multiprocessing's resource tracker and fork server (they live as long as this
    process, serve every run and are not part of one); the workers forked by the server count."""
    from multiprocessing import forkserver, resource_tracker

    helpers = {forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid}
    return [c for c in psutil.Process().children(recursive=True) if c.pid not in helpers]


def test_worker_group_streams_chunks_and_receives_versioned_weights(tmp_path):
    actor = QValueActor(MLP(2, in_features=4, num_cells=(8,)))
    p = Pipeline("w")
    collector(p, GymEnv("CartPole-v1", num_envs=4), actor, total_frames=40_000)
    check = Check("check")
    p.add(check, Publisher("pub", QValueActor(MLP(2, in_features=4, num_cells=(8,))), versions=5))
    p.connect("env.chunks", "check.chunks", capacity=2)
    p.connect("pub.weights", "policy.weights", capacity=1, overflow="drop_oldest")
    p.connect("check.seen", "pub.seen", capacity=64)
    p.place("collect", "worker_process")
    result = streamrl.run(p, tmp_path, handle_signals=False)
    assert result.exit_reason == "completed"
    assert check.frames >= 40_000 and result.summary["frames"] == check.frames
    assert check.versions == sorted(check.versions)  # versions only move forward
    assert check.versions[0] == 0 and check.versions[-1] == 5  # every publish reached the policy, in order
    assert set(check.versions) == {0, 1, 2, 3, 4, 5}
    assert "env" in result.summary["stages"]["busy_fraction"]  # the worker reported its stage statistics
    assert not children()


def test_env_that_raises_in_a_worker_ends_the_run_fast_naming_the_env_stage(tmp_path):
    p = Pipeline("crash")
    stamp = tmp_path / "failed_at"
    env = GymEnv("streamrl.testing:streamrl/FailingCartPole-v0", num_envs=2, fail_at=300, stamp=str(stamp))
    collector(p, env, QValueActor(MLP(2, in_features=4, num_cells=(8,))))
    p.add(CountFrames("sink"))
    p.connect("env.chunks", "sink.chunks")
    p.place("collect", "worker_process")
    with pytest.raises(StageFailed, match=r"stage 'env' failed: RemoteError: RuntimeError: env exploded") as info:
        streamrl.run(p, tmp_path, handle_signals=False)
    ended = time.time()
    assert info.value.stage == "env"
    assert "worker traceback" in str(info.value)
    assert ended - float(stamp.read_text()) < 2  # from the env raising to the run having ended and cleaned up
    assert not children()


def test_a_worker_killed_with_sigkill_ends_the_run_with_worker_died(tmp_path):
    p = Pipeline("killed")
    collector(p, GymEnv("CartPole-v1", num_envs=2), QValueActor(MLP(2, in_features=4, num_cells=(8,))))

    pids = []
    p.on("worker_started", lambda event: pids.append(event.data["pid"]))

    class KillWorker(Stage):
        inputs = ("chunks",)

        async def run(self, ctx):
            n = 0
            async for _ in ctx.input("chunks"):
                n += 1
                if n == 5:
                    self.killed_at = time.perf_counter()
                    os.kill(pids[0], signal.SIGKILL)

    killer = KillWorker("killer")
    p.add(killer)
    p.connect("env.chunks", "killer.chunks")
    p.place("collect", "worker_process")
    with pytest.raises(WorkerDied, match=r"worker process of stage group 'collect' \(pid \d+\) died: killed by "
                                         r"SIGKILL \(exit code -9\)"):
        streamrl.run(p, tmp_path, handle_signals=False)
    assert time.perf_counter() - killer.killed_at < 5
    assert not children()


def test_a_worker_that_fails_right_after_its_first_chunk_still_reports_its_error(tmp_path):
    """The first chunk's shared memory is mapped after the worker died: its error must still come through."""

    class Busy(Stage):  # holds the main event loop, as a learner step does
        async def run(self, ctx):
            for _ in range(20):
                time.sleep(0.05)
                await anyio.sleep(0)

    p = Pipeline("race")
    env = GymEnv("streamrl.testing:streamrl/FailingCartPole-v0", num_envs=1, backend="sync", fail_at=10)
    collector(p, env, QValueActor(MLP(2, in_features=4, num_cells=(8,))), frames_per_chunk=8)
    p.add(CountFrames("sink"), Busy("busy"))
    p.connect("env.chunks", "sink.chunks")
    p.place("collect", "worker_process")
    with pytest.raises(StageFailed, match=r"stage 'env' failed: RemoteError: RuntimeError: env exploded"):
        streamrl.run(p, tmp_path, handle_signals=False)
    assert not children()


def test_a_hook_in_a_worker_group_can_stop_the_whole_run(tmp_path):
    from streamrl.testing import StopAfterFrames

    p = Pipeline("stop-from-worker")
    collector(p, GymEnv("CartPole-v1", num_envs=2), QValueActor(MLP(2, in_features=4, num_cells=(8,))))
    p.add(CountFrames("sink"))
    p.connect("env.chunks", "sink.chunks")
    p.add_hook(StopAfterFrames(1_000), group="collect")
    p.place("collect", "worker_process")
    result = streamrl.run(p, tmp_path, handle_signals=False)  # no frame budget: only the hook ends it
    assert result.exit_reason == "stopped"
    assert "1000 frames seen by StopAfterFrames" in result.summary["stop_reason"]
    assert not children()
