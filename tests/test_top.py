"""``status.json`` (refreshed by the runtime while a run goes on) and ``streamrl top``, which draws it."""

import json
import threading
import time

import pytest
from rich.console import Console

import streamrl
from streamrl import Pipeline, Stage
from streamrl.testing import Collect, ListSource
from streamrl.top import StatusMissing, main, top


class Chunks(Stage):
    """A source of ``n`` items of ``frames`` frames each, publishing ``chunk`` events as an env stage does."""

    outputs = ("items",)
    source = True

    def __init__(self, name, n, frames=10):
        super().__init__(name)
        self.n = n
        self.frames = frames

    async def run(self, ctx):
        out = ctx.output("items")
        for i in range(self.n):
            await out.send(i)
            await ctx.publish("chunk", frames=(i + 1) * self.frames)


def _screen(status_dir, **kwargs):
    console = Console(record=True, width=120)
    status = top(status_dir, console=console, **kwargs)
    return status, console.export_text()


def test_a_finished_run_leaves_its_final_status(tmp_path):
    p = Pipeline("chunks")
    p.add(Chunks("src", 40), Collect("sink", keep=False)).connect("src.items", "sink.items", capacity=3)
    streamrl.run(p, tmp_path, handle_signals=False)
    status = json.loads((tmp_path / "status.json").read_text())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert status["state"] == "completed" and status["phase"] == "ended"
    assert status["frames"] == summary["frames"] == 400
    assert status["stages"]["src"]["frames"] == 400 and "frames" not in status["stages"]["sink"]
    assert set(status["stages"]) == {"src", "sink"}
    assert status["stages"]["sink"]["busy"] == summary["stages"]["busy_fraction"]["sink"]
    assert status["bottleneck"] == summary["stages"]["bottleneck"]
    sink = status["streams"]["sink.items"]
    assert (sink["capacity"], sink["items_sent"], sink["backpressure"]) == (3, 40, False)
    assert not (tmp_path / "status.json.tmp").exists()


def test_status_is_refreshed_while_the_run_goes_on_and_shows_backpressure(tmp_path):
    p = Pipeline("slow")
    p.add(ListSource("src", list(range(60))), Collect("sink", delay=0.05, keep=False))
    p.connect("src.items", "sink.items", capacity=4)
    runner = threading.Thread(target=streamrl.run, args=(p, tmp_path), kwargs={"handle_signals": False})
    runner.start()
    try:
        path = tmp_path / "status.json"
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        first = json.loads(path.read_text())
        time.sleep(1.3)
        second = json.loads(path.read_text())
    finally:
        runner.join()
    assert first["state"] == second["state"] == "running"
    assert second["wall_s"] > first["wall_s"]  # rewritten about once a second
    assert second["updated_at"] - first["updated_at"] >= 0.9
    stream = second["streams"]["sink.items"]
    assert stream["capacity"] == 4 and stream["depth"] >= 3  # the slow sink keeps its input full ...
    assert stream["backpressure"] and stream["producer_wait"] > 0.5  # ... and the source waits for room
    assert second["bottleneck"] == "sink" and second["stages"]["sink"]["busy"] > 0.9
    final = json.loads(path.read_text())
    assert final["state"] == "completed" and not final["streams"]["sink.items"]["backpressure"]


CRAFTED = {
    "version": 1, "pipeline": "dqn_cartpole", "state": "running", "phase": "running", "updated_at": None,
    "wall_s": 12.3, "frames": 24576, "frames_per_s": 2010.4, "frames_per_s_overall": 1998.0, "optim_steps": 3000,
    "updates_per_s": 251.0, "policy_lag": {"recent": 0.4, "mean": 0.5, "max": 2}, "eval_return_last": 187.5,
    "bottleneck": "learner",
    "stages": {
        "env": {"process": "collector", "busy": 0.31, "frames": 24576, "frames_per_s": 2010.4},
        "learner": {"process": "main", "busy": 0.96},
    },
    "streams": {
        "learner.batches": {"depth": 4, "capacity": 4, "items_per_s": 251.0, "producer_wait": 0.8,
                            "backpressure": True},
        "writer.chunks": {"depth": 0, "capacity": 2, "items_per_s": 31.4, "producer_wait": 0.0,
                          "backpressure": False},
    },
    "replicas": {},
}


def _write(tmp_path, **changes):
    status = {**CRAFTED, "updated_at": time.time(), **changes}
    (tmp_path / "status.json").write_text(json.dumps(status))
    return status


