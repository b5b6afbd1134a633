"""The learner's update (issue 12): captured and eager paths agree, no host read per update, reports every K
updates, the non-finite guard on the device, schedule objects, and when capture is refused."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn

import streamrl
from streamrl import (
    MLP,
    Actor,
    ClipPPOLoss,
    DQNLoss,
    Epochs,
    EveryBatch,
    LearnerStage,
    Pipeline,
    ProbabilisticActor,
    QValueActor,
    RamStorage,
    ReplayBuffer,
    SamplerStage,
    SoftUpdate,
    TD3Loss,
    ValueOperator,
    WriterStage,
)
from streamrl.envs.specs import Bounded
from streamrl.errors import ConfigError, NonFiniteError, StageFailed
from streamrl.replay.device_ring import RingBatch
from streamrl.stages.update import Update
from streamrl.testing import ListSource, forbid_host_sync, random_chunks


def dqn_learner(capture: str, *, report_every: int = 1, device: str = "cpu", **kwargs: Any) -> LearnerStage:
    torch.manual_seed(0)
    actor = QValueActor(MLP(2, in_features=4, num_cells=(32, 32)))
    loss = DQNLoss(actor, gamma=0.99, double_dqn=True)
    optimizer = torch.optim.Adam(loss.value_net.parameters(), lr=1e-3, fused=True)
    return LearnerStage("learner", loss, optimizer, schedule=EveryBatch(publish_every=2), publish=actor,
                        max_grad_norm=1.0, target_update=SoftUpdate(loss, tau=0.05), device=device, capture=capture,
                        report_every=report_every, **kwargs)


def ppo_learner(capture: str, *, report_every: int = 1, device: str = "cpu",
                minibatch_size: int = 16) -> LearnerStage:
    torch.manual_seed(0)
    spec = Bounded(low=-1.0, high=1.0, shape=(1,), dtype=torch.float32)
    params = TensorDictModule(nn.Sequential(MLP(2, in_features=3, num_cells=(16, 16), activation=nn.Tanh),
                                            NormalParamExtractor()), in_keys=["observation"], out_keys=["loc", "scale"])
    actor = ProbabilisticActor(params, spec=spec)
    critic = ValueOperator(MLP(1, in_features=3, num_cells=(16, 16), activation=nn.Tanh))
    loss = ClipPPOLoss(actor, critic, entropy_coef=1e-2)  # TanhNormal: the entropy draws a sample inside the loss
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-3, fused=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 40)
    return LearnerStage("learner", loss, optimizer, schedule=Epochs(epochs=2, minibatch_size=minibatch_size),
                        publish=actor, max_grad_norm=0.5, scheduler=scheduler, device=device, capture=capture,
                        report_every=report_every)


def ppo_chunks(n: int) -> list[TensorDict]:
    generator = torch.Generator().manual_seed(1)
    shape = (2, 20)  # 40 rows: minibatches of 16, 16 and 8 (two signatures when captured)

    def draw(*size: int) -> torch.Tensor:
        return torch.randn(*shape, *size, generator=generator)

    return [TensorDict({"observation": draw(3), "action": draw(1).tanh() * 0.9, "sample_log_prob": draw(),
                        "advantage": draw(1), "value_target": draw(1)}, batch_size=list(shape)) for _ in range(n)]


def run_learner(tmp_path: Path, learner: LearnerStage, batches: list[Any]) -> list[dict[str, Any]]:
    """Run ``learner`` on ``batches``; return the ``optim_step`` events' data."""
    p = Pipeline("learn").add(ListSource("source", batches), learner)
    p.connect("source.items", "learner.batches", capacity=2)
    reports: list[dict[str, Any]] = []
    p.on("optim_step", lambda event: reports.append(dict(event.data)))
    streamrl.run(p, tmp_path, seed=0, handle_signals=False)
    return reports


def rows(n: int) -> list[TensorDict]:
    return [chunk.reshape(-1) for chunk in random_chunks(n, num_envs=4, steps=8)]


def same_weights(a: LearnerStage, b: LearnerStage) -> bool:
    pairs = zip(a.loss.state_dict().values(), b.loss.state_dict().values(), strict=True)
    return all(torch.allclose(x, y, atol=1e-6) if isinstance(x, torch.Tensor) else x == y for x, y in pairs)


