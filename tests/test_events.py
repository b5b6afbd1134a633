"""The event bus: lockstep subscribers see every event once, lossy ones drop oldest and count drops."""

import anyio

from streamrl import EventBus


async def test_lockstep_hook_sees_every_event_once_in_order():
    bus = EventBus()
    seen = []
    bus.subscribe(lambda e: seen.append(e.data["i"]), ["tick"], mode="lockstep")
    for i in range(1000):
        await bus.publish("tick", "src", {"i": i})
        await bus.publish("other", "src", {"i": -1})
    assert seen == list(range(1000))


async def test_publisher_waits_for_an_async_lockstep_hook():
    bus = EventBus()
    order = []

    async def slow(event):
        await anyio.sleep(0.01)
        order.append("hook")

    bus.subscribe(slow, ["tick"])
    await bus.publish("tick", "src", {})
    order.append("publisher")
    assert order == ["hook", "publisher"]


async def test_lossy_hook_drops_oldest_and_counts_drops_without_slowing_the_publisher():
    bus = EventBus()
    seen = []

    async def slow(event):
        await anyio.sleep(0.001)
        seen.append(event.data["i"])

    sub = bus.subscribe(slow, ["tick"], mode="lossy", capacity=8)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sub.drain)
        with anyio.fail_after(1):  # the publisher never waits on the lossy hook
            for i in range(500):
                await bus.publish("tick", "src", {"i": i})
        bus.close()
    assert sub.dropped > 0
    assert len(seen) + sub.dropped == 500
    assert seen == sorted(seen) and seen[-1] == 499  # the newest events survive
    assert bus.statistics()[sub.name]["dropped"] == sub.dropped


async def test_wildcard_and_wants():
    bus = EventBus()
    assert not bus.wants("x")
    got = []
    bus.subscribe(lambda e: got.append(e.kind), None)
    assert bus.wants("x")
    await bus.publish("x", "s", {})
    await bus.publish("y", "s", {})
    assert got == ["x", "y"]


def test_pipeline_on_registers_a_plain_function(tmp_path):
    import streamrl
    from streamrl import Pipeline, Stage

    class Ticker(Stage):
        async def run(self, ctx):
            for i in range(3):
                await ctx.publish("tick", i=i)

    seen = []
    p = Pipeline("on").add(Ticker("t"))
    p.on("tick", lambda e: seen.append(e.data["i"]))
    streamrl.run(p, tmp_path, handle_signals=False)
    assert seen == [0, 1, 2]


async def test_a_lossy_hook_buffers_events_without_their_tensors():
    import torch
    from tensordict import TensorDict

    bus = EventBus()
    buffered, direct = [], []
    sub = bus.subscribe(buffered.append, ["loss"], mode="lossy", capacity=8)
    bus.subscribe(direct.append, ["loss"])
    batch = TensorDict({"pixels": torch.zeros(64, 4, 64, 64)}, batch_size=[64])
    await bus.publish("loss", "learner", {"batch": batch, "loss": torch.tensor(0.5), "td": torch.ones(3), "step": 7})
    bus.close()
    await sub.drain()
    assert direct[0].data["batch"] is batch  # lockstep hooks get the tensors
    assert buffered[0].data == {"loss": 0.5, "step": 7}  # nothing pins the batch while a lossy hook lags


async def test_a_wildcard_can_leave_kinds_out_and_then_nobody_wants_them():
    bus = EventBus()
    seen = []
    bus.subscribe(seen.append, ("*", "-batch"))
    assert bus.wants("chunk") and not bus.wants("batch")  # the learner skips building a batch event
    await bus.publish("batch", "learner", {})
    await bus.publish("chunk", "env", {})
    later = []
    bus.subscribe(later.append, ["batch"])
    await bus.publish("batch", "learner", {})
    assert [e.kind for e in seen] == ["chunk"] and [e.kind for e in later] == ["batch"]
