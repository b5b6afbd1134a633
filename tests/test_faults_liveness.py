"""Liveness under faults: a hung env step, a killed worker, a second Ctrl-C with slow hooks, and workers started
from a folder that holds a ``streamrl/`` directory. Each test injects the fault and times how the run ends."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import psutil
import pytest

import streamrl
from streamrl import MLP, EnvStage, GymEnv, Pipeline, PolicyStage, QValueActor, Stage, StageFailed, WorkerDied
from streamrl.errors import EnvStepTimeout
from streamrl.events import Hook
from streamrl.stages.policy import weights_message
from streamrl.testing import CountFrames, HangingCartPole
from streamrl.transforms import StepCounter, TransformedEnv

HANG = "streamrl.testing:streamrl/HangingCartPole-v0"
STREAMRL = str(Path(sys.executable).with_name("streamrl"))  # the console script, as a user runs it


@pytest.fixture(autouse=True)
def release_hung_envs():
    """Free any thread a hanging env left behind once the test is over (each test gets a fresh event)."""
    HangingCartPole.release = threading.Event()
    yield
    HangingCartPole.release.set()


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def collector(p, env, *, step_timeout=1.0, frames_per_chunk=16, total_frames=None, group="collect"):
    p.add(EnvStage("env", env, frames_per_chunk=frames_per_chunk, total_frames=total_frames,
                   step_timeout=step_timeout),
          PolicyStage("policy", QValueActor(MLP(2, in_features=4, num_cells=(8,)))), group=group)
    p.connect("env.policy", "policy.requests", capacity=0)


def run_hanging(tmp_path, env, **kwargs):
    """Run ``env`` (hanging for 20 s: without a step timeout the run completes its 200 frames and this fails)."""
    p = Pipeline("hang")
    collector(p, env, total_frames=200, **kwargs)
    p.add(CountFrames("sink"))
    p.connect("env.chunks", "sink.chunks")
    start = time.perf_counter()
    with pytest.raises(StageFailed) as info:
        streamrl.run(p, tmp_path, handle_signals=False)
    assert isinstance(info.value.error, EnvStepTimeout), info.value
    return info.value.error, time.perf_counter() - start


# -- 1. step timeouts -----------------------------------------------------------------------------------------
def test_a_step_that_hangs_on_the_event_loop_thread_is_interrupted_at_its_timeout(tmp_path):
    """The fast path steps in-process envs on the event loop's thread: the watchdog interrupts the hung call."""
    error, elapsed = run_hanging(tmp_path, GymEnv(HANG, num_envs=2, backend="sync", hang_at=20, hang_s=20))
    assert error.call == "step" and error.frames == 2 * 16 + 3 * 2  # 20th step: two chunks done, 4th step of the 3rd
    assert str(error).startswith(f"env {HANG!r} (stage 'env'): step did not return within "
                                 f"step_timeout=1 s, at frame {error.frames}; the call was interrupted")
    assert elapsed < 4
    assert signal.getsignal(signal.SIGURG) == signal.SIG_DFL  # the interrupt's handler is gone with the run


def test_a_step_that_hangs_in_a_thread_ends_the_run_and_leaves_only_a_daemon_thread(tmp_path):
    """The TensorDict path steps in a thread, which cannot be killed: the run still ends, the thread is a daemon
    (it does not keep the process alive at exit) and the env is not closed under the stuck call."""
    env = TransformedEnv(GymEnv(HANG, num_envs=2, backend="sync", hang_at=5, hang_s=20), StepCounter())
    error, elapsed = run_hanging(tmp_path, env)
    assert error.call == "step" and error.frames == 8
    assert "runs in a thread of this process, which cannot be stopped" in str(error)
    assert elapsed < 4
    stuck = [t for t in threading.enumerate() if t.name == "env stage env"]
    assert len(stuck) == 1 and stuck[0].daemon and stuck[0].is_alive()


@pytest.mark.parametrize(("path", "hang_at", "call"), [("arrays", 6, "step"), ("tensordict", 0, "reset")])
def test_a_subprocess_worker_that_hangs_is_named_and_killed(tmp_path, path, hang_at, call):
    env = GymEnv(HANG, num_envs=1, backend="subprocess", hang_at=hang_at, hang_s=20)
    if path == "tensordict":
        env = TransformedEnv(env, StepCounter())
    error, elapsed = run_hanging(tmp_path, env, frames_per_chunk=4)
    assert error.call == call and len(error.workers) == 1
    index, pid = error.workers[0]
    assert f"{call} did not return within step_timeout=1 s" in str(error)
    assert f"subprocess worker {index} (pid {pid}) did not answer and was killed" in str(error)
    assert not alive(pid)
    assert elapsed < 6