# -- captured and eager agree -----------------------------------------------------------------------------------
def test_captured_dqn_updates_equal_the_eager_ones(tmp_path):
    eager, captured = dqn_learner("off"), dqn_learner("graph")
    eager_reports = run_learner(tmp_path / "eager", eager, rows(12))
    captured_reports = run_learner(tmp_path / "captured", captured, rows(12))
    assert eager.captured is False and captured.captured is True
    assert "static buffers" in captured.capture_reason
    # equal to float tolerance: the captured step reads its learning rate from a tensor (what a scheduler fills)
    assert [r["loss"] for r in eager_reports] == pytest.approx([r["loss"] for r in captured_reports], abs=1e-6)
    assert len(eager_reports) == 12 and all(math.isfinite(r["loss"]) for r in eager_reports)
    assert same_weights(eager, captured)  # the soft target update (inside the captured step) included
    assert eager.target_update.steps == captured.target_update.steps == 12


def test_captured_ppo_minibatches_equal_the_eager_ones_with_a_scheduler_and_two_minibatch_shapes(tmp_path):
    eager, captured = ppo_learner("off"), ppo_learner("graph")
    eager_reports = run_learner(tmp_path / "eager", eager, ppo_chunks(3))
    captured_reports = run_learner(tmp_path / "captured", captured, ppo_chunks(3))
    assert len(eager_reports) == 3 * 2 * 3  # chunks x epochs x minibatches
    for key in ("loss", "loss_objective", "loss_critic", "entropy", "clip_fraction", "kl_approx", "grad_norm", "lr"):
        assert [r[key] for r in eager_reports] == pytest.approx([r[key] for r in captured_reports], abs=1e-6), key
    assert same_weights(eager, captured)
    assert len(captured._runner.entries) == 2  # minibatches of 16 and of 8 rows: one set of static buffers each


def td3_learner(capture: str, device: str = "cpu") -> LearnerStage:
    torch.manual_seed(0)
    spec = Bounded(shape=(1,), dtype=torch.float32, low=-2.0, high=2.0)

    def critic() -> ValueOperator:
        return ValueOperator(MLP(1, in_features=4, num_cells=(16,)), in_keys=["observation", "action"])

    loss = TD3Loss(Actor(MLP(1, in_features=3, num_cells=(16,)), spec=spec), [critic(), critic()], action_spec=spec,
                   policy_delay=2)
    return LearnerStage("learner", loss, torch.optim.Adam(loss.parameters(), lr=1e-3, fused=True),
                        target_update=SoftUpdate(loss, tau=0.05), device=device, capture=capture, report_every=1)


def pendulum_rows(n: int) -> list[TensorDict]:
    g = torch.Generator().manual_seed(2)
    def draw(size: int) -> torch.Tensor:
        return torch.randn(16, size, generator=g)

    never = torch.zeros(16, 1, dtype=torch.bool)
    return [TensorDict({"observation": draw(3), "action": draw(1).tanh() * 2,
                        "next": {"observation": draw(3), "reward": draw(1), "terminated": never, "truncated": never}},
                       batch_size=[16]) for _ in range(n)]


def test_td3s_delayed_actor_updates_capture_one_set_of_buffers_per_branch_and_equal_the_eager_ones(tmp_path):
    eager, captured = td3_learner("off"), td3_learner("graph")
    eager_reports = run_learner(tmp_path / "eager", eager, pendulum_rows(6))
    captured_reports = run_learner(tmp_path / "captured", captured, pendulum_rows(6))
    actor_terms = [r["loss_actor"] for r in captured_reports]
    assert [term != 0 for term in actor_terms] == [False, True] * 3  # the actor learns every second update
    assert actor_terms == pytest.approx([r["loss_actor"] for r in eager_reports], abs=1e-6)
    assert same_weights(eager, captured) and captured.loss.calls == eager.loss.calls == 6
    assert len(captured._runner.entries) == 2  # with and without the actor term


def test_a_compiled_loss_learns_like_the_eager_one(tmp_path):
    """``capture="compile"``: the PPO loss's forward and backward through torch.compile (inductor on the CPU)."""
    eager, compiled = ppo_learner("off", minibatch_size=20), ppo_learner("compile", minibatch_size=20)  # one shape
    eager_reports = run_learner(tmp_path / "eager", eager, ppo_chunks(2))
    compiled_reports = run_learner(tmp_path / "compiled", compiled, ppo_chunks(2))
    assert compiled.capture_reason == "torch.compile (default mode)"
    assert compiled._update.forward is not compiled.loss  # the compiled module ran
    assert [r["loss"] for r in compiled_reports] == pytest.approx([r["loss"] for r in eager_reports], abs=1e-4)


