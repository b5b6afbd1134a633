"""Replicated collector groups: N worker processes, chunks fan in, weights fan out as a latest value."""

import os
import time

import anyio
import gymnasium as gym
import pytest
import torch

import streamrl
from streamrl import MLP, GymEnv, Pipeline, PipelineError, QValueActor, Stage, StageFailed
from streamrl.execution.wiring import _fan_out
from streamrl.streams import open_stream
from streamrl.testing import CountFrames, WeightsPublisher

REPLICA_SHIFT = 32  # a chunk's traj_id carries its replica in bits 32..39


def actor():
    torch.manual_seed(0)
    return QValueActor(MLP(2, in_features=4, num_cells=(8,)))


class ByReplica(Stage):
    """Keeps, per replica, the policy versions and the first observations of its chunks, and the traj_ids."""

    inputs = ("chunks",)
    outputs = ("seen",)
    optional = frozenset({"seen"})

    def __init__(self, name):
        super().__init__(name)
        self.versions: dict[int, list[int]] = {}
        self.first_obs: dict[int, torch.Tensor] = {}
        self.traj_ids: dict[int, set[int]] = {}
        self.shapes: list[tuple[int, ...]] = []
        self.seen = 0

    async def run(self, ctx):
        async for chunk in ctx.input("chunks"):
            self.shapes.append(tuple(chunk.shape))
            for row in range(chunk.shape[0]):  # one env per row; a row joined in rounds may come from any replica
                traj = chunk["traj_id"][row]
                replica = int(traj[0]) >> REPLICA_SHIFT & 0xFF
                self.versions.setdefault(replica, []).append(int(chunk["policy_version"][row, 0]))
                self.first_obs.setdefault(replica, chunk["observation"][row, 0].clone())
                self.traj_ids.setdefault(replica, set()).update(int(t) for t in traj)
            self.seen += 1
            if ctx.has_output("seen"):
                await ctx.output("seen").send(self.seen)


def collector_pipeline(replicas, *, env_id="CartPole-v1", total_frames=4_096, every=2, **env_kwargs):
    p = Pipeline("replicas")
    env = GymEnv(env_id, num_envs=2, seed=0, **env_kwargs)
    c = p.add_collector("collect", env, actor(), frames_per_chunk=64, total_frames=total_frames, replicas=replicas,
                        weights_from="pub")
    sink = ByReplica("sink")
    p.add(sink, WeightsPublisher("pub", actor(), every=every))
    p.connect(c.chunks, "sink.chunks", capacity=2)
    p.connect("sink.seen", "pub.seen", capacity=64)
    return p, sink


def test_every_replica_collects_with_its_own_seeds_and_traj_ids_and_receives_the_weights(tmp_path):
    p, sink = collector_pipeline(2)
    result = streamrl.run(p, tmp_path, handle_signals=False)
    assert result.exit_reason == "completed"
    assert set(sink.versions) == {0, 1}  # chunks of every replica reached the sink
    for replica, versions in sink.versions.items():
        assert versions == sorted(versions), replica  # versions only move forward in each replica
        assert versions[-1] >= 2, f"replica {replica} never acted with new weights: {versions}"
    assert not sink.traj_ids[0] & sink.traj_ids[1]  # traj_ids differ per replica
    assert not torch.equal(sink.first_obs[0], sink.first_obs[1])  # so do the env seeds
    replicas = result.summary["replicas"]
    assert set(replicas) == {"collect[0]", "collect[1]"}
    for name, figures in replicas.items():
        assert figures["frames"] >= 2_048 - 64, name  # each replica collects its half of the budget
        assert set(figures["busy_fraction"]) == {f"collect_env[{name[-2]}]", f"collect_policy[{name[-2]}]"}
        assert figures["policy_lag"]["max"] is not None
    assert result.summary["frames"] == sum(f["frames"] for f in replicas.values())
    assert "collect_env[1]" in result.summary["stages"]["busy_fraction"]


