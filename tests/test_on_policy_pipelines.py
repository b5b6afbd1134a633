"""The on-policy pipelines through the CLI, with tiny budgets: they run, learn something, and report lag."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "ppo_cartpole": ["total_frames=3072", "frames_per_chunk=512", "eval_every=1536", "eval_episodes=2",
                     "max_policy_lag=0"],
    "a2c_cartpole": ["total_frames=1536", "eval_every=768", "eval_episodes=2"],
    "ppo_inverted_double_pendulum": ["total_frames=1500", "frames_per_chunk=500", "init_stats_steps=50",
                                     "eval_every=750", "eval_episodes=1", "num_cells=32", "epochs=2"],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_an_on_policy_pipeline_runs_through_the_cli(tmp_path, name):
    out = tmp_path / name
    settings = [arg for item in RUNS[name] for arg in ("--set", item)]
    done = subprocess.run([sys.executable, "-m", "streamrl.cli", "run", str(ROOT / "pipelines" / f"{name}.py"),
                           "--out", str(out), *settings], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    budget = int(next(s for s in RUNS[name] if s.startswith("total_frames=")).split("=")[1])
    assert summary["frames"] >= budget and summary["evals"] >= 1 and summary["optim_steps"] > 0
    assert {"collect_env", "collect_policy", "gae", "learner"} <= set(summary["stages"]["busy_fraction"])
    assert summary["policy_version"] >= 2  # one publication per chunk trained on
    if name == "ppo_cartpole":  # strictly on-policy: the learner never trained on rows of older weights
        assert summary["batch_policy_age"]["max"] == 0
