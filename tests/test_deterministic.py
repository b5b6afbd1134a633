"""Deterministic mode (DESIGN invariant 9, issue 14): the same graph in a fixed schedule with fixed seeds, so two
runs of a pipeline write the same metrics.csv (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

import streamrl
from streamrl.config import apply_overrides
from streamrl.errors import PipelineError
from streamrl.loader import load_module

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {
    "dqn_cartpole": ["total_frames=3000", "eval_every=1000", "min_fill=200", "checkpoint_every=1000"],
    "ppo_cartpole": ["total_frames=4096", "eval_every=2048", "checkpoint_every=2048"],
}


def run_twice(tmp_path: Path, name: str, extra: list[str] | None = None) -> tuple[str, str]:
    module = load_module(ROOT / "pipelines" / f"{name}.py")
    texts = []
    for i in range(2):
        pipeline = module.build(apply_overrides(module.Config(), BUDGETS[name] + (extra or [])))
        streamrl.run(pipeline, tmp_path / str(i), seed=3, device="cpu", handle_signals=False, deterministic=True)
        texts.append((tmp_path / str(i) / "metrics.csv").read_text())
    return texts[0], texts[1]


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_two_deterministic_runs_write_the_same_metrics(tmp_path, name):
    first, second = run_twice(tmp_path, name)
    rows = first.splitlines()
    assert len(rows) >= 4 and rows[0].startswith("frames,wall_s")
    assert any(row.split(",")[-1] for row in rows[1:])  # an evaluation ran
    assert first == second


def test_without_it_the_schedule_depends_on_timing_and_the_collector_runs_in_its_own_process(tmp_path):
    module = load_module(ROOT / "pipelines" / "dqn_cartpole.py")
    pipeline = module.build(apply_overrides(module.Config(), BUDGETS["dqn_cartpole"]))
    assert pipeline.worker_groups() == ["collect"]  # deterministic mode moves it into the main process
    streamrl.execution.main.one_schedule(pipeline)
    assert pipeline.worker_groups() == []


def test_replicas_are_refused_in_deterministic_mode(tmp_path):
    module = load_module(ROOT / "pipelines" / "dqn_cartpole.py")
    pipeline = module.build(apply_overrides(module.Config(), BUDGETS["dqn_cartpole"] + ["replicas=2"]))
    with pytest.raises(PipelineError, match="deterministic mode runs one process; group 'collect' has 2 replicas"):
        streamrl.run(pipeline, tmp_path, deterministic=True, handle_signals=False)


def test_streamrl_run_deterministic_twice_from_the_command_line(tmp_path):
    import subprocess
    import sys

    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        done = subprocess.run([sys.executable, "-m", "streamrl.cli", "run", str(ROOT / "pipelines" / "ppo_cartpole.py"),
                               "--deterministic", "--out", str(out), *(f"--set={s}" for s in BUDGETS["ppo_cartpole"])],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert (outs[0] / "metrics.csv").read_text() == (outs[1] / "metrics.csv").read_text()
