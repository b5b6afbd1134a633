"""Resume: a run killed with SIGKILL continues from its checkpoint with the same budget, metrics and learner."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streamrl import ZarrStorage
from streamrl.config import config_from_record
from streamrl.errors import ConfigError
from streamrl.loader import load_module
from streamrl.plots import _resumes, plot_run
from streamrl.replay.store_tools import check_store
from streamrl.resume import load_checkpoint, restore

ROOT = Path(__file__).resolve().parents[1]
DQN = str(ROOT / "pipelines" / "dqn_cartpole.py")
TOTAL = 24_000
SETTINGS = ["--set", f"total_frames={TOTAL}", "--set", "checkpoint_every=3000", "--set", "eval_every=3000",
            "--set", "eval_episodes=3", "--set", "min_fill=500", "--set", "hidden=32,32",
            "--set", "target_return=100000", "--set", "buffer_size=20000"]


def metrics_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_killed_run_resumes_with_its_budget_metrics_learner_and_store(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "streamrl.cli", "run", DQN]
    proc = subprocess.Popen([*cmd, "--out", str(run_dir), *SETTINGS], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # kill once two checkpoints were taken and the run moved past them
            if (run_dir / "checkpoint.pt").exists() and any(
                    int(r["frames"]) >= 9_000 for r in metrics_rows(run_dir)):
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        else:
            pytest.fail("the run did not reach 9,000 frames within 180 s")
        os.killpg(proc.pid, signal.SIGKILL)  # the main process and its worker: no close, no final checkpoint
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (run_dir / "summary.json").exists()  # it really died without finishing
    checkpoint = load_checkpoint(run_dir)
    at = checkpoint["frames"]
    steps_at = checkpoint["stages"]["learner"]["steps"]
    before = metrics_rows(run_dir)
    committed = ZarrStorage.open(run_dir / "replay.zarr", in_ram=False, writable=False).total_written
    assert at >= 3_000 and committed > 0

    resumed = subprocess.run([*cmd, "--resume", str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run_dir} at frame {at}" in resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == at
    assert TOTAL <= summary["frames"] < TOTAL + 64  # the whole run's budget, honoured once
    assert summary["optim_steps"] > steps_at  # the learner counted on from the checkpoint
    rows = metrics_rows(run_dir)  # one header, the old rows kept, the new rows continuing the frame count
    assert rows[: len(before)] == before
    new = rows[len(before):]
    assert new and all(int(r["frames"]) > at for r in new)
    assert float(new[0]["wall_s"]) > checkpoint["wall_s"]  # the run's clock goes on too
    assert max(int(r["frames"]) for r in new) >= TOTAL - 3_000
    assert (run_dir / "metrics.csv").read_text().count("frames,") == 1
    evals = [float(r["eval_return"]) for r in new if r["eval_return"]]
    assert evals, "no evaluation after the resume"
    store = ZarrStorage.open(run_dir / "replay.zarr", in_ram=False, writable=False)
    assert store.total_written >= committed + (TOTAL - at) - 64  # kept the old rows, appended the new ones
    traj = store.get(store.slots_in_order())["traj_id"]
    assert (traj >= 2**40).any() and (traj < 2**40).any()  # the resumed segment's episodes get ids of their own
    assert [p for p in check_store(run_dir / "replay.zarr") if not p.warning] == []
    record = json.loads((run_dir / "config.json").read_text())
    assert record["resumes"][0]["frames"] == at
    assert _resumes(run_dir) == [at] and plot_run(run_dir).stat().st_size > 10_000  # the curve marks the resume


def test_restore_loads_the_learner_limiter_and_store_and_epsilon_follows_frames(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "streamrl.cli", "run", DQN, "--out", str(run_dir), *SETTINGS,
                           "--set", "total_frames=4000"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    checkpoint = load_checkpoint(run_dir)
    module = load_module(Path(DQN))
    cfg = config_from_record(module.Config, json.loads((run_dir / "config.json").read_text())["config"])
    pipeline = module.build(cfg)
    restore(pipeline, checkpoint)
    learner = pipeline.stages["learner"]
    saved = checkpoint["stages"]["learner"]
    assert learner.steps == saved["steps"] and learner.version == saved["version"]
    for name, value in learner.loss.state_dict().items():
        assert torch.equal(value, saved["loss"][name]), name
    writer = pipeline.stages["writer"]
    writer.buffer.attach(run_dir)  # the store's path is relative to the run dir: the writer loads it when it runs
    assert writer.buffer.limiter.inserts == saved_inserts(checkpoint)
    assert len(writer.buffer.storage) == min(checkpoint["frames"], cfg.buffer_size)
    assert pipeline.stages["collect_env"].frames == checkpoint["frames"]
    assert pipeline.stages["collect_policy"].version == saved["version"]  # acts with the restored weights' version
    with pytest.raises(ConfigError, match="no checkpoint.pt"):
        load_checkpoint(tmp_path)


def saved_inserts(checkpoint):
    return checkpoint["stages"]["writer"]["buffer"]["limiter"]["inserts"]


def test_an_env_stage_checkpoints_its_normaliser_statistics():
    from streamrl import EnvStage, GymEnv
    from streamrl.transforms import ObservationNorm, TransformedEnv

    def stage():
        env = TransformedEnv(GymEnv("CartPole-v1", backend="sync", seed=0), ObservationNorm(in_keys=["observation"]))
        return EnvStage("env", env, frames_per_chunk=8)

    measured = stage()
    measured.env.transform[0].init_stats(64, reduce_dim=(0, 1), cat_dim=0)
    measured.frames = 1234
    fresh = stage()
    fresh.load_state_dict(measured.state_dict())
    assert fresh.frames == 1234
    assert torch.equal(fresh.env.transform[0].loc, measured.env.transform[0].loc)
    assert torch.equal(fresh.env.transform[0].scale, measured.env.transform[0].scale)
    assert not torch.equal(fresh.env.transform[0].scale, torch.ones_like(fresh.env.transform[0].scale))
