"""Faults at the command line: one owner per run directory, the resume flow, bad input, a full disk, Ctrl-C.

Each test injects the fault (a second run, kill -9, a bad value, a broken pipeline file, ENOSPC) and checks the
promise: exit 2 with the field or file named for bad input, exit 1 naming the file for a full disk, no stale lock,
no run overwritten silently, a run killed before its first checkpoint restarts instead of failing forever.
"""

import csv
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import streamrl
from streamrl import ConfigError, DiskFull, Pipeline, PipelineError, StageFailed, ZarrStorage
from streamrl.cli import main
from streamrl.rundir import RunDirLock

ROOT = Path(__file__).resolve().parents[1]
DQN = str(ROOT / "pipelines" / "dqn_cartpole.py")
TINY_DQN = ["--set", "frames_per_chunk=32", "--set", "min_fill=32", "--set", "batch_size=16", "--set", "hidden=8,8",
            "--set", "buffer_size=2000", "--set", "eval_every=1000000", "--set", "eval_episodes=1"]

CHATTER = '''
from dataclasses import dataclass

from streamrl import EventLog, Pipeline
from streamrl.stages.base import Stage
from streamrl.testing import Collect


@dataclass
class Config:
    total_frames: int = 3_000
    seed: int = 0
    device: str = "cpu"
    num_envs: int = 1


class Chatter(Stage):
    """A source that publishes a 200-byte event per item: events.jsonl grows ~300 bytes per item."""

    outputs = ("items",)
    source = True

    def __init__(self, name, n):
        super().__init__(name)
        self.n = n

    async def run(self, ctx):
        out = ctx.output("items")
        for i in range(self.n):
            if ctx.stopping:
                return
            await ctx.publish("tick", i=i, note="x" * 200)
            await out.send(i)


def build(cfg: Config) -> Pipeline:
    p = Pipeline("chatter", config=cfg)
    p.add(Chatter("src", cfg.total_frames), Collect("sink", keep=False))
    p.connect("src.items", "sink.items")
    p.add_hook(EventLog())
    return p
'''


def cli(*args: str) -> int:
    """``streamrl ARGS`` in this process; its exit code."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    return int(exit_.value.code)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# -- one owner per run directory -------------------------------------------------------------------------------
def test_a_killed_runs_lock_is_free_at_once_even_while_its_forked_child_lives(tmp_path):
    """flock belongs to the open file description, which a forked child shares: the child must drop its copy."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, sys, time
        from streamrl.rundir import RunDirLock
        RunDirLock(sys.argv[1]).acquire()
        child = os.fork()                      # like gymnasium's AsyncVectorEnv workers under the fork start method
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        time.sleep(60)
    """), str(tmp_path)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = int(holder.stdout.readline())
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid}\)"):
            RunDirLock(tmp_path).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        acquire_within(tmp_path, seconds=2)  # (the child drops its copy as soon as it runs after the fork)
        os.kill(child, 0)  # the forked child is still alive: the lock was freed without waiting for it to end
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def acquire_within(run_dir: Path, seconds: float) -> None:
    """Take and release the run directory's lock, retrying for up to ``seconds``."""
    deadline, lock = time.time() + seconds, RunDirLock(run_dir)
    while True:
        try:
            lock.acquire()
        except ConfigError:
            assert time.time() < deadline, f"the lock on {run_dir} was still held after {seconds} s"
            time.sleep(0.02)
        else:
            break
    lock.release()