class FailOnce(gym.Wrapper):
    """CartPole that raises at its ``fail_at``-th step in exactly one process: the first to create ``token``."""

    def __init__(self, token: str, fail_at: int = 60, **kwargs):
        super().__init__(gym.make("CartPole-v1", **kwargs))
        self.token, self.fail_at, self.steps = token, fail_at, 0

    def step(self, action):
        self.steps += 1
        if self.steps == self.fail_at:
            try:
                os.close(os.open(self.token, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                with open(self.token, "w") as f:
                    f.write(f"{time.time()}")
                raise RuntimeError("replica exploded")
        return super().step(action)


gym.register("streamrl-tests/FailOnce-v0", entry_point=FailOnce)


def test_a_replica_that_raises_ends_the_run_naming_it_within_5_seconds(tmp_path):
    token = tmp_path / "failed"
    p, _ = collector_pipeline(2, env_id="test_replicas:streamrl-tests/FailOnce-v0", total_frames=None,
                              token=str(token), backend="sync")
    with pytest.raises(StageFailed, match=r"stage 'collect_env\[[01]\]' failed: .*replica exploded") as info:
        streamrl.run(p, tmp_path / "run", handle_signals=False)
    assert time.time() - float(token.read_text()) < 5
    assert info.value.stage in ("collect_env[0]", "collect_env[1]")


def test_on_policy_replicas_are_joined_in_rounds_and_keep_max_policy_lag(tmp_path):
    p = Pipeline("rounds")
    c = p.add_collector("collect", GymEnv("CartPole-v1", num_envs=2, seed=0), actor(), frames_per_chunk=32,
                        total_frames=1_024, replicas=2, weights_from="pub", max_policy_lag=0)
    sink = ByReplica("sink")
    p.add(sink, WeightsPublisher("pub", actor(), every=1))  # one version per round: an on-policy learner
    p.connect("sink.seen", "pub.seen", capacity=64)
    p.connect(c.chunks, "sink.chunks", capacity=1)
    with pytest.raises(PipelineError, match=r"join='rounds'"):
        p.validate()
    p.edges = [e for e in p.edges if e.dst_stage != "sink" or e.dst_port != "chunks"]
    p.connect(c.chunks, "sink.chunks", capacity=1, join="rounds")
    result = streamrl.run(p, tmp_path, handle_signals=False)
    assert result.exit_reason == "completed"
    assert set(sink.shapes) == {(4, 16)}  # each item: a chunk of both replicas (2 x 2 envs), 16 steps
    for replica in (0, 1):  # strictly on-policy: round i acted with version i, in every replica
        assert sink.versions[replica] == [i // 2 for i in range(len(sink.versions[replica]))]


def test_weights_fan_out_as_a_latest_value_a_stuck_replica_never_blocks(tmp_path):
    async def main():
        source_send, source = open_stream(1, name="weights", overflow="drop_oldest")
        replicas = [open_stream(1, name=f"r{i}", overflow="drop_oldest") for i in range(2)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(_fan_out, source, [send for send, _ in replicas])
            fast = []
            for version in range(100):  # replica 1 never takes anything; the publisher never waits
                with anyio.fail_after(1):
                    await source_send.send(version)
                await anyio.sleep(0)
                fast.append(await replicas[0][1].receive())
            source_send.close()
        assert fast == list(range(100))
        assert replicas[1][1].latest_nowait() == 99  # the stuck one finds the newest when it looks
        assert replicas[1][0].statistics().dropped == 99

    anyio.run(main)


def test_replicas_need_worker_processes_and_lossy_edges_into_them():
    p = Pipeline("bad")
    with pytest.raises(PipelineError, match=r"replicas need placement 'worker_process'"):
        p.add_collector("collect", GymEnv("CartPole-v1"), actor(), frames_per_chunk=8, placement="in_process",
                        replicas=2, weights_from=None)
    p = Pipeline("bad")
    c = p.add_collector("collect", GymEnv("CartPole-v1"), actor(), frames_per_chunk=8, replicas=2,
                        weights_from=None)
    p.add(CountFrames("sink"), WeightsPublisher("pub", actor(), every=1))
    p.connect(c.chunks, "sink.chunks")
    p.connect("pub.weights", "collect_policy.weights", capacity=1)  # blocking: cannot fan out
    p.connect("pub.seen", "pub.seen")
    with pytest.raises(PipelineError, match=r"must be lossy; connect it with overflow='drop_oldest'"):
        p.validate()