def test_top_draws_stages_streams_and_the_backpressure_mark(tmp_path):
    _write(tmp_path)
    status, text = _screen(tmp_path, once=True)
    assert status["frames"] == 24576
    assert "dqn_cartpole · running · 12.3 s" in text
    assert "frames 24,576 · 2,010.4 frames/s (1,998.0 overall) · updates/s 251.0\n" in text
    assert "policy lag 0.40 · eval return 187.5 · bottleneck learner\n" in text
    lines = text.splitlines()
    env = next(line for line in lines if line.startswith("env "))
    assert "collector" in env and "31 %" in env and "2,010.4" in env
    assert any(line.startswith("learner ◀") and "96 %" in line for line in lines)  # the bottleneck is marked
    batches = next(line for line in lines if line.startswith("learner.batches"))
    assert "4/4" in batches and "[backpressure]" in batches and "80 %" in batches
    chunks = next(line for line in lines if line.startswith("writer.chunks"))
    assert "0/2" in chunks and "[backpressure]" not in chunks
    assert text.count("[backpressure]") == 1
    assert "no update for" not in text


def test_top_says_when_a_running_status_is_stale(tmp_path):
    _write(tmp_path, updated_at=time.time() - 60)
    _, text = _screen(tmp_path, once=True)
    assert "no update for 60 s: the run may have died" in text


def test_the_live_view_ends_with_the_run(tmp_path):
    _write(tmp_path)

    def finish():
        time.sleep(0.3)
        _write(tmp_path, state="completed", phase="ended", wall_s=13.0)

    writer = threading.Thread(target=finish)
    writer.start()
    started = time.monotonic()
    status, text = _screen(tmp_path, interval=0.05)
    writer.join()
    assert status["state"] == "completed" and time.monotonic() - started < 5
    assert "dqn_cartpole · completed · 13.0 s" in text


def test_a_directory_without_status_says_what_to_do(tmp_path, capsys):
    with pytest.raises(StatusMissing, match=r"no status\.json in '.*': is it a run directory of streamrl >= "
                                             r"[0-9.]+, started with streamrl run\?"):
        top(tmp_path, once=True)
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "(no such directory)" in capsys.readouterr().err


def test_main_prints_a_finished_run_once(tmp_path, capsys):
    _write(tmp_path, state="stopped", stop_reason="solved")
    assert main([str(tmp_path), "--once"]) == 0
    out = capsys.readouterr().out
    assert "stopped (solved)" in out and "learner.batches" in out


def test_the_status_writer_costs_nothing_per_step(tmp_path, monkeypatch):
    """One write per interval, however many items flow: about one a second, and the final one."""
    from streamrl.execution.status import StatusWriter

    writes = []
    original = StatusWriter.write
    monkeypatch.setattr(StatusWriter, "write", lambda self, status: (writes.append(status["state"]),
                                                                      original(self, status)))
    p = Pipeline("fast")
    p.add(ListSource("src", list(range(1000)), delay=0.001), Collect("sink", keep=False))
    p.connect("src.items", "sink.items")
    started = time.monotonic()
    streamrl.run(p, tmp_path, handle_signals=False)
    wall = time.monotonic() - started
    assert writes[-1] == "completed" and writes[:-1] == ["running"] * (len(writes) - 1)
    assert 2 <= len(writes) <= wall + 3


def test_streamrl_top_on_the_command_line(tmp_path):
    import subprocess
    import sys

    _write(tmp_path, state="completed")
    done = subprocess.run([sys.executable, "-m", "streamrl.cli", "top", str(tmp_path), "--once"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "[backpressure]" in done.stdout and "completed" in done.stdout


class SlowChunks(Chunks):
    """Chunks, one every 50 ms."""

    async def run(self, ctx):
        import anyio

        out = ctx.output("items")
        for i in range(self.n):
            await anyio.sleep(0.05)
            await out.send(i)
            await ctx.publish("chunk", frames=(i + 1) * self.frames)


def test_a_worker_processes_stages_show_their_busy_fraction_while_the_run_goes_on(tmp_path):
    p = Pipeline("worker")
    p.add(SlowChunks("src", 60), group="w")
    p.add(Collect("sink", keep=False)).connect("src.items", "sink.items", capacity=2)
    p.place("w", "worker_process")
    runner = threading.Thread(target=streamrl.run, args=(p, tmp_path), kwargs={"handle_signals": False})
    runner.start()
    try:
        path = tmp_path / "status.json"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the worker reports its figures every second while it runs
            status = json.loads(path.read_text()) if path.exists() else {}
            if status.get("stages", {}).get("src", {}).get("busy") is not None:
                break
            time.sleep(0.1)
    finally:
        runner.join()
    assert status["state"] == "running" and isinstance(status["stages"]["src"]["busy"], float)
    assert status["streams"]["src.items->sink.items (outbound)"]["items_sent"] > 0
