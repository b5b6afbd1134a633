"""Collector replicas as Ray actors (placement="ray_actor"), on a real multi-node Ray cluster on this machine.

One cluster serves the module: a head node without CPUs (nothing is placed there) and two worker nodes of one CPU
each, so that two replicas asking one CPU each land on different nodes. The node-removal test adds a third node
and removes the node a replica runs on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
import torch
from tensordict import TensorDict

import streamrl
from streamrl import Pipeline, PipelineError, ReplicaLost, Stage, StageFailed
from streamrl.execution import ray_actor
from streamrl.loader import load_module
from streamrl.replay import ZarrStorage
from streamrl.testing import CountFrames, StopAfterFrames, WeightsPublisher

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
DQN = ROOT / "pipelines" / "dqn_cartpole.py"
REPLICA_SHIFT = 32  # a chunk's traj_id carries its replica id in bits 32..39


# -- on a cluster -------------------------------------------------------------------------------------------------
def test_ctrl_c_stops_a_run_on_a_local_ray_instance_losing_no_row_and_leaving_no_ray_process(tmp_path):
    """The user's path: no cluster, so `streamrl run` starts a local Ray instance; Ctrl-C (SIGINT to the process
    group, Ray's processes included) ends the run with 130, a summary, every collected row stored, and no Ray
    process left. Runs before the module's cluster starts."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamrl.cli", "run", str(DQN), "--out", str(out), "--set", "placement=ray_actor",
         "--set", "replicas=2", "--set", "total_frames=10_000_000", "--set", "eval_every=1_000_000"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until both replicas delivered chunks
            status = json.loads((out / "status.json").read_text()) if (out / "status.json").exists() else {}
            replicas = status.get("replicas", {}).values()
            if status.get("frames", 0) >= 1_000 and len(replicas) == 2 and all(r["frames"] for r in replicas):
                break
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_reason"] == "interrupted" and summary["frames"] >= 1_000
    assert len(ZarrStorage.open(out / "replay.zarr")) == summary["frames"]
    left = subprocess.run(["pgrep", "-f", f"{out}|ray::CollectorActor"], capture_output=True, text=True).stdout
    assert not left.strip()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.add_node(num_cpus=1)
    ray.init(address=c.address, logging_level="WARNING")
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def _actor():
    torch.manual_seed(0)
    return streamrl.QValueActor(streamrl.MLP(2, in_features=4, num_cells=(8,)))


class ByReplica(Stage):
    """Per replica id (from traj_ids): the policy versions its chunks were collected with, and the frames."""

    inputs = ("chunks",)
    outputs = ("seen",)

    def __init__(self, name):
        super().__init__(name)
        self.versions: dict[int, list[int]] = {}
        self.frames = 0
        self.seen = 0

    async def run(self, ctx):
        async for chunk in ctx.input("chunks"):
            self.frames += chunk.numel()
            for row in range(chunk.shape[0]):
                replica = int(chunk["traj_id"][row, 0]) >> REPLICA_SHIFT & 0xFF
                self.versions.setdefault(replica, []).append(int(chunk["policy_version"][row, 0]))
            self.seen += 1
            await ctx.output("seen").send(self.seen)


