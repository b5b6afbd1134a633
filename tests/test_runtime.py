"""The runtime: one task group, failures cancel everything and name the stage, stops drain, summaries always."""

import json
import time

import anyio
import pytest

import streamrl
from streamrl import Pipeline, Stage, StageFailed
from streamrl.testing import Collect, Fail, ListSource


class Forever(Stage):
    """A source that never ends on its own (but honours stop requests)."""

    outputs = ("items",)
    source = True

    def __init__(self, name):
        super().__init__(name)
        self.closed = False
        self.cancelled = False

    async def run(self, ctx):
        out = ctx.output("items")
        i = 0
        try:
            while not ctx.stopping:
                await out.send(i)
                i += 1
                await anyio.sleep(0.001)
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise

    async def close(self, ctx):
        self.closed = True


def test_items_flow_and_the_run_completes(tmp_path):
    p = Pipeline("ok")
    sink = Collect("sink")
    p.add(ListSource("src", list(range(50))), sink).connect("src.items", "sink.items")
    result = streamrl.run(p, tmp_path, handle_signals=False)
    assert sink.items == list(range(50))
    assert result.exit_reason == "completed"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["streams"]["sink.items"]["items_sent"] == 50
    assert set(summary["stages"]["busy_fraction"]) == {"src", "sink"}


def test_a_failing_stage_cancels_the_rest_and_the_error_names_it(tmp_path):
    class Boom(Stage):
        async def run(self, ctx):
            await anyio.sleep(0.05)
            raise ValueError("bad item")

    p = Pipeline("boom")
    forever = Forever("src")
    sink = Collect("sink", keep=False)
    p.add(forever, sink, Boom("judge")).connect("src.items", "sink.items")
    start = time.perf_counter()
    with pytest.raises(StageFailed, match=r"stage 'judge' failed: ValueError: bad item") as info:
        streamrl.run(p, tmp_path, handle_signals=False)
    assert time.perf_counter() - start < 2
    assert info.value.stage == "judge"
    assert isinstance(info.value.__cause__, ValueError)
    assert forever.cancelled and forever.closed  # an unrelated stage was cancelled, then closed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_reason"] == "failed" and "bad item" in summary["error"]


def test_a_consumer_that_fails_stops_its_producer(tmp_path):
    p = Pipeline("boom")
    forever = Forever("src")
    p.add(forever, Fail("judge", ValueError("bad item"), after=3)).connect("src.items", "judge.items")
    with pytest.raises(StageFailed, match=r"stage 'judge' failed"):
        streamrl.run(p, tmp_path, handle_signals=False)
    assert forever.closed  # cancelled, or ended when its consumer went away: either way it was closed


def test_a_failing_lockstep_hook_fails_the_run_naming_the_hook(tmp_path):
    class Explode(streamrl.Hook):
        events = ("tick",)

        def on_event(self, event):
            raise RuntimeError("hook exploded")

    class Ticker(Stage):
        async def run(self, ctx):
            await ctx.publish("tick")

    p = Pipeline("h").add(Ticker("ticker"))
    p.add_hook(Explode())
    with pytest.raises(StageFailed, match="hook Explode"):
        streamrl.run(p, tmp_path, handle_signals=False)


def test_stop_request_lets_the_pipeline_drain(tmp_path):
    class StopAfter(streamrl.Hook):
        events = ("tick",)
        mode = "lockstep"

        async def start(self, run):
            self.run = run

        def on_event(self, event):
            self.run.request_stop("enough")

    class Ticker(Stage):
        outputs = ("items",)
        source = True

        async def run(self, ctx):
            i = 0
            while not ctx.stopping:
                await ctx.output("items").send(i)
                i += 1
                if i == 10:
                    await ctx.publish("tick")

    sink = Collect("sink", delay=0.001)
    p = Pipeline("s").add(Ticker("src"), sink).connect("src.items", "sink.items")
    p.add_hook(StopAfter())
    result = streamrl.run(p, tmp_path, handle_signals=False)
    assert result.exit_reason == "stopped"
    assert sink.items == list(range(10))  # every item sent before the stop was drained


def test_drain_timeout_cancels_stages_that_do_not_finish(tmp_path):
    class Stubborn(Stage):
        source = True

        async def start_stop(self, run):
            pass

        async def run(self, ctx):
            ctx.run.request_stop("test")
            await anyio.sleep(60)

    p = Pipeline("t").add(Stubborn("s"))
    start = time.perf_counter()
    result = streamrl.run(p, tmp_path, handle_signals=False, drain_timeout=0.2)
    assert time.perf_counter() - start < 5
    assert result.exit_reason == "stopped"


def test_a_signal_during_the_flush_does_not_cut_it_short(tmp_path):
    """SIGINT (Ctrl-C) while stages close: the close finishes and the summary is written; exit says interrupted."""
    import os
    import signal

    class SlowClose(Stage):
        async def run(self, ctx):
            return

        async def close(self, ctx):
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the store would be flushing
            await anyio.sleep(0.3)
            self.closed = True

    stage = SlowClose("slow")
    result = streamrl.run(Pipeline("t").add(stage), tmp_path)
    assert stage.closed
    assert json.loads((tmp_path / "summary.json").read_text())["exit_reason"] == "interrupted"
    assert result.exit_code == 130