def test_batches_sent_as_ring_indices_are_gathered_inside_the_captured_update(tmp_path):
    """The sampler's device path sends indices into a mirror; the captured step gathers them (its static buffers
    hold the indices, not rows) and learns as many updates as from rows."""
    steps = []
    for device_replay in (False, True):
        replay = ReplayBuffer(RamStorage(512), batch_size=16)
        sampler = SamplerStage("sampler", replay, device_replay=device_replay)
        learner = dqn_learner("graph")
        losses: list[float] = []
        p = Pipeline("dqn").add(ListSource("source", random_chunks(6, num_envs=4, steps=8)), WriterStage(
            "writer", replay), sampler, learner)
        p.connect("source.items", "writer.chunks", capacity=1)
        p.connect("sampler.batches", "learner.batches", capacity=2)
        p.on("optim_step", lambda event, losses=losses: losses.append(event.data["loss"]))
        streamrl.run(p, tmp_path / str(device_replay), seed=0, handle_signals=False)
        assert sampler.mirrored is device_replay and all(math.isfinite(loss) for loss in losses)
        (static,) = [entry.static for entry in learner._runner.entries.values()]
        assert set(static.keys()) == ({"index"} if device_replay else {"index", "observation", "action", "next",
                                                                        "policy_version"})
        steps.append(learner.steps)
    assert steps[0] == steps[1] > 3


def test_an_update_reads_nothing_on_the_host():
    """Loss, backward, norm, guard, clipping, fused Adam step, soft target update: capture-safe, on a RingBatch."""
    learner = dqn_learner("graph")
    update = Update(learner.loss, learner.optimizer, max_grad_norm=1.0, check_finite=True,
                    target_update=learner.target_update, device=torch.device("cpu"))
    replay = ReplayBuffer(RamStorage(256), batch_size=32)
    replay.extend(random_chunks(1, num_envs=4, steps=16)[0])
    ring = replay.mirror("cpu")
    update.run(replay.sample_ring().rows())  # once outside: lazy state (optimizer moments, layout)
    batch = replay.sample_ring()
    with forbid_host_sync():
        for _ in range(3):
            learner.optimizer.zero_grad(set_to_none=True)
            update.run(RingBatch(ring, batch.index, batch.info).rows())
    assert update.device_guard and update.read(4).figures["loss"] > 0


# -- reports every K updates ------------------------------------------------------------------------------------
def test_optim_step_events_come_every_report_every_updates_with_window_means(tmp_path):
    learner = dqn_learner("off", report_every=5)
    reports = run_learner(tmp_path, learner, rows(23))
    assert [r["step"] for r in reports] == [5, 10, 15, 20, 23]  # the last partial window at the end
    assert [r["updates"] for r in reports] == [5, 5, 5, 5, 3]
    assert {"loss", "grad_norm", "lr", "version", "age_min", "age_mean", "age_max"} <= set(reports[0])
    per_update = run_learner(tmp_path / "each", dqn_learner("off", report_every=1), rows(23))
    assert reports[0]["loss"] == pytest.approx(sum(r["loss"] for r in per_update[:5]) / 5, rel=1e-5)


# -- the non-finite guard on the device -------------------------------------------------------------------------
def poisoned(n: int, at: int) -> list[TensorDict]:
    batches = rows(n)
    batches[at]["observation"][3, 0] = float("nan")
    return batches


def test_a_nan_found_on_the_device_stops_the_run_at_the_next_report_with_the_weights_before_it(tmp_path):
    learner = dqn_learner("graph", report_every=3)
    with pytest.raises(StageFailed) as caught:
        run_learner(tmp_path / "bad", learner, poisoned(8, at=4))  # step 5 is bad; read at step 6
    error = caught.value.error
    assert isinstance(error, NonFiniteError)
    assert "learner 'learner', optimizer step 5: the loss term 'loss' is nan (found by the loss check)" in str(error)
    assert "the first non-finite batch entry is 'observation'" in str(error)
    assert "the weights are those after step 4" in str(error)
    assert learner.steps == 4
    clean = dqn_learner("graph", report_every=3)
    run_learner(tmp_path / "clean", clean, rows(4))  # the same first four batches, nothing after them
    online = [name for name in learner.loss.state_dict() if "target" not in name]
    assert all(torch.equal(learner.loss.state_dict()[k], clean.loss.state_dict()[k]) for k in online)


