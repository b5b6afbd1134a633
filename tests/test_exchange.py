"""The env <-> policy exchange: a rendezvous hand-off in one process, a scheduled stream otherwise; the graph's
rules for exchange ports; replicas' seeds and traj_ids."""

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase

from streamrl import (
    MLP,
    BrokenStreamError,
    EnvStage,
    GymEnv,
    Pipeline,
    PipelineError,
    PolicyAnswer,
    PolicyStage,
    QValueActor,
    Stage,
    StageFailed,
    open_exchange,
    open_stream,
    run,
)
from streamrl.stages.base import StageContext
from streamrl.stages.policy import action_function, weights_message
from streamrl.testing import Collect, CountFrames


def serve_in_background(server, handler):
    """Start ``server.serve(handler)`` and let it register the handler."""
    return asyncio.ensure_future(server.serve(handler))


# -- the exchange on its own -----------------------------------------------------------------------------------
def test_rendezvous_with_a_sync_handler_answers_without_a_trip_through_the_scheduler():
    async def main(capacity):
        asker, server = open_exchange(capacity, name="x", server="double")
        serving = serve_in_background(server, lambda n: 2 * n)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticking = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        before = ticks
        answers = [await asker.ask(n) for n in range(100)]
        scheduled = ticks - before
        asker.close()
        await serving
        ticking.cancel()
        assert answers == [2 * n for n in range(100)]
        stats = asker.statistics()
        assert (stats.items_sent, stats.items_received) == (100, 100)
        return scheduled

    assert asyncio.run(main(0)) == 0  # no other task ran while 100 requests were answered
    assert asyncio.run(main(1)) >= 100  # a scheduled stream: every answer is a trip through the loop


def test_server_time_excludes_the_handler_and_the_asker_waits_for_it():
    def slow(n):
        end = time.perf_counter() + 0.01
        while time.perf_counter() < end:  # busy work, 10 ms
            pass
        return n

    async def main():
        asker, server = open_exchange(0, name="x", server="s")
        serving = serve_in_background(server, slow)
        await asyncio.sleep(0)
        start = time.perf_counter()
        for n in range(10):
            await asker.ask(n)
        wall = time.perf_counter() - start
        asker.close()
        await serving
        return wall, asker.waited_s, server.waited_s

    wall, asker_waited, server_waited = asyncio.run(main())
    assert asker_waited >= 0.1 and asker_waited > 0.9 * wall  # the asker waited for every answer
    assert server_waited < 0.2 * wall  # parked in serve all along, but the handler's work is the server's


def test_awaitable_handlers_serve_several_askers_one_at_a_time_and_a_cancelled_ask_leaves_it_consistent():
    inside = 0
    most = 0

    async def handler(n):
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        try:
            await asyncio.sleep(0.001)
        finally:
            inside -= 1
        return n

    async def main():
        first, server = open_exchange(0, name="x", server="s")
        second = first.clone()
        serving = serve_in_background(server, handler)
        stuck = asyncio.ensure_future(first.ask(-1))
        await asyncio.sleep(0)  # inside the handler now
        queued = asyncio.ensure_future(second.ask(-2))
        await asyncio.sleep(0)
        stuck.cancel()  # cancelled inside the awaitable handler
        with pytest.raises(asyncio.CancelledError):
            await stuck
        assert await queued == -2  # the next asker in line is served

        async def asks(asker, base):
            return [await asker.ask(base + i) for i in range(20)]

        got = await asyncio.gather(asks(first, 0), asks(second, 100))
        first.close()
        assert not serving.done()  # one asker is still open
        second.close()
        await serving  # every asker closed: serve returns
        return got

    got = asyncio.run(main())
    assert got == [list(range(20)), list(range(100, 120))]
    assert most == 1


def test_a_closed_server_breaks_askers_and_a_raising_handler_names_the_server():
    async def main():
        asker, server = open_exchange(0, name="x", server="policy")
        serving = serve_in_background(server, lambda n: 1 / n)
        await asyncio.sleep(0)
        with pytest.raises(StageFailed) as failed:
            await asker.ask(0)
        assert failed.value.stage == "policy" and isinstance(failed.value.__cause__, ZeroDivisionError)
        assert await asker.ask(2) == 0.5  # the exchange is still usable
        server.close()
        await serving  # serve returns once the server half is closed
        with pytest.raises(BrokenStreamError, match="server"):
            await asker.ask(1)

    asyncio.run(main())


# -- the pipeline ----------------------------------------------------------------------------------------------
class Chunks(Stage):
    """Keeps every chunk; tells the learner stand-in after each."""

    inputs = ("chunks",)
    outputs = ("seen",)
    optional = frozenset({"seen"})

    def __init__(self, name="sink"):
        super().__init__(name)
        self.chunks = []

    async def run(self, ctx):
        async for chunk in ctx.input("chunks"):
            self.chunks.append(chunk)
            if ctx.has_output("seen"):
                await ctx.output("seen").send(len(self.chunks))


