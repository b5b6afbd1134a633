"""Checkpoint faults: safe loading, rotation and fallback, failed saves, and the non-finite guard (issue 10).

Each test injects the fault: a crafted or damaged file, a save killed or failing with ENOSPC, a loss or gradient
that goes NaN, ``--set lr=1e30`` through the real CLI.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torch import nn

import streamrl.cli
import streamrl.execution.main as runtime
import streamrl.hooks.checkpoint as checkpoint_module
from streamrl import Checkpoint, LearnerStage, Pipeline
from streamrl.cli import _load
from streamrl.config import apply_overrides
from streamrl.errors import CheckpointError, ConfigError, DiskFull, NonFiniteError, StageFailed
from streamrl.events import EventBus
from streamrl.execution.context import RunContext
from streamrl.hooks.checkpoint import FORMAT, audit_payload
from streamrl.resume import load_checkpoint, restore
from streamrl.seeding import restore_rng, rng_state
from streamrl.stages.base import Stage, StageContext
from streamrl.summary import RunRecorder
from streamrl.testing import ListSource

ROOT = Path(__file__).resolve().parents[1]
DQN = str(ROOT / "pipelines" / "dqn_cartpole.py")

# -- every pipeline's checkpoint loads with weights_only=True and restores exactly -------------------------------

OFF_POLICY_TINY = ["total_frames=128", "num_envs=1", "frames_per_chunk=32", "min_fill=32", "batch_size=8",
                   "hidden=16", "buffer_size=256", "updates_per_frame=0.25", "eval_every=100000",
                   "eval_episodes=1", "device=cpu"]
TINY = {  # every file in pipelines/, with a budget of a few hundred frames
    "a2c_cartpole": ["total_frames=256", "eval_every=100000", "eval_episodes=1"],
    "ppo_cartpole": ["total_frames=256", "frames_per_chunk=128", "num_envs=2", "epochs=1", "minibatch_size=64",
                     "hidden=16", "eval_every=100000", "eval_episodes=1"],
    "ppo_inverted_double_pendulum": ["total_frames=200", "frames_per_chunk=100", "init_stats_steps=20",
                                     "num_cells=16", "epochs=1", "eval_every=100000", "eval_episodes=1"],
    "dqn_cartpole": ["total_frames=256", "min_fill=64", "batch_size=16", "hidden=16", "prioritized=true",
                     "buffer_size=512", "eval_every=100000", "eval_episodes=1", "device=cpu"],
    "dqn_cartpole_pixels": ["total_frames=96", "num_envs=1", "frames_per_chunk=32", "min_fill=32", "batch_size=4",
                            "init_stats_steps=8", "image_size=48", "buffer_size=128", "eval_every=100000",
                            "eval_episodes=1", "device=cpu"],
    "ddpg_pendulum": OFF_POLICY_TINY,
    "sac_pendulum": OFF_POLICY_TINY,
    "td3_pendulum": OFF_POLICY_TINY,
}


def test_the_tiny_configs_cover_every_pipeline():
    assert set(TINY) == {p.stem for p in (ROOT / "pipelines").glob("*.py")}


def assert_same(saved: Any, restored: Any, path: str = "") -> None:
    """Exact equality of two state trees (tensors by value, dtype and shape)."""
    if isinstance(saved, torch.Tensor):
        assert isinstance(restored, torch.Tensor) and saved.dtype == restored.dtype, path
        assert torch.equal(saved, restored), path
    elif isinstance(saved, dict):
        assert set(saved) == set(restored), path
        for key in saved:
            assert_same(saved[key], restored[key], f"{path}/{key}")
    elif isinstance(saved, (list, tuple)):
        assert len(saved) == len(restored), path
        for i, (a, b) in enumerate(zip(saved, restored, strict=True)):
            assert_same(a, b, f"{path}/{i}")
    else:
        assert saved == restored, path


def in_process(pipeline: Pipeline) -> Pipeline:
    """Every group in the main process: cheap, and every stage's and hook's state is the live one."""
    for group in pipeline.groups:
        if group != "main":
            pipeline.place(group, "in_process")
    return pipeline


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_pipeline_checkpoints_what_weights_only_loads_and_restores_exactly(tmp_path, name):
    build, config_cls, _module, _path = _load(str(ROOT / "pipelines" / f"{name}.py"))
    cfg = apply_overrides(config_cls(), TINY[name])
    pipeline = in_process(build(cfg))
    result = runtime.run(pipeline, tmp_path, seed=0, device="cpu", handle_signals=False)
    assert result.exit_reason == "completed" and result.summary["optim_steps"] > 0

    checkpoint = load_checkpoint(tmp_path)  # torch.load(weights_only=True): every state_dict is plain
    assert checkpoint["format"] == FORMAT and checkpoint["loaded_from"] == "checkpoint.pt"
    audit_payload({k: v for k, v in checkpoint.items() if k not in ("loaded_from", "fallback")})
    fresh = in_process(build(cfg))
    restore(fresh, checkpoint)
    for stage_name, saved in checkpoint["stages"].items():
        state = fresh.stages[stage_name].state_dict()
        if "segment" in saved:  # an env stage starts a new segment (new traj_ids, seeds) when it resumes
            assert state.pop("segment") == saved["segment"] + 1
            saved = {k: v for k, v in saved.items() if k != "segment"}
        assert_same(saved, state, f"stages/{stage_name}")
    hooks = {hook.name: hook for hook in fresh.hooks_in("main")}
    for hook_name, saved in checkpoint["hooks"].items():
        assert_same(saved, hooks[hook_name].state_dict(), f"hooks/{hook_name}")

    resumed = runtime.run(fresh, tmp_path, seed=0, device="cpu", handle_signals=False, resume=checkpoint)
    assert resumed.exit_reason == "completed"  # the budget was spent: it starts, restores, saves and ends
    again = load_checkpoint(tmp_path)
    assert again["frames"] >= checkpoint["frames"] and (tmp_path / "checkpoint.prev.pt").exists()


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    np.random.seed(7)
    np.random.standard_normal()  # numpy caches the second gaussian: part of the state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert (np.random.standard_normal(3) == expected[1]).all() and random.random() == expected[2]


# -- a harness that saves checkpoints of a toy pipeline ----------------------------------------------------------


class Held(Stage):
    """A stage whose state is a tensor; it records whether the checkpoint read it while holding it."""

    inputs = ("items",)

    def __init__(self, name: str = "held") -> None:
        super().__init__(name)
        self.weights = torch.zeros(3)
        self.holding = False
        self.read_while_held: list[bool] = []

    async def run(self, ctx: StageContext) -> None:
        async for _ in ctx.input("items"):
            pass

    @contextlib.asynccontextmanager
    async def held_for_checkpoint(self) -> AsyncIterator[None]:
        self.holding = True
        await anyio.sleep(0)  # a real hold awaits (a store commit)
        try:
            yield
        finally:
            self.holding = False

    def state_dict(self) -> dict[str, Any]:
        self.read_while_held.append(self.holding)
        return {"weights": self.weights.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"]


def toy(tmp_path: Path) -> tuple[Pipeline, Checkpoint, RunContext, Held]:
    held, hook = Held(), Checkpoint()
    pipeline = Pipeline("toy").add(ListSource("src", []), held)
    pipeline.connect("src.items", "held.items")
    pipeline.add_hook(hook)
    run = RunContext(tmp_path, bus=EventBus(), device=torch.device("cpu"), seed=0, recorder=RunRecorder(),
                     pipeline=pipeline)
    return pipeline, hook, run, held


def save_at(hook: Checkpoint, run: RunContext, frames: int) -> Path:
    assert run.recorder is not None
    run.recorder.frames_by_source["src"] = frames
    return anyio.run(hook.save, run)


def two_checkpoints(tmp_path: Path) -> tuple[Checkpoint, RunContext, Held]:
    _, hook, run, held = toy(tmp_path)
    save_at(hook, run, 10)
    save_at(hook, run, 20)
    return hook, run, held


def test_a_save_reads_the_states_while_every_main_process_stage_is_held(tmp_path):
    _, hook, run, held = toy(tmp_path)
    save_at(hook, run, 10)
    assert held.read_while_held == [True] and not held.holding


# -- rotation, fallback and safe loading ---------------------------------------------------------------------------


def test_saves_rotate_two_checkpoints_and_a_truncated_newest_falls_back_to_the_previous(tmp_path):
    two_checkpoints(tmp_path)
    assert load_checkpoint(tmp_path)["frames"] == 20
    assert load_checkpoint(tmp_path, "checkpoint.prev.pt")["frames"] == 10
    newest = tmp_path / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn copy, a full disk, ...

    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["frames"] == 10 and checkpoint["loaded_from"] == "checkpoint.prev.pt"
    assert "checkpoint.pt is damaged" in checkpoint["fallback"]

    pipeline, _, _, held = toy(tmp_path / "resumed")
    restore(pipeline, checkpoint)  # the resume goes on from the previous checkpoint
    assert torch.equal(held.weights, torch.zeros(3))


def test_the_cli_resumes_from_the_previous_checkpoint_when_the_newest_is_truncated(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(streamrl.cli, "warm_up", lambda: None)  # everything in-process: no fork server
    out = tmp_path / "run"
    tiny = [arg for item in [*TINY["dqn_cartpole"], "placement=in_process", "checkpoint_every=64"]
            for arg in ("--set", item)]
    with pytest.raises(SystemExit) as exited:
        streamrl.cli.main(["run", DQN, "--out", str(out), *tiny])
    assert exited.value.code == 0 and (out / "checkpoint.prev.pt").exists()
    previous = load_checkpoint(out, "checkpoint.prev.pt")["frames"]
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        streamrl.cli.main(["run", DQN, "--resume", str(out)])
    err = capsys.readouterr().err
    assert exited.value.code == 0, err
    assert f"resuming {out} at frame {previous}" in err
    assert "warning: resuming from checkpoint.prev.pt, the previous checkpoint: checkpoint.pt is damaged" in err


def test_a_corrupt_newest_checkpoint_falls_back_and_none_loading_is_an_error(tmp_path):
    two_checkpoints(tmp_path)
    newest = tmp_path / "checkpoint.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # bit rot inside the archive: its CRC check fails
    newest.write_bytes(bytes(data))
    assert load_checkpoint(tmp_path)["loaded_from"] == "checkpoint.prev.pt"

    (tmp_path / "checkpoint.prev.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint loads.*checkpoint.pt is damaged.*checkpoint.prev.pt"):
        load_checkpoint(tmp_path)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (tmp_path / name).unlink()
    with pytest.raises(ConfigError, match="no checkpoint.pt"):
        load_checkpoint(tmp_path)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_a_save_killed_at_any_instant_leaves_a_checkpoint_that_loads(tmp_path, monkeypatch):
    hook, run, _ = two_checkpoints(tmp_path)
    real_replace, real_fsync = os.replace, os.fsync
    newest = 20
    for kill_at in range(4):  # fsync of the new file, rename newest -> previous, rename new -> newest, fsync dir
        calls: list[Any] = []

        def step(real: Any, *args: Any, kill_at: int = kill_at, calls: list[Any] = calls) -> Any:
            calls.append(real)
            if len(calls) - 1 == kill_at:
                raise Killed
            return real(*args)

        monkeypatch.setattr(checkpoint_module.os, "replace", lambda *a, step=step: step(real_replace, *a))
        monkeypatch.setattr(checkpoint_module.os, "fsync", lambda *a, step=step: step(real_fsync, *a))
        with contextlib.suppress(Killed):
            save_at(hook, run, 30 + kill_at)
        monkeypatch.undo()
        installed = kill_at == 3  # killed after the new file took the newest's name
        checkpoint = load_checkpoint(tmp_path)
        assert checkpoint["frames"] == (30 + kill_at if installed else newest), kill_at
        assert checkpoint["loaded_from"] == ("checkpoint.prev.pt" if kill_at == 2 else "checkpoint.pt")
        save_at(hook, run, 40 + kill_at)  # the next save works and rotates as usual
        newest = 40 + kill_at
        assert load_checkpoint(tmp_path)["frames"] == newest and not list(tmp_path.glob("*.tmp"))


def test_a_save_that_hits_a_full_disk_removes_its_file_and_keeps_both_checkpoints(tmp_path, monkeypatch):
    hook, run, _ = two_checkpoints(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("checkpoint*.pt")}

    def disk_full(payload, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DiskFull) as caught:
        save_at(hook, run, 30)
    assert caught.value.path == tmp_path / "checkpoint.pt" and "checkpoint.pt" in str(caught.value)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("checkpoint*.pt")} == before
    assert not list(tmp_path.glob("*.tmp"))


class Evil:
    """Unpickling it would create ``marker``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path, capsys, monkeypatch):
    two_checkpoints(tmp_path)  # a good previous checkpoint is no excuse: a hostile newest one is an error
    marker = tmp_path / "pwned"
    torch.save({"format": FORMAT, "frames": 0, "payload": Evil(marker)}, tmp_path / "checkpoint.pt")
    refused = r"refusing to load .*checkpoint.pt.*pickled object of type io.open.*could run code"
    with pytest.raises(CheckpointError, match=refused):
        load_checkpoint(tmp_path)
    assert not marker.exists()

    with open(tmp_path / "checkpoint.pt", "wb") as f:  # a bare pickle, not even a torch archive
        pickle.dump(Evil(marker), f, protocol=2)
    with pytest.raises(CheckpointError, match="bare pickle"):
        load_checkpoint(tmp_path)
    assert not marker.exists()

    torch.save({"format": FORMAT, "rng": np.random.get_state()}, tmp_path / "checkpoint.pt")  # an ndarray
    with pytest.raises(CheckpointError, match="numpy"):
        load_checkpoint(tmp_path)

    torch.save({"format": FORMAT, "frames": 0, "payload": Evil(marker)}, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(streamrl.cli, "warm_up", lambda: None)  # no fork server: no run starts
    (tmp_path / "config.json").write_text(json.dumps({"pipeline": DQN, "build": DQN, "config": {}}))
    with pytest.raises(SystemExit) as exited:  # the CLI: a usage error, exit 2, naming the file
        streamrl.cli.main(["run", DQN, "--resume", str(tmp_path)])
    assert exited.value.code == 2
    assert "refusing to load" in capsys.readouterr().err and not marker.exists()


def test_a_state_dict_that_is_not_plain_or_not_finite_fails_the_save_and_keeps_the_checkpoints(tmp_path):
    hook, run, held = two_checkpoints(tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    held.weights = torch.tensor([0.0, float("nan"), 1.0])
    with pytest.raises(NonFiniteError, match="'stages/held/weights'"):
        save_at(hook, run, 30)
    held.state_dict = lambda: {"weights": np.zeros(3)}  # type: ignore[method-assign]
    with pytest.raises(CheckpointError, match="'stages/held/weights'.*numpy.ndarray"):
        save_at(hook, run, 30)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before and not list(tmp_path.glob("*.tmp"))


# -- the learner's non-finite guard --------------------------------------------------------------------------------


class ToyLoss(nn.Module):
    """A regression loss; it goes non-finite the way the test asks."""

    def __init__(self, grad_nan: bool = False) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)
        self.grad_nan = grad_nan

    def forward(self, batch: TensorDict) -> TensorDict:
        error = self.net(batch["observation"]) - batch["target"]
        loss_value = error.pow(2).mean()
        if self.grad_nan and bool(batch["poison"].any()):  # finite value, NaN gradient: sqrt'(0) * 0
            loss_value = loss_value + torch.sqrt(self.net.bias - self.net.bias.detach()).sum() * 0
        loss_entropy = torch.zeros(())
        return TensorDict({"loss_value": loss_value, "loss_entropy": loss_entropy, "loss": loss_value + loss_entropy})


class Batches(Stage):
    """Sends batches (one per 10 'frames'); after batch ``checkpoint_after`` waits for the checkpoint on disk."""

    outputs = ("batches",)
    source = True

    def __init__(self, batches: list[TensorDict], checkpoint_after: int) -> None:
        super().__init__("batches")
        self.batches = batches
        self.checkpoint_after = checkpoint_after

    async def run(self, ctx: StageContext) -> None:
        out = ctx.output("batches")
        for i, batch in enumerate(self.batches):
            await out.send(batch)
            await ctx.publish("chunk", frames=10 * (i + 1), chunk_frames=10)
            if i == self.checkpoint_after:
                while not (ctx.run.run_dir / "checkpoint.pt").exists():
                    await anyio.sleep(0.01)


def batches(n: int, poison_at: int, key: str | None) -> list[TensorDict]:
    out = []
    for i in range(n):
        batch = TensorDict({"observation": torch.randn(8, 2), "target": torch.randn(8, 1),
                            "poison": torch.full((8,), i == poison_at)}, batch_size=[8])
        if i == poison_at and key is not None:
            batch[key][3, 0] = float("nan")
        out.append(batch)
    return out


def run_until_non_finite(tmp_path: Path, loss: ToyLoss, poison_at: int, key: str | None,
                         losses_seen: list[bool] | None = None) -> tuple[str, Any]:
    learner = LearnerStage("learner", loss, torch.optim.Adam(loss.parameters(), lr=1e-2), device="cpu")
    source = Batches(batches(poison_at + 1, poison_at, key), checkpoint_after=2)  # the poisoned batch comes last
    pipeline = Pipeline("toy").add(source, learner)
    pipeline.connect("batches.batches", "learner.batches", capacity=1)
    pipeline.add_hook(Checkpoint(every_frames=30))  # one periodic save, at batch 2 (30 frames; the next at 60)
    if losses_seen is not None:  # a post_loss hook (PriorityUpdate's place): the learner checks the loss first
        pipeline.on("loss", lambda event: losses_seen.append(bool(torch.isfinite(event.data["loss"]["loss"]))))
    with pytest.raises(StageFailed) as caught:
        runtime.run(pipeline, tmp_path, seed=0, handle_signals=False)
    assert caught.value.stage == "learner" and isinstance(caught.value.error, NonFiniteError)
    assert all(bool(torch.isfinite(p).all()) for p in loss.parameters())  # the step was never taken
    assert learner.steps == poison_at
    return str(caught.value.error), load_checkpoint(tmp_path)


def test_a_nan_loss_stops_the_run_naming_learner_step_term_and_key_and_the_good_checkpoint_stays(tmp_path):
    losses_seen: list[bool] = []
    message, checkpoint = run_until_non_finite(tmp_path, ToyLoss(), poison_at=4, key="observation",
                                               losses_seen=losses_seen)
    assert losses_seen == [True] * 4  # the loss hook never saw the NaN loss
    assert "learner 'learner', optimizer step 5" in message
    assert "loss term 'loss_value' is nan (found by the loss check)" in message
    assert "first non-finite batch entry is 'observation'" in message
    # the periodic checkpoint (batch 2) stays: no end-of-run save over it, nothing rotated
    assert checkpoint["frames"] == 30 and checkpoint["stages"]["learner"]["steps"] <= 3
    assert not (tmp_path / "checkpoint.prev.pt").exists()
    audit_payload(checkpoint["stages"])


def test_a_nan_gradient_of_a_finite_loss_is_named_by_parameter(tmp_path):
    message, _ = run_until_non_finite(tmp_path, ToyLoss(grad_nan=True), poison_at=3, key=None)
    assert "optimizer step 4" in message
    assert "gradient of parameter 'net.bias' is non-finite (the loss is finite)" in message
    assert "(found by the gradient check); no batch entry is non-finite" in message


def test_lr_1e30_ends_the_cli_run_with_exit_1_naming_the_learner_and_no_checkpoint_is_non_finite(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "streamrl.cli", "run", DQN, "--out", str(out), "--set", "total_frames=3000",
         "--set", "min_fill=200", "--set", "lr=1e30", "--set", "eval_every=100000", "--set", "hidden=32,32",
         "--set", "checkpoint_every=300"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "NonFiniteError: learner 'learner', optimizer step" in done.stderr
    assert json.loads((out / "summary.json").read_text())["exit_reason"] == "failed"
    for path in out.glob("checkpoint*.pt"):  # the checkpoints taken before the NaN: finite, loadable
        audit_payload(torch.load(path, weights_only=True))
