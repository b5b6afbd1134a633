"""The command line, end to end: a tiny DQN run, Ctrl-C, config overrides and errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from streamrl import ZarrStorage
from streamrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
DQN = str(ROOT / "pipelines" / "dqn_cartpole.py")
SUMMARY_KEYS = {"frames", "wall_s", "frames_per_s", "eval_return_last", "eval_return_best", "solved",
                "frames_to_solve", "wall_s_to_solve", "policy_lag", "streams", "stages"}


def streamrl(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "streamrl.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, **kwargs)


def test_tiny_dqn_run_through_the_cli(tmp_path):
    out = tmp_path / "run"
    proc = streamrl("run", DQN, "--out", str(out), "--seed", "3", "--set", "total_frames=3_000",
                    "--set", "eval_every=1500", "--set", "eval_episodes=2", "--set", "min_fill=500",
                    "--set", "hidden=32,32")
    assert proc.returncode == 0, proc.stderr
    for name in ("config.json", "metrics.csv", "events.jsonl", "checkpoint.pt", "summary.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["frames"] >= 3_000 and summary["exit_reason"] == "completed"
    assert summary["optim_steps"] > 0 and summary["evals"] >= 1
    assert summary["stages"]["bottleneck"] in summary["stages"]["busy_fraction"]
    assert {"collect_env", "collect_policy", "writer", "sampler", "learner"} <= set(summary["stages"]["busy_fraction"])
    assert "writer.chunks" in summary["streams"]
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["seed"] == 3 and config["config"]["hidden"] == [32, 32]
    store = ZarrStorage.open(out / "replay.zarr")
    assert len(store) == summary["frames"]
    plot = streamrl("plot", str(out))
    assert plot.returncode == 0 and (out / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize(("signum", "code", "reason"), [(signal.SIGINT, 130, "interrupted"),
                                                        (signal.SIGTERM, 143, "terminated")])
def test_a_signal_stops_the_run_and_leaves_summary_metrics_and_a_store_that_reopens(tmp_path, signum, code, reason):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamrl.cli", "run", DQN, "--out", str(out), "--set", "total_frames=10_000_000",
         "--set", "eval_every=2000", "--set", "eval_episodes=2", "--set", "min_fill=500", "--set", "hidden=32,32",
         "--set", "buffer_size=50_000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        metrics = out / "metrics.csv"
        while time.time() < deadline:  # wait until data flows: a metrics row and a committed store block
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run produced no metrics rows within 120 s")
        os.killpg(proc.pid, signum)  # like Ctrl-C in a terminal: the main process and its workers get it
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_reason"] == reason and summary["frames"] > 0
    rows = metrics.read_text().splitlines()
    assert rows[0].startswith("frames,") and len(rows) >= 3
    store = ZarrStorage.open(out / "replay.zarr")
    assert len(store) > 0
    group = zarr.open_group(str(out / "replay.zarr"), mode="r")  # plain zarr reads it too
    size = group.attrs["committed"]["size"]
    assert group["next/reward"][:size].shape == (size, 1)
    assert (out / "checkpoint.pt").exists()


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``streamrl ARGS`` in this process (the same parsing and exit codes, without a process start-up)."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_overrides_and_errors(tmp_path, capsys):
    bad = streamrl("run", DQN, "--set", "total_frames=lots", "--out", str(tmp_path / "x"))  # where a user meets it
    assert bad.returncode == 2 and "expected an integer" in bad.stderr
    code, out, _ = cli(capsys, "run", DQN, "--help-config")
    assert code == 0 and "total_frames = 100000" in out and "Stop after this many env frames" in out
    code, _, err = cli(capsys, "run", DQN, "--set", "no_such_field=1", "--out", str(tmp_path / "x"))
    assert code == 2 and "has no field 'no_such_field'" in err
    code, _, err = cli(capsys, "run", str(tmp_path / "nope.py"))
    assert code == 2 and "does not exist" in err
    code, out, _ = cli(capsys, "graph", DQN)
    assert code == 0 and "env.chunks --[1]--> writer.chunks" in out


def test_tiny_pixel_dqn_run_through_the_cli(tmp_path):
    out = tmp_path / "pixels"
    proc = streamrl("run", str(ROOT / "pipelines" / "dqn_cartpole_pixels.py"), "--out", str(out),
                    "--set", "total_frames=256", "--set", "num_envs=2", "--set", "frames_per_chunk=32",
                    "--set", "min_fill=64", "--set", "batch_size=8", "--set", "init_stats_steps=8",
                    "--set", "image_size=48", "--set", "eval_every=128", "--set", "eval_episodes=1",
                    "--set", "buffer_size=512")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] >= 256 and summary["optim_steps"] > 0 and summary["evals"] >= 1
    assert {"collect_env", "nstep", "writer", "learner"} <= set(summary["stages"]["busy_fraction"])