def test_streamrl_run_exits_with_code_1_soon_after_a_step_hangs(tmp_path):
    """The whole process exits, though the hung call is stuck in a thread for good."""
    stamp = tmp_path / "hung_at"
    (tmp_path / "hang.py").write_text(textwrap.dedent(f"""
        from dataclasses import dataclass
        from streamrl import MLP, EnvStage, GymEnv, Pipeline, PolicyStage, QValueActor
        from streamrl.testing import CountFrames
        from streamrl.transforms import StepCounter, TransformedEnv

        @dataclass
        class Config:
            seed: int = 0
            device: str = "cpu"
            total_frames: int = 10_000
            num_envs: int = 2

        def build(cfg: Config) -> Pipeline:
            env = TransformedEnv(GymEnv({HANG!r}, num_envs=cfg.num_envs, backend="sync", hang_at=30,
                                        stamp={str(stamp)!r}), StepCounter())
            p = Pipeline("hang", config=cfg)
            p.add(EnvStage("env", env, frames_per_chunk=16, total_frames=cfg.total_frames, step_timeout=1.0),
                  PolicyStage("policy", QValueActor(MLP(2, in_features=4, num_cells=(8,)))), CountFrames("sink"))
            p.connect("env.policy", "policy.requests", capacity=0)
            p.connect("env.chunks", "sink.chunks")
            return p
    """))
    proc = subprocess.run([STREAMRL, "run", "hang.py", "--out", "run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # a thread that kept the process alive: TimeoutExpired
    assert proc.returncode == 1, proc.stderr
    assert f"EnvStepTimeout: env {HANG!r} (stage 'env'): step did not return" in proc.stderr
    summary_file = tmp_path / "run" / "summary.json"
    assert summary_file.stat().st_mtime - float(stamp.read_text()) < 1 + 2  # the timeout, then the run ended
    summary = json.loads(summary_file.read_text())
    assert summary["exit_reason"] == "failed" and "EnvStepTimeout" in summary["error"]


# -- 2. a killed worker process -------------------------------------------------------------------------------
class KillAndPublish(Stage):
    """Receives chunks and answers each with new weights. At chunk ``kill_at`` it stops taking chunks until the
    bridge holds several that are not acked yet, kills the collector worker (SIGKILL), waits until it is dead,
    then goes on: the main process acks those chunks and sends weights into the dead socket."""

    inputs = ("chunks",)
    outputs = ("weights",)

    def __init__(self, name, module, kill_at, pids):
        super().__init__(name)
        self.module = module
        self.kill_at = kill_at
        self.pids = pids

    async def run(self, ctx):
        version = 0
        async for _ in ctx.input("chunks"):
            version += 1
            if version == self.kill_at:
                await anyio.sleep(0.3)  # the local stream fills up; more chunks wait in the bridge, not acked
                os.kill(self.pids[0], signal.SIGKILL)
                while alive(self.pids[0]):
                    await anyio.sleep(0.001)
            await ctx.output("weights").send(weights_message(self.module, version))


@pytest.mark.parametrize("kill_at", [0, 1, 2, 3, 5])
def test_a_worker_killed_at_any_point_surfaces_as_worker_died_with_its_group_pid_and_signal(tmp_path, kill_at):
    """Killed as it starts (0), or later with chunks in flight that the main process then acks, and weights that
    it then sends (shared-memory slots first, at 1), into the dead socket: every time the run raises WorkerDied
    naming the group, the pid and SIGKILL, within seconds (not a RuntimeError about a closed transport)."""
    p = Pipeline("killed")
    collector(p, GymEnv("CartPole-v1", num_envs=2), step_timeout=None, frames_per_chunk=8)
    pids = []
    if kill_at == 0:
        p.on("worker_started", lambda event: os.kill(event.data["pid"], signal.SIGKILL))
    p.on("worker_started", lambda event: pids.append(event.data["pid"]))
    p.add(KillAndPublish("pub", QValueActor(MLP(2, in_features=4, num_cells=(8,))), kill_at, pids))
    p.connect("env.chunks", "pub.chunks", capacity=4)
    p.connect("pub.weights", "policy.weights", capacity=4)
    p.place("collect", "worker_process")
    start = time.perf_counter()
    with pytest.raises(WorkerDied) as info:
        streamrl.run(p, tmp_path, handle_signals=False)
    assert time.perf_counter() - start < 10
    assert info.value.group == "collect" and info.value.pid == pids[0] and info.value.exitcode == -9
    assert str(info.value).startswith(f"worker process of stage group 'collect' (pid {pids[0]}) died: killed by "
                                      "SIGKILL (exit code -9)")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_reason"] == "failed" and summary["error"].startswith("WorkerDied")


def test_every_write_to_a_dead_peer_comes_out_as_peer_gone():
    """The race behind "RuntimeError: unable to perform operation on <UnixTransport closed=True>": after the worker
    died, the first write fails in drain (ConnectionResetError) and closes the transport; uvloop then raises
    RuntimeError on every later write (an ack, a weights item). All of them must read as "the peer is gone"."""
    from streamrl.execution.bridge import Channel, PeerGone
    from streamrl.execution.process import loop_options

    async def main():
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        channel = Channel(reader, writer)
        theirs.close()  # the worker died
        for _ in range(3):
            with pytest.raises(PeerGone):
                await channel.send(("ack", "env.chunks", 0))
        with pytest.raises(PeerGone):
            channel.write(("cancel",))
        with pytest.raises(PeerGone):
            await channel.receive()
        channel.close()

    anyio.run(main, backend="asyncio", backend_options=loop_options())


def test_a_worker_that_cannot_import_the_pipeline_module_says_so(tmp_path):
    """The error is the worker's ImportError, not a guess about memory or a missing __main__ guard."""
    module = tmp_path / "only_in_main.py"
    module.write_text(textwrap.dedent("""
        import multiprocessing
        if multiprocessing.parent_process() is not None:
            from streamrl import NoSuchThing  # fails in a worker process only
        from streamrl.testing import CountFrames

        class Sink(CountFrames):
            pass
    """))
    from streamrl.loader import load_module

    mod = load_module(module, "only_in_main")
    p = Pipeline("import")
    collector(p, GymEnv("CartPole-v1", num_envs=2), step_timeout=None)
    p.add(mod.Sink("sink"), group="collect")
    p.connect("env.chunks", "sink.chunks")
    p.place("collect", "worker_process")
    with pytest.raises(StageFailed) as info:
        streamrl.run(p, tmp_path, handle_signals=False, preload=[("only_in_main", str(module))])
    message = str(info.value)
    assert message.startswith("stage 'group collect' failed: RemoteError: ")
    assert "ImportError: cannot import name 'NoSuchThing' from 'streamrl'" in message.splitlines()[0]
    assert f"failed to start while importing {module}" in message.splitlines()[0]
    assert "out-of-memory" not in message and "__main__" not in message


# -- 3. a second Ctrl-C ---------------------------------------------------------------------------------------
class Ticker(Stage):
    """A source that publishes a ``tick`` event every millisecond until the run stops."""

    outputs = ("items",)
    source = True

    async def run(self, ctx):
        while not ctx.stopping:
            await ctx.publish("tick", n=1)
            await ctx.output("items").send(1)
            await anyio.sleep(0.001)


class SlowLossyHook(Hook):
    events = ("tick",)
    mode = "lossy"

    def __init__(self):
        super().__init__()
        self.busy = threading.Event()

    async def on_event(self, event):
        self.busy.set()
        await anyio.sleep(10)


class SlowClose(Hook):
    events = ("tick",)

    def on_event(self, event):
        pass

    async def close(self, run):
        await anyio.sleep(10)


def test_a_second_ctrl_c_ends_the_run_within_two_seconds_despite_slow_hooks(tmp_path):
    """Slow lossy hook deliveries, a hook whose close sleeps 10 s, in the main process and in a worker process
    (which the main process then kills): the second SIGINT ends it all in under 2 s, with a summary and 130."""
    p = Pipeline("slow-hooks")
    collector(p, GymEnv("CartPole-v1", num_envs=2), step_timeout=None)
    p.add(CountFrames("sink"), Ticker("ticker"), streamrl.testing.Collect("collect_ticks", keep=False))
    p.connect("env.chunks", "sink.chunks")
    p.connect("ticker.items", "collect_ticks.items")
    slow = SlowLossyHook()
    p.add_hook(slow)
    p.add_hook(SlowClose())
    p.add_hook(SlowClose(), group="collect")
    p.place("collect", "worker_process")
    pids = []
    p.on("worker_started", lambda event: pids.append(event.data["pid"]))
    collecting = threading.Event()
    p.on("chunk", lambda event: collecting.set())  # from the worker process
    second = []

    def press_ctrl_c_twice():
        slow.busy.wait(60)
        collecting.wait(60)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the stop drained the stages; the lossy hook and the closes are what is left
        second.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c_twice, daemon=True)
    presser.start()
    result = streamrl.run(p, tmp_path)
    ended = time.perf_counter()
    presser.join()
    assert ended - second[0] < 2
    assert result.exit_reason == "interrupted" and result.exit_code == 130
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_reason"] == "interrupted" and summary["error"] is None
    assert summary["hooks"]["SlowLossyHook"]["dropped"] > 0  # what it had buffered was dropped, and counted
    assert not alive(pids[0])


# -- 4. workers import what the main process imports ----------------------------------------------------------
TINY = textwrap.dedent("""
    from dataclasses import dataclass
    from streamrl import MLP, EnvStage, GymEnv, Pipeline, PolicyStage, QValueActor
    from streamrl.testing import CountFrames

    @dataclass
    class Config:
        seed: int = 0
        device: str = "cpu"
        total_frames: int = 256
        num_envs: int = 2
        placement: str = "in_process"

    def build(cfg: Config) -> Pipeline:
        p = Pipeline("tiny", config=cfg)
        p.add(EnvStage("env", GymEnv("CartPole-v1", num_envs=cfg.num_envs), frames_per_chunk=64,
                       total_frames=cfg.total_frames),
              PolicyStage("policy", QValueActor(MLP(2, in_features=4, num_cells=(8,)))), group="collect")
        p.add(CountFrames("sink"))
        p.connect("env.policy", "policy.requests", capacity=0)
        p.connect("env.chunks", "sink.chunks")
        if cfg.placement == "worker_process":
            p.place("collect", "worker_process")
        return p
""")


def test_workers_import_streamrl_from_where_the_main_process_did_whatever_the_current_folder_holds(tmp_path):
    """Run from a folder holding an empty ``streamrl/`` (a namespace package that would shadow the installed one)
    and from one holding a bogus ``streamrl/__init__.py``: the worker process imports the real streamrl."""
    runs = []
    for shadow in ("empty", "bogus"):
        folder = tmp_path / shadow
        (folder / "streamrl").mkdir(parents=True)
        if shadow == "bogus":
            (folder / "streamrl" / "__init__.py").write_text("raise ImportError('the wrong streamrl')\n")
        (folder / "tiny.py").write_text(TINY)
        runs.append(subprocess.Popen([STREAMRL, "run", "tiny.py", "--out", "run", "--set", "placement=worker_process"],
                                     cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for shadow, proc in zip(("empty", "bogus"), runs, strict=True):
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, (shadow, stderr)
        summary = json.loads((tmp_path / shadow / "run" / "summary.json").read_text())
        assert summary["exit_reason"] == "completed" and summary["frames"] >= 256
        assert "env" in summary["stages"]["busy_fraction"]  # the worker ran the env stage and reported it


def test_step_timeout_must_be_positive():
    with pytest.raises(streamrl.ConfigError, match=r"step_timeout must be a number of seconds > 0"):
        EnvStage("env", GymEnv("CartPole-v1"), frames_per_chunk=8, step_timeout=0)
    with pytest.raises(streamrl.ConfigError, match=r"got True"):
        EnvStage("env", GymEnv("CartPole-v1"), frames_per_chunk=8, step_timeout=True)


def test_streamrl_run_exits_soon_after_a_second_ctrl_c_even_when_a_hook_blocks_the_event_loop(tmp_path):
    """A lossy hook whose synchronous code sleeps keeps the event loop from noticing signals at all; `streamrl run`
    still exits within 2 s of the second Ctrl-C (exit 130), and says why."""
    blocked = tmp_path / "blocked"
    (tmp_path / "blocking.py").write_text(textwrap.dedent(f"""
        import time
        from dataclasses import dataclass
        from streamrl import Hook, Pipeline
        from streamrl.testing import Collect, ListSource

        @dataclass
        class Config:
            seed: int = 0
            device: str = "cpu"
            total_frames: int = 1000
            num_envs: int = 1

        class Blocking(Hook):
            events = ("*",)
            mode = "lossy"

            def on_event(self, event):
                open({str(blocked)!r}, "w").close()
                time.sleep(30)  # blocks the event loop: no await

        def build(cfg: Config) -> Pipeline:
            p = Pipeline("blocking", config=cfg)
            p.add(ListSource("src", list(range(10**6)), delay=0.01), Collect("sink", keep=False))
            p.connect("src.items", "sink.items")
            p.add_hook(Blocking())
            return p
    """))
    proc = subprocess.Popen([STREAMRL, "run", "blocking.py", "--out", "run"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while not blocked.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert blocked.exists(), "the hook never ran"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        second = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        while proc.poll() is None and time.perf_counter() - second < 30:
            time.sleep(0.01)
        exited = time.perf_counter() - second
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert exited < 2, exited
    assert "blocks the event loop): exiting now" in err