def test_chunks_from_replicas_on_every_node_reach_the_sink_and_weights_reach_every_replica(cluster, tmp_path):
    p = Pipeline("ray")
    c = p.add_collector("collect", streamrl.GymEnv("CartPole-v1", num_envs=2, seed=0), _actor(),
                        frames_per_chunk=32, total_frames=1_024, replicas=2, weights_from="pub",
                        placement="ray_actor")
    sink = ByReplica("sink")
    p.add(sink, WeightsPublisher("pub", _actor()))
    p.connect(c.chunks, "sink.chunks", capacity=2)
    p.connect("sink.seen", "pub.seen", capacity=1)
    result = streamrl.run(p, tmp_path, handle_signals=False)
    summary = result.summary
    assert result.exit_reason == "completed" and summary["frames"] >= 1_024 and sink.seen >= 32
    assert set(sink.versions) == {0, 1}  # both replicas' chunks arrived...
    assert all(max(v) >= 2 for v in sink.versions.values())  # ...collected with the learner's newer weights
    replicas = summary["replicas"]
    assert {replicas[f"collect[{r}]"]["node_id"] for r in (0, 1)} == {
        n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")}  # one replica per node
    for r in (0, 1):
        figures = replicas[f"collect[{r}]"]
        assert figures["placement"] == "ray_actor" and figures["restarts"] == 0 and figures["frames"] >= 512
        assert figures["items_in"] >= 16 and figures["bytes_in"] > 0 and figures["bytes_out"] > 0
        assert figures["busy_fraction"][f"collect_env[{r}]"] > 0
    assert set(summary["nodes"]) == {replicas[f"collect[{r}]"]["node_id"] for r in (0, 1)}
    assert sum(node["frames"] for node in summary["nodes"].values()) == summary["frames"]
    for r in (0, 1):
        node = summary["nodes"][replicas[f"collect[{r}]"]["node_id"]]
        assert node["replicas"] == [f"collect[{r}]"] and node["busy_fraction"][f"collect_policy[{r}]"] > 0
        assert node["policy_lag_mean"] is not None and node["bytes_out"] == replicas[f"collect[{r}]"]["bytes_out"]
    assert _alive_actors() == 0  # no actor left behind


def _alive_actors() -> int:
    from ray._private.state import actors

    deadline = time.monotonic() + 10
    while True:
        alive = [a for a in actors().values() if a["State"] == "ALIVE"]
        if not alive or time.monotonic() > deadline:
            return len(alive)
        time.sleep(0.2)


class DiesInActor(Stage):
    """A source that kills its own process after ``after`` chunks: an actor that dies every time it is started."""

    outputs = ("chunks",)

    def __init__(self, name, after=3):
        super().__init__(name)
        self.after = after

    async def run(self, ctx):
        for i in range(10_000):
            if i == self.after:
                os._exit(1)
            await ctx.output("chunks").send(TensorDict({"x": torch.ones(4, 1)}, [4, 1]))
            await anyio.sleep(0.01)


def test_a_replica_that_dies_more_often_than_its_restarts_fails_the_run_naming_it_and_its_node(cluster, tmp_path):
    p = Pipeline("dies")
    p.add(DiesInActor("src"), group="remote")
    p.add(CountFrames("sink"))
    p.connect("src.chunks", "sink.chunks", capacity=2)
    p.place("remote", "ray_actor", max_restarts=1)
    started = []
    p.on("worker_started", lambda event: started.append(event.data))
    with pytest.raises(ReplicaLost, match=r"replica remote \(a Ray actor on node [\d.]+ .*\) died after 1 restart"
                                          r"\(s\) of max_restarts=1") as failure:
        streamrl.run(p, tmp_path, handle_signals=False)
    assert failure.value.node_id == started[-1]["node_id"] and [s["restarts"] for s in started] == [0, 1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_reason"] == "failed" and summary["replicas"]["remote"]["restarts"] == 1


def test_removing_a_node_mid_run_restarts_its_replica_and_the_run_completes_losing_no_committed_row(cluster,
                                                                                                        tmp_path):
    spare = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    module = load_module(DQN)
    cfg = module.Config(placement="ray_actor", replicas=2, total_frames=4_000, min_fill=256, eval_every=100_000,
                        hidden=(32, 32), buffer_size=10_000)
    p = module.build(cfg)
    nodes = {n.node_id: n for n in cluster.list_all_nodes()}
    events: dict[str, list] = {"worker_started": [], "replica_restarted": [], "optim_step": [], "stored": []}
    removed: list[str] = []

    async def on_event(event):
        events[event.kind].append((time.perf_counter(), event.data))
        if event.kind == "optim_step" and not removed and len(events["worker_started"]) == 2:
            victim = events["worker_started"][0][1]["node_id"]
            removed.append(victim)  # removed beside the run: the hook must not hold up the learner
            threading.Thread(target=cluster.remove_node, args=(nodes[victim],), daemon=True).start()

    p.on(("worker_started", "replica_restarted", "optim_step", "stored"), on_event)
    result = streamrl.run(p, tmp_path, handle_signals=False, preload=[(module.__name__, str(DQN))])
    summary = result.summary
    assert result.exit_reason == "completed" and removed
    restarted = [data for _, data in events["replica_restarted"]]
    assert [(d["replica"], d["node_id"]) for d in restarted] == [(events["worker_started"][0][1]["replica"],
                                                                 removed[0])]
    label = f"collect[{restarted[0]['replica']}]"
    assert summary["replicas"][label]["restarts"] == 1 and summary["replicas"][label]["node_id"] != removed[0]
    assert summary["replicas"][label]["restart_gaps_s"][0] > 0
    # every committed row is in the store, and the restarted replica wrote rows under a fresh replica id (2 or 3)
    store = ZarrStorage.open(tmp_path / "replay.zarr")
    rows = store.get(torch.arange(len(store)))
    replica_ids = set((rows["traj_id"] >> REPLICA_SHIFT & 0xFF).tolist())
    assert {0, 1} <= replica_ids and replica_ids & {2, 3}
    fresh = ((rows["traj_id"] >> REPLICA_SHIFT & 0xFF) >= 2)
    assert int(rows["policy_version"][fresh].min()) >= 1  # it started with the learner's weights, not the initial ones
    assert summary["frames"] <= 4_000 + 2 * 64 + 64  # it went on with the replica's budget, not a new one
    assert len(store) == events["stored"][-1][1]["rows"]  # every row the writer took is in the store
    # lost with the node (counted when published): at most the chunk being sent, the one queued in the actor and
    # the one in flight (the edge's credit)
    assert 0 <= summary["frames"] - len(store) <= 3 * 64
    # the learner went on while the replica was restarted
    died_at = next(t for t, _ in events["replica_restarted"])
    back_at = events["worker_started"][-1][0]
    assert any(died_at <= t <= back_at for t, _ in events["optim_step"]) or back_at - died_at < 0.5
    del spare


class Raises(Stage):
    """A source that raises after a few items: a bug, not a death."""

    outputs = ("chunks",)

    async def run(self, ctx):
        for _ in range(3):
            await ctx.output("chunks").send(TensorDict({"x": torch.ones(4, 1)}, [4, 1]))
        raise ValueError("a bug in a stage of the replica")


def test_a_stage_that_raises_in_a_replica_fails_the_run_naming_it_without_restarts(cluster, tmp_path):
    p = Pipeline("raises")
    p.add(Raises("src"), group="remote")
    p.add(CountFrames("sink"))
    p.connect("src.chunks", "sink.chunks", capacity=2)
    p.place("remote", "ray_actor", max_restarts=3)
    with pytest.raises(StageFailed, match="a bug in a stage of the replica") as failure:
        streamrl.run(p, tmp_path, handle_signals=False)
    assert failure.value.stage == "src"
    assert json.loads((tmp_path / "summary.json").read_text())["replicas"]["remote"]["restarts"] == 0


def test_a_stop_ends_ray_replicas_and_leaves_no_actor(cluster, tmp_path):
    p = Pipeline("stop")
    c = p.add_collector("collect", streamrl.GymEnv("CartPole-v1", num_envs=2), _actor(), frames_per_chunk=32,
                        replicas=2, weights_from=None, placement="ray_actor")  # no budget: runs until stopped
    p.add(CountFrames("sink"))
    p.connect(c.chunks, "sink.chunks", capacity=2)

    p.add_hook(StopAfterFrames(320))  # one replica's chunk events
    result = streamrl.run(p, tmp_path, handle_signals=False)
    assert result.exit_reason == "stopped" and result.summary["frames"] >= 320
    assert _alive_actors() == 0


def test_a_replica_ray_cannot_place_fails_the_run_saying_what_it_asked(cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_actor, "PLACE_TIMEOUT_S", 2.0)
    p = Pipeline("no_room")
    p.add(Raises("src"), group="remote")
    p.add(CountFrames("sink"))
    p.connect("src.chunks", "sink.chunks", capacity=2)
    p.place("remote", "ray_actor", resources={"GPU": 1})
    with pytest.raises(PipelineError, match=r"replica remote found no room in Ray within 2 s .* asks \{'GPU': 1.0\}"):
        streamrl.run(p, tmp_path, handle_signals=False)
    assert _alive_actors() == 0


def test_the_cli_runs_ppo_with_ray_actor_replicas_joining_a_cluster_by_address(cluster, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "streamrl.cli", "run", str(ROOT / "pipelines" / "ppo_cartpole.py"), "--out", str(out),
         "--set", "placement=ray_actor", "--set", "replicas=2", "--set", "total_frames=4096",
         "--set", "eval_every=100000", "--ray-address", cluster.address],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] >= 4096 and set(summary["replicas"]) == {"collect[0]", "collect[1]"}
    assert all(r["placement"] == "ray_actor" and r["frames"] >= 2048 for r in summary["replicas"].values())
    assert ray.is_initialized()  # the run joined this cluster and left it running


def test_a_wrong_placement_through_set_names_the_choices(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "streamrl.cli", "run", str(DQN), "--out", str(tmp_path / "r"),
                           "--set", "placement=ray"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "ray_actor" in proc.stderr and "placement" in proc.stderr
