"""The Logger hook and its sinks (CSV, TensorBoard, W&B), and ``plot_runs`` over several run directories."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tensordict.nn import TensorDictModule, TensorDictSequential

import streamrl.execution.main as runtime
from streamrl import CSVSink, EventLog, Logger, Pipeline, Sink, TensorBoardSink, WandbSink
from streamrl.cli import _load
from streamrl.config import apply_overrides
from streamrl.envs import GymEnv
from streamrl.errors import ConfigError
from streamrl.events import Event, EventBus
from streamrl.execution.context import RunContext
from streamrl.hooks.schedules import EpsilonAnnealing
from streamrl.modules.exploration import AdditiveGaussianModule, EGreedyModule
from streamrl.plots import plot_runs, read_scalars
from streamrl.stages.env import EnvStage
from streamrl.stages.policy import PolicyStage
from streamrl.summary import RunRecorder
from streamrl.testing import CountFrames

ROOT = Path(__file__).resolve().parents[1]
DQN_TINY = ["total_frames=256", "min_fill=64", "batch_size=16", "hidden=16", "buffer_size=512", "eval_every=128",
            "eval_episodes=1", "device=cpu", "placement=in_process"]
PPO_TINY = ["total_frames=256", "frames_per_chunk=128", "num_envs=2", "epochs=1", "minibatch_size=64", "hidden=16",
            "entropy_coef=0.01",
            "eval_every=100000", "eval_episodes=1"]


def run_pipeline(name: str, overrides: list[str], run_dir: Path, *hooks: Any, seed: int = 0) -> dict[str, Any]:
    build, config_cls, _module, _path = _load(str(ROOT / "pipelines" / f"{name}.py"))
    cfg = apply_overrides(config_cls(), [*overrides, f"seed={seed}"])
    pipeline = build(cfg)
    for group in pipeline.groups:  # everything in this process: cheap
        if group != "main":
            pipeline.place(group, "in_process")
    pipeline.add_hook(*hooks)
    result = runtime.run(pipeline, run_dir, seed=seed, device="cpu", handle_signals=False)
    assert result.exit_reason == "completed"
    return result.summary


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of TensorBoard's event files, read with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def dqn_runs(tmp_path_factory) -> list[Path]:
    """Two seeds of a tiny DQN CartPole, each with Logger(CSVSink(), TensorBoardSink())."""
    pytest.importorskip("tensorboard")
    dirs = []
    for seed in (0, 1):
        run_dir = tmp_path_factory.mktemp(f"dqn_seed{seed}")
        run_pipeline("dqn_cartpole", DQN_TINY, run_dir, Logger(CSVSink(), TensorBoardSink()), seed=seed)
        dirs.append(run_dir)
    return dirs


# -- a real run: the CSV and TensorBoard hold the same named scalars --------------------------------------------


def test_a_dqn_run_logs_named_scalars_to_csv_and_the_same_to_tensorboard(dqn_runs):
    run_dir = dqn_runs[0]
    rows = csv_rows(run_dir / "scalars.csv")
    assert list(rows[0]) == ["frames", "wall_s", "name", "value"]  # long format
    names = {row["name"] for row in rows}
    assert {"train/loss", "train/grad_norm", "train/lr", "train/q_value", "train/target_value", "train/step",
            "collect/episode_return", "collect/episode_length", "collect/frames_per_s", "collect/policy_lag",
            "collect/episodes", "eval/return", "eval/return_min", "eval/return_max", "explore/epsilon"} <= names
    epsilon = [float(row["value"]) for row in rows if row["name"] == "explore/epsilon"]
    assert epsilon[0] == 1.0 and epsilon[-1] < 1.0 and epsilon == sorted(epsilon, reverse=True)  # annealed
    assert not {"train/updates", "train/version", "collect/frames"} & names  # counters are not means
    frames = [int(row["frames"]) for row in rows]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert frames == sorted(frames) and frames[-1] == summary["frames"]  # x-axis: the run's env frames
    assert all(float(row["value"]) >= 1 for row in rows if row["name"] == "collect/episode_return")

    tb = tensorboard_scalars(run_dir / "tensorboard")
    assert set(tb) == names
    loss_csv = [(int(r["frames"]), pytest.approx(float(r["value"]), rel=1e-6)) for r in rows
                if r["name"] == "train/loss"]
    assert tb["train/loss"] == loss_csv  # step = env frames, the same points


def test_a_ppo_run_logs_its_diagnostics_averaged_every_frames(tmp_path):
    pytest.importorskip("tensorboard")
    run_pipeline("ppo_cartpole", PPO_TINY, tmp_path, Logger(CSVSink(), every_frames=128))
    rows = csv_rows(tmp_path / "scalars.csv")
    names = {row["name"] for row in rows}
    assert {"train/loss", "train/loss_objective", "train/loss_critic", "train/entropy", "train/kl_approx",
            "train/clip_fraction", "train/grad_norm", "train/lr", "collect/frames_per_s"} <= names
    loss_frames = [int(row["frames"]) for row in rows if row["name"] == "train/loss"]
    assert loss_frames == sorted(set(loss_frames)) and len(loss_frames) <= 256 // 128 + 1  # one point per window


# -- the Logger's scalars, event by event --------------------------------------------------------------------------


class ListSink(Sink):
    def __init__(self) -> None:
        self.points: list[tuple[int, dict[str, float]]] = []
        self.closed = False

    def write(self, frames: int, wall_s: float, scalars: dict[str, float]) -> None:
        self.points.append((frames, scalars))

    def close(self) -> None:
        self.closed = True


def run_context(tmp_path: Path) -> RunContext:
    return RunContext(tmp_path, bus=EventBus(), device=torch.device("cpu"), seed=0, pipeline=Pipeline("t"),
                      recorder=RunRecorder())


async def test_the_logger_names_every_scalar_and_measures_lag_against_the_latest_weights(tmp_path):
    sink = ListSink()
    logger = Logger(sink)
    run = run_context(tmp_path)
    await logger.start(run)
    logger.on_event(Event("weights", "learner", 0.5, {"version": 3, "step": 3}))
    logger.on_event(Event("chunk", "env", 1.0, {"frames": 64, "chunk_frames": 64, "policy_version": 1,
                                                "episode_returns": [10.0, 20.0], "episode_lengths": [10, 20],
                                                "epsilon": 0.5}))
    logger.on_event(Event("optim_step", "learner", 1.5, {"step": 50, "version": 3, "updates": 50, "loss": 0.25,
                                                         "loss_value": 0.25, "q_value": 1.5, "lr": 1e-3,
                                                         "grad_norm": 2.0, "age_mean": 4.0, "captured": True}))
    logger.on_event(Event("eval", "Evaluate", 2.0, {"mean_return": 30.0, "min_return": 20.0, "max_return": 40.0,
                                                    "std_return": 10.0, "episodes": 2, "frames": 64,
                                                    "solved": False}))
    await logger.close(run)
    (f1, collect), (f2, train), (f3, evals) = sink.points
    assert (f1, f2, f3) == (64, 64, 64)
    assert collect.pop("collect/frames_per_s") == pytest.approx(64 / 1.0, rel=0.05)  # 64 frames in ~1 s
    assert collect == {"collect/episode_return": 15.0, "collect/episode_length": 15.0, "collect/policy_lag": 2.0,
                       "collect/epsilon": 0.5, "collect/episodes": 2.0}
    assert train == {"train/loss": 0.25, "train/loss_value": 0.25, "train/q_value": 1.5, "train/lr": 1e-3,
                     "train/grad_norm": 2.0, "train/age_mean": 4.0, "train/step": 50.0}
    assert evals == {"eval/return": 30.0, "eval/return_min": 20.0, "eval/return_max": 40.0, "eval/return_std": 10.0}
    assert sink.closed


async def test_every_frames_averages_train_scalars_weighted_by_updates(tmp_path):
    sink = ListSink()
    logger = Logger(sink, every_frames=100)
    run = run_context(tmp_path)
    await logger.start(run)
    logger.on_event(Event("optim_step", "learner", 0.1, {"step": 10, "updates": 10, "loss": 1.0}))
    logger.on_event(Event("chunk", "env", 0.2, {"frames": 50, "chunk_frames": 50, "policy_version": 0}))
    logger.on_event(Event("optim_step", "learner", 0.3, {"step": 40, "updates": 30, "loss": 3.0}))
    assert sink.points == []  # 50 frames: not yet
    logger.on_event(Event("chunk", "env", 0.4, {"frames": 100, "chunk_frames": 50, "policy_version": 0}))
    ((frames, scalars),) = sink.points
    assert frames == 100 and scalars["train/loss"] == pytest.approx((1.0 * 10 + 3.0 * 30) / 40)
    assert scalars["train/step"] == 40 and scalars["collect/frames_per_s"] > 0
    logger.on_event(Event("optim_step", "learner", 0.5, {"step": 50, "updates": 10, "loss": 5.0}))
    await logger.close(run)  # the last partial window
    assert sink.points[-1][1]["train/loss"] == 5.0


# -- exploration and pipeline telemetry -----------------------------------------------------------------------------


def zero_actions(observation: torch.Tensor) -> torch.Tensor:
    return torch.zeros(observation.shape[:-1], dtype=torch.int64)


def test_the_policy_stage_publishes_its_epsilon_at_each_chunk_start_and_the_logger_writes_it(tmp_path):
    explore = EGreedyModule(2, eps_init=1.0, eps_end=0.0, annealing_frames=64)
    policy = TensorDictSequential(TensorDictModule(zero_actions, ["observation"], ["action"]), explore)
    p = Pipeline("explore")
    p.add(EnvStage("env", GymEnv("CartPole-v1", num_envs=2), frames_per_chunk=32, total_frames=128),
          PolicyStage("policy", policy), CountFrames("sink"))
    p.connect("env.policy", "policy.requests", capacity=0)
    p.connect("env.chunks", "sink.chunks", capacity=2)
    sink = ListSink()
    p.add_hook(EpsilonAnnealing(explore), Logger(sink))
    runtime.run(p, tmp_path, seed=0, device="cpu", handle_signals=False)
    points = [(frames, scalars["explore/epsilon"]) for frames, scalars in sink.points if "explore/epsilon" in scalars]
    chunk_ends = [frames for frames, scalars in sink.points if "collect/frames_per_s" in scalars]
    # one point per chunk: the epsilon it was collected with, at the frames where it started
    assert [frames for frames, _ in points] == [0, *chunk_ends[:-1]] and len(points) >= 4
    assert [eps for _, eps in points] == [pytest.approx(max(0.0, 1 - frames / 64)) for frames, _ in points]
    assert points[0][1] == 1.0 > points[1][1] > 0.0 == points[-1][1]


def test_the_action_noise_scale_is_a_scalar_and_a_policy_without_one_publishes_nothing(tmp_path):
    from streamrl.envs.specs import Bounded

    noise = AdditiveGaussianModule(Bounded(-1.0, 1.0, shape=(1,)), sigma_init=0.5, sigma_end=0.1)
    assert noise.scalars() == {"sigma": 0.5} and EGreedyModule(3, eps_init=0.25).scalars() == {"epsilon": 0.25}
    policy = TensorDictModule(zero_actions, ["observation"], ["action"])  # no module reports scalars
    p = Pipeline("plain")
    p.add(EnvStage("env", GymEnv("CartPole-v1", num_envs=2), frames_per_chunk=32, total_frames=64),
          PolicyStage("policy", policy), CountFrames("sink"))
    p.connect("env.policy", "policy.requests", capacity=0)
    p.connect("env.chunks", "sink.chunks", capacity=2)
    sink = ListSink()
    p.add_hook(Logger(sink))
    runtime.run(p, tmp_path, seed=0, device="cpu", handle_signals=False)
    assert sink.points and not any(name.startswith("explore/") for _, scalars in sink.points for name in scalars)


def test_epsilon_crosses_from_a_worker_process_as_a_plain_number(tmp_path):
    overrides = [o for o in DQN_TINY if not o.startswith("placement=")] + ["placement=worker_process"]
    build, config_cls, module, path = _load(str(ROOT / "pipelines" / "dqn_cartpole.py"))
    pipeline = build(apply_overrides(config_cls(), [*overrides, "seed=0"]))
    assert pipeline.worker_groups()  # the policy runs in a worker process
    sink = ListSink()
    pipeline.add_hook(Logger(sink))
    runtime.run(pipeline, tmp_path, seed=0, device="cpu", handle_signals=False,
                preload=[(module, str(Path(path).resolve()))])
    epsilon = [scalars["explore/epsilon"] for _, scalars in sink.points if "explore/epsilon" in scalars]
    assert epsilon and epsilon[0] == 1.0 and all(type(e) is float for e in epsilon)


async def test_the_runtime_status_event_becomes_per_stage_and_per_stream_scalars(dqn_runs, tmp_path):
    # the dict the runtime's status event carries is what status.json holds: take a real run's
    status = json.loads((dqn_runs[0] / "status.json").read_text())
    stages, streams = status["stages"], status["streams"]
    assert streams["learner.batches"]["capacity"] == 4 and streams["collect_policy.requests"]["capacity"] == 0
    streams["learner.batches"]["depth"] = 3
    streams["learner.weights (latest)"] = {"depth": 1, "capacity": 1}  # names as a worker's streams have them
    streams["env.chunks [2]"] = {"depth": None, "capacity": 8}  # not known (yet)
    sink = ListSink()
    logger = Logger(sink)
    run = run_context(tmp_path)
    await logger.start(run)
    logger.on_event(Event("status", "runtime", 1.0, status))
    await logger.close(run)
    ((_, scalars),) = sink.points
    assert {k: v for k, v in scalars.items() if k.startswith("stage/")} == {
        **{f"stage/{name}/busy": stage["busy"] for name, stage in stages.items()},
        **{f"stage/{name}/frames_per_s": stage["frames_per_s"] for name, stage in stages.items()
           if "frames_per_s" in stage}}
    assert scalars["stage/collect_env/frames_per_s"] > 0 and scalars["pipeline/updates_per_s"] == status[
        "updates_per_s"]
    assert scalars["stream/learner.batches/depth"] == 3.0 and scalars["stream/learner.batches/fill"] == 0.75
    assert scalars["stream/learner.weights_latest/depth"] == scalars["stream/learner.weights_latest/fill"] == 1.0
    assert scalars["stream/collect_policy.requests/depth"] == 0.0  # a rendezvous (capacity 0) has no fill
    assert "stream/collect_policy.requests/fill" not in scalars and not any("env.chunks" in k for k in scalars)


async def test_every_frames_averages_the_telemetry_like_the_other_scalars(tmp_path):
    sink = ListSink()
    logger = Logger(sink, every_frames=100)
    run = run_context(tmp_path)
    await logger.start(run)
    for t, depth in ((0.1, 1), (0.2, 3)):
        logger.on_event(Event("status", "runtime", t, {"streams": {"env.chunks": {"depth": depth, "capacity": 4}}}))
    logger.on_event(Event("explore", "policy", 0.25, {"epsilon": 0.5}))
    assert sink.points == []
    logger.on_event(Event("chunk", "env", 0.3, {"frames": 100, "chunk_frames": 100, "policy_version": 0}))
    ((frames, scalars),) = sink.points
    assert frames == 100 and scalars["stream/env.chunks/depth"] == 2.0 and scalars["explore/epsilon"] == 0.5


def test_the_event_log_leaves_the_status_event_to_status_json():
    bus = EventBus()
    bus.add_hook(EventLog())
    assert bus.wants("chunk") and bus.wants("explore") and not bus.wants("status")


def test_the_logger_refuses_what_is_not_a_sink():
    with pytest.raises(ConfigError, match="Logger needs at least one sink, got none"):
        Logger()
    with pytest.raises(ConfigError, match=r"Logger takes sinks .* got str: 'scalars.csv'"):
        Logger("scalars.csv")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="every_frames must be None .* or >= 1, got 0"):
        Logger(CSVSink(), every_frames=0)


# -- missing packages: the run fails at start with the install command ---------------------------------------------


def test_without_tensorboard_the_run_fails_at_start_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(Exception) as failed:
        run_pipeline("dqn_cartpole", DQN_TINY, tmp_path, Logger(CSVSink(), TensorBoardSink()))
    error = failed.value
    while not isinstance(error, ConfigError) and error.__cause__ is not None:
        error = error.__cause__  # type: ignore[assignment]
    assert isinstance(error, ConfigError)
    assert "TensorBoardSink needs the tensorboard package" in str(error)
    assert "pip install 'streamrl[tensorboard]'" in str(error)
    assert not (tmp_path / "tensorboard").exists()


def test_without_wandb_the_sink_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="WandbSink needs the wandb package.*pip install wandb"):
        WandbSink("streamrl-test").open(tmp_path)


async def test_wandb_offline_logs_scalars_against_frames(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = WandbSink("streamrl-test", mode="offline")
    logger = Logger(sink)
    run = run_context(tmp_path)
    await logger.start(run)
    logger.on_event(Event("eval", "Evaluate", 1.0, {"mean_return": 12.0, "frames": 128}))
    await logger.close(run)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


# -- plot_runs ------------------------------------------------------------------------------------------------------


def test_plot_runs_draws_two_seeds_of_a_pipeline_and_any_scalar_by_name(dqn_runs, tmp_path):
    out = plot_runs(dqn_runs, scalars=("eval/return", "train/loss"), out=tmp_path / "dqn.png")
    assert out == tmp_path / "dqn.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    default = plot_runs(dqn_runs, scalars="collect/episode_return", group="run")
    assert default == Path(*Path(dqn_runs[0]).resolve().parts[:-1]) / "runs.png" and default.exists()


def test_plot_runs_falls_back_to_metrics_csv_and_names_the_scalars_it_has(dqn_runs, tmp_path):
    old = tmp_path / "old_run"
    old.mkdir()
    (old / "metrics.csv").write_text(  # a run from before Logger
        "frames,wall_s,frames_per_s,episodes,episode_return,episode_length,optim_steps,loss,policy_version,"
        "batch_age_mean,eval_return\n"
        "100,1.0,100.0,4,20.5,20.5,10,0.5,10,3.0,\n"
        "100,1.2,0.0,4,,,10,,10,,9.0\n"
        "200,2.0,125.0,8,30.0,30.0,60,0.25,60,5.0,\n")
    series = read_scalars(old)
    assert series["eval/return"] == ([100.0], [9.0])
    assert series["train/loss"] == ([100.0, 200.0], [0.5, 0.25]) == series["loss"]  # new name and old column
    assert series["collect/episode_return"] == ([100.0, 200.0], [20.5, 30.0])
    assert read_scalars(old, x="wall_s")["train/loss"] == ([1.0, 2.0], [0.5, 0.25])
    out = plot_runs([old, dqn_runs[1]], scalars=("eval/return",), out=tmp_path / "mixed.png")
    assert out.exists()
    with pytest.raises(ConfigError, match=r"no run has the scalar\(s\) 'train/nope'; the runs have: .*train/loss"):
        plot_runs(dqn_runs, scalars=("train/nope",), out=tmp_path / "x.png")
    with pytest.raises(ConfigError, match="has neither scalars.csv nor metrics.csv"):
        plot_runs([tmp_path / "old_run", tmp_path], out=tmp_path / "x.png")


def test_logger_and_sinks_are_exported_at_the_top_level_and_from_hooks():
    import streamrl
    import streamrl.hooks

    for name in ("Logger", "CSVSink", "TensorBoardSink", "WandbSink", "Sink"):
        assert name in streamrl.__all__ and getattr(streamrl, name) is getattr(streamrl.hooks, name)