class Publisher(Stage):
    """A learner stand-in: after every chunk, new weights (perturbed deterministically) with the next version."""

    inputs = ("seen",)
    outputs = ("weights",)

    def __init__(self, name, module):
        super().__init__(name)
        self.module = module

    async def run(self, ctx):
        async for count in ctx.input("seen"):
            with torch.no_grad():
                for p in self.module.parameters():
                    p.add_(0.1 * torch.sin(torch.arange(p.numel(), dtype=p.dtype) + count).view_as(p))
            await ctx.output("weights").send(weights_message(self.module, count))


def collect(tmp_path, capacity, *, pixels_path=False, record=("action",)):
    torch.manual_seed(0)
    actor = QValueActor(MLP(2, in_features=4, num_cells=(16,)))
    env = GymEnv("CartPole-v1", num_envs=4, seed=3)
    if pixels_path:  # any env that is not a plain GymEnv takes the TensorDict path
        from streamrl import StepCounter, TransformedEnv

        env = TransformedEnv(env, StepCounter())
    sink = Chunks()
    p = Pipeline("x")
    p.add(EnvStage("env", env, frames_per_chunk=64, total_frames=320, record=record),
          PolicyStage("policy", actor, max_policy_lag=0), sink, Publisher("learner", actor))
    p.connect("env.policy", "policy.requests", capacity=capacity)
    p.connect("env.chunks", "sink.chunks", capacity=2)
    p.connect("sink.seen", "learner.seen", capacity=2)
    p.connect("learner.weights", "policy.weights", capacity=1, overflow="drop_oldest")
    result = run(p, tmp_path / f"run{capacity}{pixels_path}{len(record)}", handle_signals=False)
    return sink.chunks, result.summary


@pytest.mark.parametrize("pixels_path", [False, True], ids=["arrays", "tensordict"])
def test_the_hand_off_yields_the_same_transitions_as_a_scheduled_stream(tmp_path, pixels_path):
    handed, summary = collect(tmp_path, 0, pixels_path=pixels_path)
    queued, _ = collect(tmp_path, 1, pixels_path=pixels_path)
    assert len(handed) == len(queued) >= 5
    for a, b in zip(handed, queued, strict=True):
        for key in ("observation", "action", ("next", "reward"), ("next", "done"), "traj_id", "policy_version"):
            assert torch.equal(a[key], b[key]), key
    # max_policy_lag=0: chunk i acted with the weights trained on chunks 0..i-1
    assert [int(c["policy_version"][0, 0]) for c in handed] == list(range(len(handed)))
    assert "policy.requests" in summary["streams"]  # the exchange is listed with the streams
    assert summary["streams"]["policy.requests"]["items_sent"] == len(handed) * 16


def test_the_policys_tensor_fast_path_acts_as_the_keyed_module(tmp_path):
    actor = QValueActor(MLP(3, in_features=4, num_cells=(8,)))
    last = actor.value_net[-1]
    with torch.no_grad():  # actions 0 and 1 always tie (both ways take the first), 2 wins about half the time
        last.weight[1] = last.weight[0]
        last.weight[2] = -last.weight[0]
        last.bias[1:] = last.bias[0]
    observation = torch.randn(256, 4)
    fast = action_function(actor)
    assert fast is not None
    actions = fast(observation)
    assert torch.equal(actions, actor(TensorDict({"observation": observation}, [256]))["action"])
    assert set(actions.tolist()) == {0, 2}
    assert action_function(QValueActor(MLP(3, in_features=4), one_hot=True)) is None
    # in a run: recording the Q-values takes the keyed module's path; the transitions are the same
    fast_chunks, _ = collect(tmp_path, 0)
    keyed_chunks, _ = collect(tmp_path, 0, record=("action", "chosen_action_value"))
    assert "chosen_action_value" in keyed_chunks[0].keys() and "chosen_action_value" not in fast_chunks[0].keys()
    for a, b in zip(fast_chunks, keyed_chunks, strict=True):
        assert torch.equal(a["action"], b["action"]) and torch.equal(a["observation"], b["observation"])


class SlowPolicy(TensorDictModuleBase):
    """Greedy-zero actions after ``work_s`` of busy work; raises at call ``fail_at``."""

    in_keys = ["observation"]
    out_keys = ["action"]

    def __init__(self, work_s=0.0, fail_at=None):
        super().__init__()
        self.work_s = work_s
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, td):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("policy exploded")
        end = time.perf_counter() + self.work_s
        while time.perf_counter() < end:
            pass
        td.set("action", torch.zeros(td.batch_size, dtype=torch.int64))
        return td


def test_the_policys_work_is_counted_as_the_policy_stages(tmp_path):
    p = Pipeline("busy")
    p.add(EnvStage("env", GymEnv("CartPole-v1", num_envs=2, seed=0), frames_per_chunk=20, total_frames=200),
          PolicyStage("policy", SlowPolicy(work_s=0.004)), CountFrames("sink"))
    p.connect("env.policy", "policy.requests", capacity=0)
    p.connect("env.chunks", "sink.chunks")
    busy = run(p, tmp_path / "run", handle_signals=False).summary["stages"]["busy_fraction"]
    assert busy["policy"] > 0.6, busy  # ~4 ms of each step is the policy's
    assert busy["env"] < 0.4, busy  # the env stage waited for it


