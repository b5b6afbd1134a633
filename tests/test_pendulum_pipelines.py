"""The Pendulum pipelines (DDPG, TD3, SAC) run end to end through the command line on tiny budgets."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ("total_frames=256", "frames_per_chunk=32", "min_fill=64", "batch_size=16", "hidden=32,32",
        "eval_every=128", "eval_episodes=1", "placement=in_process")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddpg_pendulum", "td3_pendulum", "sac_pendulum"])
def test_tiny_pendulum_run_through_the_cli(tmp_path, name):
    out = tmp_path / name
    overrides = [arg for setting in TINY for arg in ("--set", setting)]
    proc = subprocess.run([sys.executable, "-m", "streamrl.cli", "run", str(ROOT / "pipelines" / f"{name}.py"),
                           "--out", str(out), "--seed", "1", *overrides],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_reason"] == "completed" and summary["frames"] >= 256
    assert summary["optim_steps"] == summary["frames"]  # updates_per_frame=1: the rate limiter drains at the end
    assert summary["evals"] >= 1 and -2_000 < summary["eval_return_last"] <= 0  # Pendulum returns are negative
    assert summary["solved"] is False and summary["frames_to_solve"] is None
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["target_return"] == -200.0 and config["hidden"] == [32, 32]
    assert (out / "checkpoint.pt").exists()