def test_two_runs_at_once_then_kill_9_then_resume_before_any_checkpoint_starts_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    log = tmp_path / "first.log"
    with open(log, "w") as stderr:
        first = subprocess.Popen(
            [sys.executable, "-m", "streamrl.cli", "run", DQN, "--out", str(run_dir), *TINY_DQN,
             "--set", "total_frames=10_000_000", "--set", "checkpoint_every=10_000_000",
             "--set", "placement=worker_process"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        deadline = time.time() + 150
        events = run_dir / "events.jsonl"
        while not (events.exists() and "worker_started" in events.read_text()):
            assert first.poll() is None, log.read_text()
            assert time.time() < deadline, "the first run's worker did not start within 150 s"
            time.sleep(0.2)
        # a second run on the same directory, fresh or resuming, is refused and names the owner
        assert cli("run", DQN, "--out", run_dir) == 2
        assert f"in use by another run (pid {first.pid})" in capsys.readouterr().err
        assert cli("run", DQN, "--resume", run_dir) == 2
        assert f"in use by another run (pid {first.pid})" in capsys.readouterr().err
        os.kill(first.pid, signal.SIGKILL)  # the main process only: its worker process is left to notice
        first.wait(timeout=30)
        acquire_within(run_dir, seconds=5)  # the kernel's lock: free once the main process is gone, whatever
        # its worker process does
    finally:
        os.killpg(first.pid, signal.SIGKILL)
    assert not list(run_dir.glob("checkpoint*.pt"))  # killed before its first checkpoint
    old_events = events.read_text().splitlines()

    # --resume of a run without a checkpoint starts it over instead of failing forever
    assert cli("run", DQN, "--resume", run_dir, "--set", "total_frames=160", "--set", "placement=in_process") == 0
    err = capsys.readouterr().err
    assert f"no checkpoint yet in {run_dir}: starting the run over" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_reason"] == "completed" and summary["resumed_from"] is None
    store = ZarrStorage.open(run_dir / "replay.zarr", in_ram=False, writable=False)
    assert store.total_written == summary["frames"]  # the old store was removed, not appended to
    assert events.read_text().splitlines()[: len(old_events)] == old_events  # the event log goes on
    assert (run_dir / "metrics.csv").read_text().count("frames,") == 1
    record = json.loads((run_dir / "config.json").read_text())
    assert len(record["restarts"]) == 1 and record["config"]["total_frames"] == 160


def test_relative_out_resumes_twice_and_an_existing_run_is_never_overwritten_silently(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    in_process = [*TINY_DQN, "--set", "placement=in_process", "--set", "checkpoint_every=64"]
    assert cli("run", DQN, "--out", "runs/x", *in_process, "--set", "total_frames=128") == 0
    for total in (192, 256):
        assert cli("run", DQN, "--resume", "runs/x", "--set", f"total_frames={total}") == 0
        assert "resuming runs/x at frame" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "x"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["frames"] >= 256 and summary["resumed_from"] >= 192
    assert ZarrStorage.open(run_dir / "replay.zarr", in_ram=False, writable=False).total_written >= 256
    assert len(json.loads((run_dir / "config.json").read_text())["resumes"]) == 2

    record = (run_dir / "config.json").read_text()
    assert cli("run", DQN, "--out", "runs/x", *in_process) == 2  # a fresh run into an existing run directory
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume runs/x" in err and "--overwrite" in err
    assert (run_dir / "config.json").read_text() == record

    stray = run_dir / "replay.zarr" / "marker"
    stray.write_text("old store")
    assert cli("run", DQN, "--out", "runs/x", "--overwrite", *in_process, "--set", "total_frames=64") == 0
    assert "--overwrite: removed" in capsys.readouterr().err
    assert not stray.exists() and "resumes" not in json.loads((run_dir / "config.json").read_text())
    frames = json.loads((run_dir / "summary.json").read_text())["frames"]
    assert ZarrStorage.open(run_dir / "replay.zarr", in_ram=False, writable=False).total_written == frames < 256
    assert all(int(row["frames"]) <= frames for row in metrics_rows(run_dir))  # the old rows went with the run


def test_resume_refusals_and_a_run_directory_held_in_this_process(tmp_path, capsys):
    assert cli("run", DQN, "--resume", tmp_path / "nowhere") == 2
    assert "has no config.json" in capsys.readouterr().err
    assert cli("run", DQN, "--resume", tmp_path) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{not json")
    assert cli("run", DQN, "--resume", tmp_path) == 2
    assert "its config.json is damaged (JSONDecodeError" in capsys.readouterr().err
    assert cli("run", DQN, "--resume", tmp_path, "--out", tmp_path / "y") == 2
    assert "drop --out" in capsys.readouterr().err
    assert cli("run", DQN, "--resume", tmp_path, "--overwrite") == 2
    assert "drop --overwrite" in capsys.readouterr().err
    with RunDirLock(tmp_path / "held"):
        assert cli("run", DQN, "--out", tmp_path / "held") == 2
        assert f"(pid {os.getpid()})" in capsys.readouterr().err
    assert not (tmp_path / "held" / "config.json").exists()


# -- bad input: exit 2 with the field (or the file and line) and what is allowed --------------------------------
@pytest.mark.parametrize(("setting", "message"), [
    ("total_frames=0", "total_frames=0: expected a whole number >= 1"),
    ("total_frames=-5", "total_frames=-5: expected a whole number >= 1"),
    ("num_envs=0", "num_envs=0: expected a whole number >= 1"),
    ("lr=nan", "lr=nan: NaN is not a setting"),
    ("lr=0", "lr=0.0: a learning rate must be a finite number > 0"),
    ("lr=inf", "lr=inf: a learning rate must be a finite number > 0"),
    ("gamma=nan", "gamma=nan: NaN is not a setting"),
    ("device=gpu", "device='gpu' is not a device here; allowed: cpu, auto"),
    ("buffer_size=64", "buffer_size=64 is smaller than batch_size=128"),
    ("total_frames=lots", "expected an integer"),
])
def test_a_bad_config_value_exits_2_naming_the_field_the_value_and_what_is_allowed(tmp_path, capsys, setting,
                                                                                    message):
    assert cli("run", DQN, "--out", tmp_path / "run", "--set", setting) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before the run directory was touched


def test_cuda_without_cuda_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert cli("run", DQN, "--out", tmp_path / "run", "--device", "cuda") == 2
    assert "device='cuda' is not a device here (no CUDA here" in capsys.readouterr().err


CONFIG = '''
from dataclasses import dataclass
from streamrl import Pipeline

@dataclass
class Config:
    total_frames: int = 10
    seed: int = 0
    device: str = "cpu"
    num_envs: int = 1
'''


@pytest.mark.parametrize(("source", "message"), [
    ("x = (\n", r"bad\.py:1: importing the pipeline file raised SyntaxError: '\(' was never closed"),
    (CONFIG + "import json\njson.loads('{')\n", r"bad\.py:12: importing the pipeline file raised JSONDecodeError"),
    (CONFIG + "def helper():\n    raise RuntimeError('no env here')\n\ndef build(cfg: Config) -> Pipeline:\n"
              "    helper()\n", r"bad\.py:12: build\(cfg\) raised RuntimeError: no env here"),
    (CONFIG + "def build(cfg: Config) -> Pipeline:\n    Pipeline()\n",
     r"bad\.py:11: build\(cfg\) returned None, not a Pipeline; end it with `return pipeline`"),
    (CONFIG.replace("    seed: int = 0\n", "") + "def build(cfg: Config) -> Pipeline:\n    return Pipeline()\n",
     r"lacks the fields every pipeline config has: \['seed'\]"),
    (CONFIG.replace("    seed: int = 0\n", "    seed: int\n").replace("    total_frames: int = 10\n", "")
     + "    total_frames: int = 10\n\ndef build(cfg: Config) -> Pipeline:\n    return Pipeline()\n",
     r"fields \['seed'\] have no default: give them with --set seed=VALUE"),
])
def test_a_broken_pipeline_file_exits_2_naming_the_file_and_line(tmp_path, capsys, source, message):
    bad = write(tmp_path / "bad.py", source)
    assert cli("run", bad, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "config.json").exists()


def test_debug_shows_the_traceback_and_a_gamma_out_of_range_names_the_pipeline_line(tmp_path, capsys):
    assert cli("run", DQN, "--out", tmp_path / "run", "--set", "gamma=1.5", "--debug") == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError: DQNLoss: gamma must be in [0, 1], got 1.5" in err
    assert "dqn_cartpole.py:" in err and "build(cfg) raised ConfigError" in err


def test_ctrl_c_during_start_up_exits_130_with_one_line(tmp_path, capsys):
    slow = write(tmp_path / "slow.py", "raise KeyboardInterrupt  # as if Ctrl-C came while the file imports\n")
    assert cli("run", slow) == 130
    err = capsys.readouterr().err
    assert err.strip() == "streamrl: interrupted (Ctrl-C)"


def test_constructors_raise_config_error_a_value_error_for_bad_arguments():
    from streamrl import (
        EGreedyModule,
        EnvStage,
        GymEnv,
        HardUpdate,
        PrioritizedSampler,
        RamStorage,
        SoftUpdate,
        open_stream,
    )
    from streamrl.replay.multistep import MultiStep

    assert issubclass(ConfigError, ValueError)
    env = GymEnv("CartPole-v1", num_envs=2, backend="sync")
    bad = [lambda: RamStorage(0), lambda: ZarrStorage(0), lambda: GymEnv("CartPole-v1", num_envs=0),
           lambda: EnvStage("env", env, frames_per_chunk=8, total_frames=0),
           lambda: EnvStage("env", env, frames_per_chunk=0), lambda: EGreedyModule(2, eps_init=2.0),
           lambda: SoftUpdate(None, tau=0.0), lambda: HardUpdate(None, every=0), lambda: MultiStep(0.99, n=0),
           lambda: PrioritizedSampler(alpha=-1.0), lambda: open_stream(-1), lambda: infinite_lr_learner()]
    for make in bad:
        with pytest.raises(ConfigError):
            make()
    env.close()


def infinite_lr_learner():
    import torch

    from streamrl import LearnerStage

    net = torch.nn.Linear(2, 1)
    return LearnerStage("learner", net, torch.optim.SGD(net.parameters(), lr=float("inf")))


def test_a_cycle_that_nothing_starts_fails_validation_naming_its_stages():
    from streamrl.testing import Collect, ListSource

    class Relay(Collect):
        outputs = ("items",)

    dead = Pipeline("dead").add(Relay("a"), Relay("b"))
    dead.connect("a.items", "b.items").connect("b.items", "a.items")
    with pytest.raises(PipelineError, match=r"stages a -> b -> a form a cycle that nothing starts.*must be a source"):
        dead.validate()  # what streamrl.run calls first; before, such a run waited forever
    fed = Pipeline("fed").add(Relay("a"), Relay("b"), ListSource("src", [1]))
    fed.connect("a.items", "b.items").connect("b.items", "a.items").connect("src.items", "a.items")
    fed.validate()  # a source feeds the cycle: legal


# -- a full disk in the run directory --------------------------------------------------------------------------
class FillingDisk:
    """A replacement for ``open`` in one module: what it opens for writing holds ``room`` bytes in all, then ENOSPC."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __call__(self, file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        return f if mode in ("r", "rb") else _FullFile(f, self)


class _FullFile:
    def __init__(self, f, disk: FillingDisk) -> None:
        self._f, self._disk = f, disk

    def write(self, data):
        if len(data) > self._disk.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._disk.room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def tmp_litter(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def counting_pipeline():
    import torch
    from tensordict.nn import TensorDictModule

    from streamrl import EnvStage, GymEnv, MetricsCSV, PolicyStage
    from streamrl.testing import CountFrames

    policy = TensorDictModule(lambda obs: torch.zeros(obs.shape[:-1], dtype=torch.int64), ["observation"], ["action"])
    p = Pipeline("counting")
    p.add(EnvStage("env", GymEnv("CartPole-v1", num_envs=2, backend="sync"), frames_per_chunk=8, total_frames=400),
          PolicyStage("policy", policy), CountFrames("sink"))
    p.connect("env.policy", "policy.requests", capacity=0)
    p.connect("env.chunks", "sink.chunks")
    p.add_hook(MetricsCSV(every_frames=16))
    return p


def test_disk_full_writing_metrics_fails_the_run_naming_the_file_and_the_summary_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr("streamrl.hooks.logging.open", FillingDisk(room=400), raising=False)
    with pytest.raises(StageFailed) as failed:
        streamrl.run(counting_pipeline(), tmp_path, handle_signals=False)
    assert isinstance(failed.value.error, DiskFull) and failed.value.error.path == tmp_path / "metrics.csv"
    assert f"disk full writing {tmp_path / 'metrics.csv'}: free space and resume with --resume {tmp_path}" in str(
        failed.value)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_reason"] == "failed" and "disk full writing" in summary["error"]
    assert tmp_litter(tmp_path) == []


def test_no_room_for_the_summary_either_is_said_on_stderr_and_leaves_no_tmp(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("streamrl.hooks.logging.open", FillingDisk(room=400), raising=False)
    monkeypatch.setattr("streamrl.summary.open", FillingDisk(room=0), raising=False)
    with pytest.raises(StageFailed, match="disk full writing .*metrics.csv"):  # the first error is the one reported
        streamrl.run(counting_pipeline(), tmp_path, handle_signals=False)
    assert f"could not write summary.json: disk full writing {tmp_path / 'summary.json'}" in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists() and tmp_litter(tmp_path) == []


def test_disk_full_writing_config_json_exits_1_and_leaves_no_tmp(tmp_path, monkeypatch, capsys):
    chatter = write(tmp_path / "chatter.py", CHATTER)
    monkeypatch.setattr("streamrl.summary.open", FillingDisk(room=0), raising=False)
    assert cli("run", chatter, "--out", tmp_path / "run") == 1
    assert f"disk full writing {tmp_path / 'run' / 'config.json'}: free space and run again" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.json").exists() and tmp_litter(tmp_path / "run") == []


@pytest.fixture
def tiny_disk(tmpfs):
    """A 1 MiB tmpfs, filled up to its last 64 KiB by ``disk/filler``."""
    disk = tmpfs("1m")
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.truncate(disk / "filler", max(0, (disk / "filler").stat().st_size - 64 * 1024))
    return disk


def test_a_real_full_disk_stops_the_run_with_one_error_and_the_run_resumes_after_space_is_freed(tmp_path, tiny_disk,
                                                                                                capsys):
    chatter = write(tmp_path / "chatter.py", CHATTER)
    run_dir = tiny_disk / "run"
    assert cli("run", chatter, "--out", run_dir) == 1
    err = capsys.readouterr().err
    assert f"disk full writing {run_dir / 'events.jsonl'}: free space and resume with --resume {run_dir}" in err
    assert tmp_litter(run_dir) == []
    if (run_dir / "summary.json").exists():
        assert "disk full writing" in json.loads((run_dir / "summary.json").read_text())["error"]
    else:
        assert "could not write summary.json" in err

    (tiny_disk / "filler").unlink()  # free space, then resume: no checkpoint in this pipeline, so it starts over
    assert cli("run", chatter, "--resume", run_dir, "--set", "total_frames=50") == 0
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line whole: the torn one the full disk left was dropped
    assert events[-1]["event"] == "run_end"


def test_python_m_from_a_folder_holding_a_streamrl_folder_says_what_hides_the_package(tmp_path):
    """`python -m streamrl.cli` puts the current folder first on sys.path: with an editable install a `streamrl/`
    folder there hides the package (the `streamrl` command is not affected: tests/test_faults_liveness.py)."""
    (tmp_path / "streamrl").mkdir()
    proc = subprocess.run([sys.executable, "-m", "streamrl.cli", "run", DQN, "--help-config"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:  # a regular (non-editable) install wins over a bare folder: nothing is hidden
        assert "fields" in proc.stdout
        return
    assert proc.returncode == 2, proc.stderr
    assert f"the folder {tmp_path / 'streamrl'} hides the streamrl package" in proc.stderr
    assert "Traceback" not in proc.stderr