# -- when capture is refused ------------------------------------------------------------------------------------
def test_capture_graph_is_refused_with_the_reason_and_auto_says_why_it_runs_eagerly(tmp_path):
    torch.manual_seed(0)
    actor = QValueActor(MLP(2, in_features=4, num_cells=(8,)))
    loss = DQNLoss(actor, gamma=0.99)
    learner = LearnerStage("learner", loss, torch.optim.Adam(loss.value_net.parameters()), device="cpu",
                           capture="graph")
    with pytest.raises(StageFailed, match="capture='graph' cannot be honoured: the optimizer \\(Adam\\) is not "
                                          "fused") as caught:
        run_learner(tmp_path / "graph", learner, rows(2))
    assert isinstance(caught.value.error, ConfigError)
    auto = dqn_learner("auto")
    events: list[dict[str, Any]] = []
    p = Pipeline("learn").add(ListSource("source", rows(2)), auto)
    p.connect("source.items", "learner.batches", capacity=2)
    p.on("learner", lambda event: events.append(dict(event.data)))
    streamrl.run(p, tmp_path / "auto", seed=0, handle_signals=False)
    assert events == [{"device": "cpu", "captured": False, "reason": "eager on cpu (graphs need CUDA)"}]


@pytest.mark.parametrize(("make", "message"), [
    (lambda: EveryBatch(publish_every=0), "EveryBatch: publish_every must be >= 1, got 0"),
    (lambda: Epochs(epochs=0, minibatch_size=64), "Epochs: takes epochs >= 1 and minibatch_size >= 1"),
    (lambda: dqn_learner("always"), "capture must be 'auto', 'graph', 'compile' or 'off', got 'always'"),
    (lambda: dqn_learner("off", report_every=0), "report_every must be >= 1, got 0"),
])
def test_schedule_and_capture_arguments_are_checked(make, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(")", "\\)")):
        make()


def test_the_summary_says_how_the_learner_ran_and_where_replay_rows_lived(tmp_path):
    replay = ReplayBuffer(RamStorage(256), batch_size=8)
    source = ListSource("source", random_chunks(2, num_envs=2, steps=8))
    p = Pipeline("dqn").add(source, WriterStage("writer", replay), SamplerStage("sampler", replay), dqn_learner("auto"))
    p.connect("source.items", "writer.chunks", capacity=1)
    p.connect("sampler.batches", "learner.batches", capacity=2)
    summary = streamrl.run(p, tmp_path, seed=0, handle_signals=False).summary
    learner = summary["learner"]
    assert learner == {"device": "cpu", "captured": False, "capture_reason": "eager on cpu (graphs need CUDA)",
                       "replay_on_device": False, "replay_reason": learner["replay_reason"]}
    assert "CUDA" in learner["replay_reason"] and summary["optim_steps_per_s"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (on the GPU machine: tools/gpu_figures.sh)")
@pytest.mark.parametrize("make", [dqn_learner, ppo_learner, td3_learner], ids=["dqn", "ppo", "td3"])
def test_cuda_graph_updates_equal_eager_cuda_updates(tmp_path, make):
    """On CUDA, ``capture="graph"`` warms up, captures and replays CUDA graphs: the losses follow the eager ones."""
    data = {dqn_learner: lambda: rows(12), ppo_learner: lambda: ppo_chunks(3), td3_learner: lambda: pendulum_rows(8)}
    eager, captured = make("off", device="cuda"), make("graph", device="cuda")
    eager_reports = run_learner(tmp_path / "eager", eager, data[make]())
    captured_reports = run_learner(tmp_path / "captured", captured, data[make]())
    assert captured.capture_reason == "CUDA graphs"
    assert all(entry.graph is not None for entry in captured._runner.entries.values())  # each shape seen > 3 times
    assert [r["loss"] for r in captured_reports] == pytest.approx([r["loss"] for r in eager_reports], rel=1e-4,
                                                                   abs=1e-5)
    assert same_weights(eager, captured) or all(
        torch.allclose(x, y, atol=1e-4) for x, y in zip(eager.loss.parameters(), captured.loss.parameters(),
                                                        strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (on the GPU machine: tools/gpu_figures.sh)")
@pytest.mark.parametrize("device_replay", [False, True])
def test_a_cuda_learner_gets_its_batches_on_its_device_copied_ahead_or_gathered_from_the_mirror(tmp_path,
                                                                                                 device_replay):
    replay = ReplayBuffer(RamStorage(512), batch_size=16)
    sampler = SamplerStage("sampler", replay, device_replay=device_replay, device="cuda")
    learner = dqn_learner("auto", device="cuda")
    seen: list[str] = []
    p = Pipeline("dqn").add(ListSource("source", random_chunks(6, num_envs=4, steps=8)), WriterStage(
        "writer", replay), sampler, learner)
    p.connect("source.items", "writer.chunks", capacity=1)
    p.connect("sampler.batches", "learner.batches", capacity=2)
    p.on("optim_step", lambda event: seen.append(event.data["loss"]))
    streamrl.run(p, tmp_path, seed=0, device="cuda", handle_signals=False)
    assert learner.captured and sampler.mirrored is device_replay and seen and all(map(math.isfinite, seen))
