"""TorchRL's five tutorials (``../shared/seeds/``), each rebuilt with streamrl's public names on a tiny budget.

One test per tutorial, written as a TorchRL user would after reading the README: the same steps in the same
order, with imports only from ``streamrl`` and its exporting subpackages (``streamrl.envs``,
``streamrl.transforms``, ``streamrl.modules``, ``streamrl.objectives``, ``streamrl.replay``, ``streamrl.hooks``).
Where a tutorial uses something streamrl does not have (TorchRL's ``for data in collector:`` loop, the
``Trainer``), the workflow is written the streamrl way (a :class:`~streamrl.Pipeline` with ``add_collector``,
stages and hooks, run by ``streamrl.run``) and a comment says so. Each test asserts what the tutorial shows or
relies on: shapes and keys, specs that check, finite losses, a run that completes with optimizer steps, a
checkpoint on disk.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import InteractionType, TensorDictModule, TensorDictSequential, set_interaction_type
from torch import nn

import streamrl
from streamrl import (
    AdvantageStage,
    Checkpoint,
    Epochs,
    EpsilonAnnealing,
    Evaluate,
    Event,
    EveryBatch,
    LearnerStage,
    MetricsCSV,
    Pipeline,
    SamplerStage,
    TransformStage,
    WriterStage,
)
from streamrl.envs import Bounded, GymEnv, GymWrapper, TransformedEnv, check_env_specs, step_mdp
from streamrl.hooks import CSVSink, Logger
from streamrl.modules import (
    MLP,
    Actor,
    ConvNet,
    DuelingCnnDQNet,
    EGreedyModule,
    NormalParamExtractor,
    ProbabilisticActor,
    QValueActor,
    TanhNormal,
    ValueOperator,
)
from streamrl.objectives import GAE, ClipPPOLoss, DDPGLoss, DQNLoss, HardUpdate, SoftUpdate, TDLambdaEstimator
from streamrl.replay import MultiStep, PrioritizedSampler, RamStorage, RateLimiter, ReplayBuffer
from streamrl.transforms import (
    CatFrames,
    CatTensors,
    Compose,
    DoubleToFloat,
    GrayScale,
    NoopResetEnv,
    ObservationNorm,
    Resize,
    RewardScaling,
    StepCounter,
    ToTensorImage,
)


def finite(value: Any) -> bool:
    return math.isfinite(float(value))


def recorder(pipeline: Pipeline, *kinds: str) -> dict[str, list[dict[str, Any]]]:
    """Subscribe a plain callable to ``kinds`` (TorchRL's ``register_op``) and keep each event's data."""
    seen: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}

    def keep(event: Event) -> None:
        seen[event.kind].append(dict(event.data))

    pipeline.on(kinds, keep)
    return seen


def replay(buffer_size: int, batch_size: int, min_fill: int, updates_per_frame: float, chunk: int,
           sampler: Any = None) -> ReplayBuffer:
    """A RAM replay buffer paced like TorchRL's "n optimizer steps per collected batch" loop."""
    samples_per_insert = updates_per_frame * batch_size
    limiter = RateLimiter(samples_per_insert=samples_per_insert, min_fill=min_fill,
                          tolerance=samples_per_insert * chunk, batch_size=batch_size)
    return ReplayBuffer(RamStorage(buffer_size), sampler=sampler, batch_size=batch_size, limiter=limiter)


# -- 000: coding a pixel-based DQN --------------------------------------------------------------------------------


def make_pixel_env(loc: float = 0.0, scale: float = 1.0, size: int = 32) -> TransformedEnv:
    """Tutorial 000's ``make_env``: rendered CartPole, to tensor, gray, resized, normalised, 4 frames stacked."""
    return TransformedEnv(
        GymEnv("CartPole-v1", from_pixels=True, pixels_only=True, backend="sync", seed=0),
        Compose(
            ToTensorImage(),
            GrayScale(),
            Resize(size, size),
            ObservationNorm(in_keys=["pixels"], loc=loc, scale=scale, standard_normal=True),
            CatFrames(4, dim=-3),  # TorchRL's CatFrames(4, in_keys=["pixels"]) stacks on dim -3 as well
        ),
    )


def test_000_pixel_dqn(tmp_path: Path) -> None:
    # Normalising constants from one reset of the env up to (not including) the ObservationNorm, as the tutorial
    # reads them through ``transform[3].parent``.
    dummy_env = make_pixel_env()
    frame = dummy_env.transform[3].parent.reset()["pixels"]
    assert frame.shape == (1, 1, 32, 32)  # [env, channel, H, W]: gray, resized, not yet stacked
    loc, scale = frame.mean().item(), frame.std().clamp_min(1e-6).item()
    dummy_env.close()
    env = make_pixel_env(loc, scale)
    check_env_specs(env)
    assert env.observation_spec["pixels"].shape == (4, 32, 32)

    # A random rollout, keeping the raw frames next to the processed ones (the tutorial's video of the problem).
    env.transform.insert(0, CatTensors(["pixels"], "pixels_save", del_keys=False))
    random_rollout = env.rollout(max_steps=30)
    assert random_rollout["pixels_save"].shape[-3:] == (400, 600, 3)
    assert random_rollout["pixels"].shape[-3:] == (4, 32, 32)
    assert random_rollout["next", "reward"].shape[:2] == random_rollout.batch_size

    # The model: a dueling CNN (TorchRL's DuelingCnnDQNet(n_actions, 1, cnn_kwargs, mlp_kwargs) order), its greedy
    # actor and epsilon-greedy exploration. The tutorial reads ``action_spec.shape[-1]``; a Categorical spec's
    # shape is () here, ``n`` is the number of actions.
    n_actions = env.action_spec.n
    assert n_actions == 2
    cnn_kwargs = {"num_cells": [8, 16], "kernel_sizes": [6, 4], "strides": [2, 2], "activation": nn.ELU}
    mlp_kwargs = {"depth": 2, "num_cells": [16, 16], "activation": nn.ELU}
    torch.manual_seed(0)
    net = DuelingCnnDQNet(n_actions, 1, cnn_kwargs, mlp_kwargs)
    actor = QValueActor(net, in_key="pixels", spec=env.action_spec)
    td = actor(env.reset())  # sizes the lazy layers
    assert {"action", "action_value", "chosen_action_value"} <= set(td.keys())
    assert td["action_value"].shape == (1, n_actions)
    net.value[-1].bias.data.fill_(20.0)  # the tutorial's init_bias
    assert actor(env.reset())["chosen_action_value"].mean().item() > 10.0
    explore = EGreedyModule(spec=env.action_spec, eps_init=0.1, eps_end=0.05, annealing_frames=96)
    actor_explore = TensorDictSequential(actor, explore)

    # TD(lambda) targets over a trajectory, the tutorial's second variant: V(s) = max_a Q(s, a).
    value = TensorDictModule(lambda pixels: net(pixels).max(-1, keepdim=True).values, in_keys=["pixels"],
                             out_keys=["state_value"])
    trajectory = env.rollout(10, actor_explore, break_when_any_done=False)
    with torch.no_grad():
        trajectory = TDLambdaEstimator(gamma=0.99, lmbda=0.95, value_network=value)(trajectory)
    assert trajectory["value_target"].shape == (*trajectory.batch_size, 1)
    assert torch.isfinite(trajectory["value_target"]).all()
    env.close()

    # Training. TorchRL: ``for data in collector:`` extend a replay buffer, n_optim sampled updates per batch,
    # soft target update, ``update_policy_weights_()``. streamrl has no plain-loop collector yet: the same loop is
    # a pipeline (collector -> replay writer -> sampler -> learner, weights back to the policy).
    total_frames, chunk = 96, 32
    train_env = make_pixel_env(loc, scale)
    loss = DQNLoss(actor, gamma=0.99, in_key="pixels")
    optimizer = torch.optim.Adam(loss.value_net.parameters(), lr=2e-3, betas=(0.9, 0.999))
    buffer = replay(256, batch_size=8, min_fill=32, updates_per_frame=4 / chunk, chunk=chunk)  # n_optim=4
    learner = LearnerStage("learner", loss, optimizer, publish=actor, max_grad_norm=10.0,
                           target_update=SoftUpdate(loss, tau=0.005), device="cpu", report_every=1)
    p = Pipeline("tutorial_000")
    collector = p.add_collector("collect", train_env, actor_explore, frames_per_chunk=chunk,
                                total_frames=total_frames, weights_module=actor, placement="in_process")
    p.add(WriterStage("writer", buffer), SamplerStage("sampler", buffer), learner)
    p.connect(collector.chunks, "writer.chunks", capacity=1)
    p.connect("sampler.batches", "learner.batches", capacity=2)
    p.add_hook(EpsilonAnnealing(explore), group=collector.group)
    seen = recorder(p, "chunk", "optim_step")
    result = streamrl.run(p, tmp_path, handle_signals=False)

    assert result.exit_reason == "completed"
    assert sum(c["chunk_frames"] for c in seen["chunk"]) == total_frames
    assert seen["optim_step"] and seen["optim_step"][-1]["step"] >= 1
    assert all(finite(o["loss"]) and finite(o["grad_norm"]) for o in seen["optim_step"])
    assert explore.eps < 0.1  # annealed towards eps_end as frames came in

    # Evaluation: a greedy rollout of the trained actor, as at the end of the tutorial.
    eval_env = make_pixel_env(loc, scale)
    eval_rollout = eval_env.rollout(max_steps=20, policy=actor)
    assert eval_rollout["action_value"].shape[-1] == n_actions
    eval_env.close()


# -- 001: the Trainer with hooks ----------------------------------------------------------------------------------


def make_trainer_env(obs_norm_sd: dict[str, Any] | None = None, max_steps: int | None = None) -> TransformedEnv:
    """Tutorial 001's ``make_env``: counter, pixels, reward scaling, gray, resized, stacked, then normalised."""
    if obs_norm_sd is None:
        obs_norm_sd = {"standard_normal": True}
    return TransformedEnv(
        GymEnv("CartPole-v1", from_pixels=True, pixels_only=True, backend="sync", seed=0),
        Compose(
            StepCounter(max_steps),
            ToTensorImage(),
            RewardScaling(loc=0.0, scale=0.1),
            GrayScale(),
            Resize(32, 32),
            CatFrames(4, dim=-3),
            ObservationNorm(in_keys=["pixels"], **obs_norm_sd),
        ),
    )


def test_001_trainer_with_hooks(tmp_path: Path) -> None:
    # get_norm_stats: [C, 1, 1] normalising constants (one per stacked frame) from random steps.
    test_env = make_trainer_env()
    test_env.transform[-1].init_stats(num_iter=20, cat_dim=0, reduce_dim=[-1, -2, -4], keep_dims=(-1, -2))
    stats = test_env.transform[-1].state_dict()
    assert stats["loc"].shape == stats["scale"].shape == (4, 1, 1)
    test_env.close()

    # make_model: the tutorial's dueling CNN and QValueActor, epsilon-greedy on top for collection.
    env = make_trainer_env(stats)
    check_env_specs(env)
    torch.manual_seed(0)
    net = DuelingCnnDQNet(env.action_spec.n, 1, {"num_cells": [8, 16], "kernel_sizes": [6, 4], "strides": [2, 2],
                                                 "activation": nn.ELU},
                          {"depth": 2, "num_cells": [16, 16], "activation": nn.ELU})
    actor = QValueActor(net, in_key="pixels", spec=env.action_spec)
    actor(env.reset())
    env.close()
    net.value[-1].bias.data.fill_(2.0)
    explore = EGreedyModule(spec=env.action_spec, eps_init=1.0, eps_end=0.1, annealing_frames=96)
    actor_explore = TensorDictSequential(actor, explore)

    # get_loss_module: DQNLoss owns its target network; TorchRL's SoftUpdate(loss, eps=0.995) is tau=0.005 here.
    loss_module = DQNLoss(actor, gamma=0.99, in_key="pixels")
    target_net_updater = SoftUpdate(loss_module, tau=0.005)
    optimizer = torch.optim.Adam(loss_module.value_net.parameters(), lr=2e-3)
    target_before = [t.clone() for _, t in loss_module.target_pairs()]

    # The Trainer and its hooks, as a pipeline (streamrl has no Trainer class; each TorchRL hook has its place):
    #   collector(postproc=MultiStep)   -> add_collector + TransformStage("nstep", MultiStep(gamma, n))
    #   ReplayBufferTrainer             -> WriterStage + SamplerStage over one ReplayBuffer
    #   UpdateWeights                   -> the learner publishes actor weights to the collector's policy
    #   post_steps: actor_explore.step  -> EpsilonAnnealing(explore) in the collector's group
    #   post_optim: target updater      -> LearnerStage(target_update=...)
    #   LogValidationReward             -> Evaluate(test_env, actor, every_frames=...)
    #   CSVLogger + LogScalar           -> Logger(CSVSink()) and MetricsCSV
    #   trainer.save_trainer            -> Checkpoint
    total_frames, frames_per_batch = 96, 32
    buffer = replay(256, batch_size=8, min_fill=32, updates_per_frame=2 / frames_per_batch, chunk=frames_per_batch)
    learner = LearnerStage("learner", loss_module, optimizer, schedule=EveryBatch(publish_every=1), publish=actor,
                           target_update=target_net_updater, device="cpu", report_every=2)
    p = Pipeline("tutorial_001")
    collector = p.add_collector("collect", make_trainer_env(stats), actor_explore, frames_per_chunk=frames_per_batch,
                                total_frames=total_frames, weights_module=actor, placement="in_process")
    p.add(TransformStage("nstep", MultiStep(0.99, 5)), WriterStage("writer", buffer), SamplerStage("sampler", buffer),
          learner)
    p.connect(collector.chunks, "nstep.chunks", capacity=1)
    p.connect("nstep.chunks", "writer.chunks", capacity=1)
    p.connect("sampler.batches", "learner.batches", capacity=2)
    p.add_hook(EpsilonAnnealing(explore), group=collector.group)
    p.add_hook(Evaluate(make_trainer_env(stats, max_steps=30), actor, every_frames=64, episodes=1),
               Logger(CSVSink()), MetricsCSV(every_frames=32), Checkpoint(every_frames=64))

    # register_op("process_optim_batch", ...): a lockstep hook on "batch" sees (and may edit) each batch.
    batch_keys: list[set[Any]] = []
    p.on("batch", lambda event: batch_keys.append(set(event.data["batch"].keys(include_nested=True))))
    seen = recorder(p, "optim_step", "eval", "checkpoint")
    result = streamrl.run(p, tmp_path, handle_signals=False)

    assert result.exit_reason == "completed"
    assert result.summary["frames"] == total_frames
    assert batch_keys and ("next", "gamma") in batch_keys[0]  # n-step rows: the discount of each bootstrap
    assert seen["optim_step"][-1]["step"] == len(batch_keys)
    assert all(finite(o["loss"]) for o in seen["optim_step"])
    assert any(not torch.equal(t, t0) for (_, t), t0 in zip(loss_module.target_pairs(), target_before, strict=True))
    assert explore.eps < 1.0
    assert seen["eval"] and finite(seen["eval"][-1]["mean_return"])
    assert seen["checkpoint"] and (tmp_path / "checkpoint.pt").is_file()
    with open(tmp_path / "scalars.csv") as f:
        names = {row["name"] for row in csv.DictReader(f)}
    assert {"train/loss", "train/grad_norm", "eval/return"} <= names
    assert (tmp_path / "metrics.csv").is_file()


# -- 002: PPO on InvertedDoublePendulum ---------------------------------------------------------------------------


def test_002_ppo_inverted_double_pendulum(tmp_path: Path) -> None:
    pytest.importorskip("mujoco", reason="tutorial 002's env needs mujoco: pip install -e '.[mujoco]'")
    frames_per_batch, total_frames, num_epochs, sub_batch_size = 100, 200, 2, 50
    num_cells, lr, max_grad_norm = 16, 3e-4, 1.0
    gamma, lmbda, clip_epsilon, entropy_eps = 0.99, 0.95, 0.2, 1e-4

    def make_env() -> TransformedEnv:
        base_env = GymEnv("InvertedDoublePendulum-v5", backend="sync", seed=0)
        return TransformedEnv(base_env, Compose(ObservationNorm(in_keys=["observation"]), DoubleToFloat(),
                                                StepCounter()))

    env = make_env()
    env.transform[0].init_stats(num_iter=50, reduce_dim=0, cat_dim=0)
    assert env.transform[0].loc.shape == env.observation_spec["observation"].shape == (9,)
    assert env.observation_spec["observation"].dtype == torch.float32  # DoubleToFloat
    check_env_specs(env)
    rollout = env.rollout(3)
    assert rollout.batch_size == (1, 3)
    assert {"observation", "step_count", ("next", "reward"), ("next", "terminated")} <= set(
        rollout.keys(include_nested=True))

    # Policy: an MLP whose output splits into loc and scale, a TanhNormal bounded by the action spec; a critic.
    act_dim = env.action_spec.shape[-1]
    torch.manual_seed(0)
    actor_net = nn.Sequential(MLP(2 * act_dim, num_cells=[num_cells] * 3, activation=nn.Tanh), NormalParamExtractor())
    # The tutorial also passes the spec's bounds as distribution_kwargs ({"min": ..., "max": ...}); here the Bounded
    # spec alone sets the TanhNormal's bounds (giving both is refused as "bounds given twice").
    policy_module = ProbabilisticActor(
        TensorDictModule(actor_net, in_keys=["observation"], out_keys=["loc", "scale"]),
        spec=env.action_spec, in_keys=["loc", "scale"], distribution_class=TanhNormal, return_log_prob=True)
    value_module = ValueOperator(MLP(1, num_cells=[num_cells] * 3, activation=nn.Tanh), in_keys=["observation"])
    td = value_module(policy_module(env.reset()))
    assert {"loc", "scale", "action", "sample_log_prob", "state_value"} <= set(td.keys())
    assert env.action_spec.is_in(td["action"])

    advantage_module = GAE(gamma=gamma, lmbda=lmbda, value_network=value_module, average_gae=True)
    loss_module = ClipPPOLoss(policy_module, value_module, clip_epsilon=clip_epsilon, entropy_bonus=bool(entropy_eps),
                              entropy_coef=entropy_eps, critic_coef=1.0, loss_critic_type="smooth_l1")

    # One pass of the tutorial's inner loop by hand: advantage on a batch, a minibatch loss, its gradient.
    data = env.rollout(20, policy_module, break_when_any_done=False)
    with torch.no_grad():
        advantage_module(data)
    assert data["advantage"].shape == data["value_target"].shape == (1, 20, 1)
    loss_vals = loss_module(data.reshape(-1)[:sub_batch_size])
    loss_value = loss_vals["loss_objective"] + loss_vals["loss_critic"] + loss_vals["loss_entropy"]
    loss_value.backward()
    assert torch.isfinite(loss_value)
    assert all(torch.isfinite(p.grad).all() for p in loss_module.parameters() if p.grad is not None)
    loss_module.zero_grad()
    env.close()

    # Training. TorchRL: ``for data in collector:`` then, per epoch, GAE and shuffled minibatches from a replay
    # buffer (SamplerWithoutReplacement), a clipped gradient step, and a cosine LR. streamrl has no plain-loop
    # collector yet: the same loop is a pipeline (collector -> GAE stage -> learner with Epochs).
    updates = total_frames // frames_per_batch * num_epochs * (frames_per_batch // sub_batch_size)
    optim = torch.optim.Adam(loss_module.parameters(), lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optim, updates, 0.0)
    learner = LearnerStage("learner", loss_module, optim, schedule=Epochs(num_epochs, sub_batch_size),
                           publish=policy_module, max_grad_norm=max_grad_norm, scheduler=scheduler, device="cpu",
                           report_every=1)
    train_env = make_env()
    train_env.transform[0].load_state_dict(env.transform[0].state_dict())
    p = Pipeline("tutorial_002")
    collector = p.add_collector("collect", train_env, policy_module, frames_per_chunk=frames_per_batch,
                                total_frames=total_frames, placement="in_process", record=("action", "sample_log_prob"))
    p.add(AdvantageStage("gae", advantage_module), learner)
    p.connect(collector.chunks, "gae.chunks", capacity=1)
    p.connect("gae.chunks", "learner.batches", capacity=1)
    seen = recorder(p, "optim_step")
    result = streamrl.run(p, tmp_path, handle_signals=False)

    assert result.exit_reason == "completed"
    assert result.summary["frames"] == total_frames
    assert seen["optim_step"][-1]["step"] == updates
    last = seen["optim_step"][-1]
    assert all(finite(last[k]) for k in ("loss_objective", "loss_critic", "loss_entropy", "grad_norm"))
    assert optim.param_groups[0]["lr"] < lr  # the cosine schedule stepped

    # Evaluation: the deterministic policy (TorchRL's ExplorationType.MEAN / DETERMINISTIC), a finite return.
    eval_env = make_env()
    eval_env.transform[0].load_state_dict(env.transform[0].state_dict())
    with set_interaction_type(InteractionType.DETERMINISTIC), torch.no_grad():
        eval_rollout = eval_env.rollout(50, policy_module)
    assert torch.isfinite(eval_rollout["next", "reward"].sum())
    assert eval_rollout["step_count"].max().item() == eval_rollout.batch_size[-1] - 1
    eval_env.close()


# -- 003: the library tour ----------------------------------------------------------------------------------------


def test_003_library_tour(tmp_path: Path) -> None:
    # Replay buffers: TensorDict rows in, batches out (TorchRL's collate_fn=lambda x: x buffers of plain objects
    # have no counterpart: rows here are TensorDicts with one batch dim).
    rb = ReplayBuffer(RamStorage(100), batch_size=10)
    rb.extend(TensorDict({"a": torch.randn(2, 3)}, batch_size=[2]))
    assert len(rb) == 2
    assert rb.sample(10)["a"].shape == (10, 3)
    # Prioritized: sample, then raise the priority of a row from its TD error; it is drawn more often after.
    torch.manual_seed(0)
    sampler = PrioritizedSampler(alpha=0.7, beta=1.0)
    prb = ReplayBuffer(RamStorage(100), sampler=sampler, batch_size=2)
    prb.extend(TensorDict({"a": torch.randn(2, 3)}, batch_size=[2]))
    sample = prb.sample(2)
    assert {"index", "weight"} <= set(sample.keys()) and sample["weight"].shape == (2,)
    sampler.update_priority(torch.tensor([0, 1]), torch.tensor([100.0, 0.01]))
    drawn = torch.cat([prb.sample(50)["index"] for _ in range(4)])
    assert (drawn == 0).float().mean() > 0.9

    # Envs: a gymnasium env wrapped, or made by name; reset and a random step in TensorDicts.
    wrapped = GymWrapper(gym.make("Pendulum-v1"))
    assert wrapped.observation_spec["observation"].shape == (3,)
    wrapped.close()
    env = GymEnv("Pendulum-v1", backend="sync")
    td = env.rand_step(env.reset())
    assert {"observation", "action", ("next", "observation"), ("next", "reward"), ("next", "done")} <= set(
        td.keys(include_nested=True))
    env.close()
    pixel_env = GymEnv("Pendulum-v1", frame_skip=3, from_pixels=True, pixels_only=False, backend="sync")
    reset = pixel_env.reset()
    assert reset["pixels"].shape[-1] == 3 and reset["pixels"].dtype == torch.uint8
    assert reset["observation"].shape[-1] == 3
    pixel_env.close()

    # Transforms: composed, appended, and each one's parent is the env as it sees it.
    base_env = GymEnv("Pendulum-v1", frame_skip=3, from_pixels=True, pixels_only=False, backend="sync")
    tenv = TransformedEnv(base_env, Compose(NoopResetEnv(3), ToTensorImage()))
    tenv.append_transform(ObservationNorm(in_keys=["pixels"], loc=2, scale=1))
    pixels = tenv.reset()["pixels"]
    assert pixels.dtype == torch.float32 and pixels.shape[-3] == 3  # channels first, in [0, 1] ...
    assert 2.0 <= pixels.min().item() and pixels.max().item() <= 3.0  # ... then x * scale + loc (standard_normal off)
    assert isinstance(tenv.transform[2].parent, TransformedEnv)
    tenv.close()

    # Modules: MLP and ConvNet; keyed modules chained; a deterministic actor projected into its spec; a
    # probabilistic actor that samples, or returns its mode under DETERMINISTIC.
    assert MLP(4, num_cells=[32, 64], activation=nn.ELU)(torch.randn(10, 3)).shape == (10, 4)
    cnn = ConvNet(num_cells=[32, 64], kernel_sizes=[8, 4], strides=[2, 1])
    assert cnn(torch.randn(10, 3, 32, 32)).shape == (10, 64 * 10 * 10)  # flattened, like TorchRL's SquashDims
    backbone = TensorDictModule(nn.Linear(5, 3), in_keys=["input"], out_keys=["hidden"])
    head = TensorDictModule(nn.Linear(3, 4), in_keys=["hidden"], out_keys=["action"])
    # TorchRL's MLP concatenates several inputs (TensorDictModule(MLP(...), in_keys=["hidden", "action"])); ours is
    # an nn.Sequential of one input: ValueOperator does the concatenation.
    value = ValueOperator(MLP(1, num_cells=[4, 5]), in_keys=["hidden", "action"], out_keys=["value"])
    out = TensorDictSequential(backbone, head, value)(TensorDict({"input": torch.randn(3, 5)}, [3]))
    assert out["value"].shape == (3, 1)
    # TorchRL's Bounded(low, high, shape), float32 by default.
    spec = Bounded(-1.0, 1.0, (3,))
    actor = Actor(nn.Linear(5, 3), in_keys=["obs"], spec=spec)
    action = actor(TensorDict({"obs": torch.randn(5) * 100}, []))["action"]
    assert action.shape == (3,) and spec.is_in(action)
    prob = ProbabilisticActor(
        TensorDictModule(nn.Sequential(nn.Linear(5, 4), NormalParamExtractor()), in_keys=["input"],
                         out_keys=["loc", "scale"]), spec=Bounded(-1.0, 1.0, (2,)))
    inputs = TensorDict({"input": torch.randn(3, 5)}, [3])
    with set_interaction_type(InteractionType.DETERMINISTIC):
        mode = prob(inputs.clone())["action"]
        assert torch.equal(prob(inputs.clone())["action"], mode)
    assert not torch.equal(prob(inputs.clone())["action"], mode)  # RANDOM (the default) samples

    # A rollout by hand (act, step, step_mdp) equals env.rollout with the same seed.
    env = GymEnv("Pendulum-v1", backend="sync")
    torch.manual_seed(0)
    policy = Actor(nn.Linear(3, 1), spec=env.action_spec)
    env.set_seed(0)
    tensordict, steps = env.reset(), []
    with torch.no_grad():
        for _ in range(20):
            policy(tensordict)
            steps.append(env.step(tensordict).clone())
            tensordict = step_mdp(tensordict)
        by_hand = torch.stack(steps, dim=-1)  # [env, T]
        env.set_seed(0)
        rolled = env.rollout(20, policy)
    assert rolled.batch_size == by_hand.batch_size == (1, 20)
    assert torch.equal(rolled["observation"], by_hand["observation"])
    assert torch.equal(rolled["next", "reward"], by_hand["next", "reward"])
    env.close()

    # Collectors: TorchRL's ``for i, d in enumerate(collector): ... collector.update_policy_weights_()``. streamrl
    # has no plain-loop collector yet: a collector in a pipeline sends chunks [num_envs, T] on (here into a replay
    # buffer), and a "chunk" hook sees each one.
    rb = ReplayBuffer(RamStorage(1_000), batch_size=16)
    p = Pipeline("tutorial_003")
    collector = p.add_collector("collect", GymEnv("Pendulum-v1", num_envs=3, backend="sync", seed=0), policy,
                                frames_per_chunk=60, total_frames=300, weights_from=None, placement="in_process")
    p.add(WriterStage("writer", rb))
    p.connect(collector.chunks, "writer.chunks", capacity=1)
    chunks: list[TensorDict] = []
    p.on("chunk", lambda event: chunks.append(event.data["chunk"].clone()))
    result = streamrl.run(p, tmp_path, handle_signals=False)
    assert result.exit_reason == "completed" and result.summary["frames"] == 300
    assert len(chunks) == 5 and all(c.batch_size == (3, 20) for c in chunks)
    assert {"traj_id", "step_count", "policy_version", ("next", "observation")} <= set(
        chunks[0].keys(include_nested=True))
    assert len(rb) == 300

    # Losses: a DDPG loss on a batch of transitions, one term per objective, each finite.
    q_value = ValueOperator(MLP(1, in_features=4, num_cells=[8]), in_keys=["observation", "action"])
    loss_fn = DDPGLoss(policy, q_value, gamma=0.99)
    loss_td = loss_fn(rb.sample(16))
    # TorchRL's names: loss_actor and loss_value ("loss" is their sum).
    assert {"loss_actor", "loss_value", "loss"} <= set(loss_td.keys())
    assert all(torch.isfinite(loss_td[k]) for k in ("loss_actor", "loss_value", "loss"))


# -- 004: loss modules (DDPG on Pendulum) -------------------------------------------------------------------------


def test_004_loss_modules(tmp_path: Path) -> None:
    env = GymEnv("Pendulum-v1", backend="sync", seed=0)
    n_obs = env.observation_spec["observation"].shape[-1]
    n_act = env.action_spec.shape[-1]
    assert (n_obs, n_act) == (3, 1)
    torch.manual_seed(0)
    actor = Actor(MLP(n_act, in_features=n_obs, num_cells=[32, 32]), spec=env.action_spec)
    value_net = ValueOperator(MLP(1, in_features=n_obs + n_act, num_cells=[32, 32]), in_keys=["observation", "action"])
    ddpg_loss = DDPGLoss(actor, value_net)  # TorchRL's actor_network=/value_network= are positional here

    rollout = env.rollout(max_steps=100, policy=actor)
    assert rollout.batch_size == (1, 100)  # Pendulum never terminates; truncation comes at 200 steps
    loss_vals = ddpg_loss(rollout.reshape(-1))
    total_loss = sum(val for key, val in loss_vals.items() if key.startswith("loss_"))
    assert isinstance(total_loss, torch.Tensor) and torch.isfinite(total_loss)
    assert torch.allclose(total_loss, loss_vals["loss"])

    # Training a loss module: an optimizer over its parameters() trains the actor and the critic. (They include
    # the target copies too, frozen with requires_grad=False: TorchRL keeps those as buffers.)
    optim = torch.optim.Adam(ddpg_loss.parameters())
    assert sum(p.numel() for p in ddpg_loss.parameters() if p.requires_grad) == sum(
        p.numel() for m in (actor, value_net) for p in m.parameters())
    before = [p.detach().clone() for p in ddpg_loss.parameters()]
    total_loss.backward()
    optim.step()
    optim.zero_grad()
    assert any(not torch.equal(p, b) for p, b in zip(ddpg_loss.parameters(), before, strict=True))

    # Target parameters: the loss owns them, updaters move them. TorchRL's SoftUpdate(loss, eps=0.99) is tau=0.01.
    targets = [t.clone() for _, t in ddpg_loss.target_pairs()]
    updater = SoftUpdate(ddpg_loss, tau=0.01)
    updater.step()
    for (online, target), old in zip(ddpg_loss.target_pairs(), targets, strict=True):
        torch.testing.assert_close(target, old + 0.01 * (online.detach() - old))
    hard = HardUpdate(ddpg_loss, every=2)
    hard.step()
    assert any(not torch.equal(o, t) for o, t in ddpg_loss.target_pairs())  # not yet: every 2 steps
    hard.step()
    assert all(torch.equal(o, t) for o, t in ddpg_loss.target_pairs())

    # The same loss in a training run: the learner calls the optimizer and the updater after every step.
    buffer = replay(512, batch_size=16, min_fill=64, updates_per_frame=0.25, chunk=32)
    learner = LearnerStage("learner", ddpg_loss, torch.optim.Adam(ddpg_loss.parameters(), lr=1e-3), publish=actor,
                           target_update=SoftUpdate(ddpg_loss, tau=0.01), device="cpu", report_every=4)
    p = Pipeline("tutorial_004")
    collector = p.add_collector("collect", env, actor, frames_per_chunk=32, total_frames=192, weights_module=actor,
                                placement="in_process")
    p.add(WriterStage("writer", buffer), SamplerStage("sampler", buffer), learner)
    p.connect(collector.chunks, "writer.chunks", capacity=1)
    p.connect("sampler.batches", "learner.batches", capacity=2)
    p.add_hook(Checkpoint())
    seen = recorder(p, "optim_step")
    result = streamrl.run(p, tmp_path, handle_signals=False)
    assert result.exit_reason == "completed" and result.summary["frames"] == 192
    assert seen["optim_step"][-1]["step"] >= 16
    assert all(finite(o["loss_actor"]) and finite(o["loss_value"]) for o in seen["optim_step"])
    assert (tmp_path / "checkpoint.pt").is_file()