@pytest.mark.parametrize("capacity", [0, 1])
def test_a_raising_policy_fails_the_run_naming_the_policy_stage(tmp_path, capacity):
    p = Pipeline("fails")
    p.add(EnvStage("env", GymEnv("CartPole-v1", num_envs=2, seed=0), frames_per_chunk=20, total_frames=200),
          PolicyStage("policy", SlowPolicy(fail_at=15)), CountFrames("sink"))
    p.connect("env.policy", "policy.requests", capacity=capacity)
    p.connect("env.chunks", "sink.chunks")
    with pytest.raises(StageFailed, match="policy exploded") as failed:
        run(p, tmp_path / "run", handle_signals=False)
    assert failed.value.stage == "policy"


def test_two_env_stages_ask_one_policy(tmp_path):
    actor = QValueActor(MLP(2, in_features=4, num_cells=(8,)))
    sink = Collect("sink")
    p = Pipeline("double")
    p.add(EnvStage("env0", GymEnv("CartPole-v1", num_envs=2), frames_per_chunk=20, total_frames=100, group=0),
          EnvStage("env1", GymEnv("CartPole-v1", num_envs=2), frames_per_chunk=20, total_frames=100, group=1),
          PolicyStage("policy", actor), sink)
    p.connect("env0.policy", "policy.requests", capacity=0)
    p.connect("env1.policy", "policy.requests", capacity=0)
    p.connect("env0.chunks", "sink.items")
    p.connect("env1.chunks", "sink.items")
    run(p, tmp_path / "run", handle_signals=False)
    first_ids = {int(chunk["traj_id"].min()) >> 28 for chunk in sink.items}
    assert first_ids == {0, 1}  # each group's traj_ids start at group << 28
    observations = [chunk["observation"][:, 0] for chunk in sink.items[:2]]
    assert not torch.equal(*observations)  # the groups' envs are seeded apart


# -- validation ------------------------------------------------------------------------------------------------
def graph(connect, group="collect"):
    p = Pipeline("v")
    p.add(EnvStage("env", GymEnv("CartPole-v1", num_envs=2), frames_per_chunk=2), group=group)
    p.add(PolicyStage("policy", QValueActor(MLP(2, in_features=4, num_cells=(8,)))), CountFrames("sink"))
    connect(p)
    return p


def test_an_exchange_does_not_cross_processes():
    p = graph(lambda p: p.connect("env.policy", "policy.requests", capacity=1).connect("env.chunks", "sink.chunks"))
    p.place("collect", "worker_process")
    with pytest.raises(PipelineError, match="does not cross processes yet.*put env and policy in one group"):
        p.validate()


def test_an_exchange_port_connects_only_to_an_exchange_port():
    p = graph(lambda p: p.connect("env.policy", "sink.chunks").connect("env.chunks", "policy.requests"))
    with pytest.raises(PipelineError, match="env.policy, a request/answer exchange port, to sink.chunks, a stream"):
        p.validate()


# -- replicas --------------------------------------------------------------------------------------------------
def first_chunk(replica, seed):
    """One chunk of an env stage run as replica ``replica`` (the run context says which), random actions."""
    stage = EnvStage("env", GymEnv("CartPole-v1", num_envs=2, seed=seed), frames_per_chunk=8, total_frames=8)

    async def publish(kind, source, data):
        pass

    async def main():
        asker, server = open_exchange(0, name="policy.requests", server="policy")
        send, receive = open_stream(2, name="chunks")
        generator = torch.Generator().manual_seed(0)

        def random_actions(request):
            return PolicyAnswer(request.td, 0, torch.randint(0, 2, request.td.batch_size, generator=generator))

        run_ctx = SimpleNamespace(seed=0, replica=replica, replica_id=replica, restarts=0, stopping=False,
                                  deterministic=False, bus=SimpleNamespace(publish=publish))
        ctx = StageContext(stage, run_ctx, {}, {"policy": asker, "chunks": send})
        serving = asyncio.ensure_future(server.serve(random_actions))
        await stage.run(ctx)
        ctx.close_ports()
        await serving
        return await receive.receive()

    try:
        return asyncio.run(main())
    finally:
        stage.env.close()


@pytest.mark.parametrize("seed", [None, 5], ids=["run seed", "env seed"])
def test_replicas_seed_their_envs_and_number_their_episodes_apart(seed):
    zero, one = first_chunk(0, seed), first_chunk(1, seed)
    assert not torch.equal(zero["observation"][:, 0], one["observation"][:, 0])
    assert int(zero["traj_id"].min()) == 0
    assert int(one["traj_id"].min()) == 1 << 32
    assert torch.equal(first_chunk(1, seed)["observation"], one["observation"])  # still seeded: reproducible

