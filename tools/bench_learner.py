"""Learner throughput: streamrl's learner against hand-written training loops, in updates per second.

    python tools/bench_learner.py                       # CUDA when available, else CPU; 3 s per measurement
    python tools/bench_learner.py --device cpu --seconds 1
    python tools/bench_learner.py --updates 2000 --batch-sizes 128 4096 --capture off --only dqn

Three workloads, each measured three ways on the same device in one run:

* ``dqn`` at batch 128 and 4,096 (``--batch-sizes``): double DQN on `pipelines/dqn_cartpole.py`'s Q-network (the
  ``hidden`` config, 2x128 ReLU MLP), Huber loss, gradient clipping, fused Adam;
* ``ppo`` at minibatch 64: one clipped-PPO minibatch update of `pipelines/ppo_inverted_double_pendulum.py`'s
  actor and critic (obs 9, action 1, 3x256 tanh MLPs, TanhNormal policy, entropy bonus, clipping at 1.0).

Columns (updates/s, higher is better):

* ``streamrl``: the library as a user runs it. DQN: the pipeline's own ``build`` (``--set batch_size``, ``device``,
  ``capture`` through ``apply_overrides``) with the collector and writer removed; its replay is pre-filled with
  random CartPole-like rows (``buffer_size``, 100,000), and the sampler + learner stages run under
  ``streamrl.run``, so the sampler stage is part of the figure (on CUDA: the replay mirrored on the device and
  batches sent as indices, or pinned host batches copied over, as the sampler decides). PPO: the pipeline's loss,
  optimizer, cosine scheduler and ``LearnerStage(schedule=Epochs(10, 64))``, fed 1,000-row chunks (with
  ``advantage``, ``value_target``, ``sample_log_prob``) by a small source stage; mujoco is not needed (16 updates
  per epoch, the last of 40 rows). The rate is timed from the learner's ``optim_step`` events (one every
  ``report_every`` updates), from the first at or after step ``--warmup`` to the last one (start-up, graph capture
  and shutdown excluded); a first short run per workload sizes the timed runs to ``--seconds``.
* ``eager``: a hand-written PyTorch loop doing the same work with the data already on the device: index draw on
  the device + ``index_select`` per column, the loss, ``backward``, ``get_total_norm`` + ``clip_grads_with_norm_``
  (foreach), fused Adam. DQN: 100,000 rows, ``randint`` indices, and a soft target update every step
  (``torch._foreach_lerp_``: at least the work of the pipeline's hard update every 24 steps). PPO: 64 of the
  1,000 rows, the first of a random permutation (``argsort`` of uniform noise, drawable inside a graph). What
  the hand loops leave out (non-finite guard, reports, LR scheduler, events, streams) is the library's overhead.
* ``graph``: the same loop captured whole in one CUDA graph (index draw included) and replayed once per update;
  ``n/a`` (``null`` in the JSON) without CUDA.
* ``vs_eager`` and ``vs_graph``: streamrl / eager and streamrl / graph, the median over the rounds of the ratio
  measured side by side in each round; ``best_vs_eager`` / ``best_vs_graph``: the ratios of the best rates.

Each measurement warms up, then runs for ``--seconds`` (or ``--updates``). The three variants run interleaved,
``--rounds`` times (default 3), and the best of each is kept (the machine is noisy). The bar: streamrl >= 0.8 x
graph on a GPU, >= 0.9 x eager on a CPU. One table line per measurement as it goes; the last line is JSON::

    {"device": "cuda", "cores": 16, "torch_threads": 16,
     "dqn": {"128": {"streamrl": x, "eager": y, "graph": z, "vs_eager": ..., "vs_graph": ..., ...}, "4096": {...}},
     "ppo": {"64": {...}}}
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn

import streamrl
from streamrl import MLP, ClipPPOLoss, Epochs, LearnerStage, Pipeline, ProbabilisticActor, ValueOperator
from streamrl.config import apply_overrides
from streamrl.events import Event
from streamrl.loader import load_module, module_name_for
from streamrl.testing import ListSource, random_chunks

ROOT = Path(__file__).resolve().parents[1]
DQN_PIPELINE = ROOT / "pipelines" / "dqn_cartpole.py"
PPO_PIPELINE = ROOT / "pipelines" / "ppo_inverted_double_pendulum.py"
VARIANTS = ("streamrl", "eager", "graph")
OBS_DIM, N_ACTIONS = 4, 2  # CartPole
PPO_OBS_DIM, PPO_ACT_DIM, PPO_CHUNK = 9, 1, 1_000  # InvertedDoublePendulum, one chunk per learner batch
SOFT_TAU = 0.005  # the hand-written DQN loop's soft target update
CALIBRATION_UPDATES = 100  # timed steps of the first streamrl run of a workload, which sizes the later ones

Update = Callable[[], None]


# -- timing -----------------------------------------------------------------------------------------------------
class StepClock:
    """Times the learner from its ``optim_step`` events: steps per second from step ``warmup`` to the last one."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None

    def __call__(self, event: Event) -> None:
        step = event.data.get("step")
        if step is None:
            return
        if self.first is None and step >= self.warmup:
            self.first = (step, event.time)
        self.last = (step, event.time)

    def rate(self, context: str) -> tuple[float, int, float]:
        """(updates/s, timed updates, timed seconds); ``context`` goes into the error when nothing was timed."""
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            raise RuntimeError(f"expected optim_step events from the learner after step {self.warmup} and a later "
                               f"one, got first={self.first}, last={self.last} (step, seconds), {context}; give "
                               "more --updates or --seconds")
        steps, seconds = self.last[0] - self.first[0], self.last[1] - self.first[1]
        return steps / seconds, steps, seconds


def run_timed(pipeline: Pipeline, device: torch.device, clock: StepClock) -> tuple[float, int, float]:
    """Run ``pipeline`` to its end with ``clock`` on its ``optim_step`` events; (updates/s, updates, seconds)."""
    pipeline.on("optim_step", clock)
    with tempfile.TemporaryDirectory() as run_dir:
        result = streamrl.run(pipeline, run_dir, device=device.type, handle_signals=False)
    if result.exit_reason != "completed":
        raise RuntimeError(f"the benchmark run of {pipeline.name!r} ended {result.exit_reason!r}, not completed: "
                           f"{result.summary}")
    return clock.rate(f"{result.summary.get('optim_steps')} optimizer steps in the run")


def time_loop(update: Update, device: torch.device, *, seconds: float, updates: int | None,
              warmup: int) -> tuple[float, int, float]:
    """(updates/s, updates, seconds) of ``update`` called in a loop: ``warmup`` calls, then ``updates`` calls or
    as many as fit in ``seconds`` (checked every 10 calls), the device synchronized before each clock reading."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        update()
    sync()
    done = 0
    start = time.perf_counter()
    while (done < updates) if updates is not None else (time.perf_counter() - start < seconds):
        for _ in range(10 if updates is None else min(10, updates - done)):
            update()
        done += 10 if updates is None else min(10, updates - done)
    sync()
    elapsed = time.perf_counter() - start
    return done / elapsed, done, elapsed


def capture_graph(update: Update, zero_grad: Callable[[], None], device: torch.device) -> Update:
    """``update`` captured whole in a CUDA graph (torch docs, "whole network capture"): a few warm-up calls on a
    side stream, gradients set to None so that backward allocates them from the graph's pool, then one captured
    call. Returns the graph's ``replay``: each call is one update on the same static tensors."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            zero_grad()
            update()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    zero_grad()
    with torch.cuda.graph(graph):
        update()
    return graph.replay


def clip_and_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, max_grad_norm: float) -> None:
    """Global gradient-norm clipping (foreach, no host sync) and the optimizer step."""
    norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm, foreach=True)
    optimizer.step()


def adam(params: list[nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """Fused Adam; capturable on CUDA (its step counters stay on the device, so a CUDA graph can hold the step)."""
    return torch.optim.Adam(params, lr=lr, fused=True, capturable=device.type == "cuda")


# -- DQN --------------------------------------------------------------------------------------------------------
class HandDQN:
    """A hand-written double-DQN update on a replay of ``rows`` random CartPole-like transitions on the device."""

    def __init__(self, cfg: Any, device: torch.device, batch: int, rows: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.obs = torch.randn(rows, OBS_DIM, generator=gen).to(device)
        self.action = torch.randint(0, N_ACTIONS, (rows,), generator=gen).to(device)
        self.reward = torch.ones(rows, device=device)
        self.next_obs = torch.randn(rows, OBS_DIM, generator=gen).to(device)
        self.terminated = (torch.rand(rows, generator=gen) < 0.1).float().to(device)
        layers: list[nn.Module] = []
        width = OBS_DIM
        for cells in cfg.hidden:
            layers += [nn.Linear(width, cells), nn.ReLU()]
            width = cells
        self.net = nn.Sequential(*layers, nn.Linear(width, N_ACTIONS)).to(device)
        self.target = copy.deepcopy(self.net).requires_grad_(False)
        self.params = list(self.net.parameters())
        self.target_params = list(self.target.parameters())
        self.optimizer = adam(self.params, cfg.lr, device)
        self.gamma, self.max_grad_norm = cfg.gamma, cfg.max_grad_norm
        self.rows, self.batch, self.device = rows, batch, device

    def update(self) -> None:
        """One update: draw, gather, double-DQN Huber loss, backward, clip, Adam, soft target update."""
        idx = torch.randint(0, self.rows, (self.batch,), device=self.device)
        obs, next_obs = self.obs.index_select(0, idx), self.next_obs.index_select(0, idx)
        action, reward = self.action.index_select(0, idx), self.reward.index_select(0, idx)
        terminated = self.terminated.index_select(0, idx)
        both = self.net(torch.cat([obs, next_obs]))
        q = both[: self.batch].gather(1, action[:, None]).squeeze(1)
        with torch.no_grad():
            best = both[self.batch:].argmax(1, keepdim=True)
            next_q = self.target(next_obs).gather(1, best).squeeze(1)
            target = reward + self.gamma * (1.0 - terminated) * next_q
        loss = nn.functional.smooth_l1_loss(q, target)
        loss.backward()
        clip_and_step(self.params, self.optimizer, self.max_grad_norm)
        with torch.no_grad():
            torch._foreach_lerp_(self.target_params, self.params, SOFT_TAU)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def eager(self) -> None:
        self.zero_grad()
        self.update()


def streamrl_dqn(module: ModuleType, device: torch.device, batch: int, capture: str, *, updates: int,
                 warmup: int) -> tuple[float, int, float]:
    """(updates/s, updates, seconds) of dqn_cartpole's sampler + learner stages, ``warmup + updates`` steps."""
    defaults = module.Config()  # at least min_fill frames: sampling starts only then
    frames = max(math.ceil((warmup + updates) / defaults.updates_per_frame), defaults.min_fill)
    cfg = apply_overrides(module.Config(), [f"device={device.type}", f"batch_size={batch}", f"capture={capture}",
                                            f"total_frames={frames}", "eval_every=1_000_000_000"])
    p = module.build(cfg)
    for name in ("collect_env", "collect_policy", "writer"):
        del p.stages[name]
        del p.stage_group[name]
    p.edges = [e for e in p.edges if {e.src_stage, e.dst_stage}.isdisjoint({"collect_env", "collect_policy", "writer"})]
    replay = p.stages["sampler"].buffer
    replay.storage = streamrl.RamStorage(cfg.buffer_size)
    for chunk in random_chunks(max(1, cfg.buffer_size // 1000), num_envs=10, steps=100):
        replay.extend(chunk)
    replay.limiter.inserted(frames)  # the sampler serves frames * updates_per_frame batches, then ends
    replay.limiter.close_inserts()
    return run_timed(p, device, StepClock(warmup))


# -- PPO --------------------------------------------------------------------------------------------------------
def tanh_normal_log_prob(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log-density of ``a = tanh(x)``, ``x ~ Normal(loc, scale)``, per row: Normal log-prob of ``x`` minus
    ``log(1 - tanh(x)^2)`` (written stably), summed over the action dims."""
    normal = -((x - loc) ** 2) / (2.0 * scale**2) - scale.log() - 0.5 * math.log(2.0 * math.pi)
    log_det = 2.0 * (math.log(2.0) - x - nn.functional.softplus(-2.0 * x))
    return (normal - log_det).sum(-1)


class HandPPO:
    """A hand-written clipped-PPO minibatch update on a 1,000-row chunk on the device (TanhNormal in [-1, 1])."""

    SCALE_BIAS = math.log(math.expm1(1.0 - 0.01))  # NormalParamExtractor's biased softplus: scale 1 at 0

    def __init__(self, cfg: Any, device: torch.device, minibatch: int, seed: int = 0) -> None:
        torch.manual_seed(seed)

        def mlp(out: int) -> nn.Sequential:
            layers: list[nn.Module] = []
            width = PPO_OBS_DIM
            for _ in range(3):
                layers += [nn.Linear(width, cfg.num_cells), nn.Tanh()]
                width = cfg.num_cells
            return nn.Sequential(*layers, nn.Linear(width, out)).to(device)

        self.actor, self.critic = mlp(2 * PPO_ACT_DIM), mlp(1)
        self.params = list(self.actor.parameters()) + list(self.critic.parameters())
        self.optimizer = adam(self.params, cfg.lr, device)
        self.clip_epsilon, self.entropy_coef, self.max_grad_norm = cfg.clip_epsilon, cfg.entropy_coef, cfg.max_grad_norm
        self.obs = torch.randn(PPO_CHUNK, PPO_OBS_DIM, device=device)
        with torch.no_grad():  # actions and their log-probabilities from the acting (initial) policy
            loc, scale = self.dist(self.obs)
            x = loc + scale * torch.randn_like(loc)
            self.action = torch.tanh(x)
            self.sample_log_prob = tanh_normal_log_prob(self.atanh(self.action), loc, scale)
        self.advantage = torch.randn(PPO_CHUNK, device=device)
        self.value_target = torch.randn(PPO_CHUNK, device=device)
        self.minibatch, self.device = minibatch, device

    def dist(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.actor(obs).chunk(2, -1)
        return loc, (nn.functional.softplus(raw + self.SCALE_BIAS) + 0.01).clamp_min(1e-4)

    @staticmethod
    def atanh(action: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(action.dtype).eps
        return torch.atanh(action.clamp(-1.0 + eps, 1.0 - eps))

    def update(self) -> None:
        """One update: draw 64 of the 1,000 rows (the first of a random permutation), clipped objective,
        smooth-L1 critic loss, entropy estimate ``-log_prob(rsample)``, backward, clip, Adam."""
        idx = torch.rand(PPO_CHUNK, device=self.device).argsort()[: self.minibatch]
        obs, action = self.obs.index_select(0, idx), self.action.index_select(0, idx)
        acting, advantage = self.sample_log_prob.index_select(0, idx), self.advantage.index_select(0, idx)
        value_target = self.value_target.index_select(0, idx)
        loc, scale = self.dist(obs)
        ratio = (tanh_normal_log_prob(self.atanh(action), loc, scale) - acting).exp()
        eps = self.clip_epsilon
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(1.0 - eps, 1.0 + eps) * advantage)
        loss_critic = nn.functional.smooth_l1_loss(self.critic(obs).squeeze(-1), value_target)
        entropy = -tanh_normal_log_prob(loc + scale * torch.randn_like(loc), loc, scale).mean()
        loss = -surrogate.mean() + loss_critic - self.entropy_coef * entropy
        loss.backward()
        clip_and_step(self.params, self.optimizer, self.max_grad_norm)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def eager(self) -> None:
        self.zero_grad()
        self.update()


def streamrl_ppo(module: ModuleType, device: torch.device, capture: str, *, updates: int,
                 warmup: int) -> tuple[float, int, float]:
    """(updates/s, updates, seconds) of a LearnerStage built like ppo_inverted_double_pendulum's, on chunks of
    1,000 random rows, for at least ``warmup + updates`` optimizer steps."""
    cfg = module.Config()
    torch.manual_seed(cfg.seed)
    cells = (cfg.num_cells,) * 3
    params = TensorDictModule(nn.Sequential(MLP(2 * PPO_ACT_DIM, in_features=PPO_OBS_DIM, num_cells=cells,
                                                activation=nn.Tanh), NormalParamExtractor()),
                              in_keys=["observation"], out_keys=["loc", "scale"])
    actor = ProbabilisticActor(params)  # TanhNormal in [-1, 1], the env's action bounds
    critic = ValueOperator(MLP(1, in_features=PPO_OBS_DIM, num_cells=cells, activation=nn.Tanh))
    loss = ClipPPOLoss(actor, critic, clip_epsilon=cfg.clip_epsilon, entropy_bonus=cfg.entropy_coef > 0,
                       entropy_coef=cfg.entropy_coef, critic_coef=1.0, loss_critic_type="smooth_l1")
    optimizer = torch.optim.Adam(loss.parameters(), lr=cfg.lr, fused=True)
    per_chunk = cfg.epochs * math.ceil(PPO_CHUNK / cfg.minibatch_size)
    total = (cfg.total_frames // PPO_CHUNK) * per_chunk
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total), 0.0)
    learner = LearnerStage("learner", loss, optimizer, schedule=Epochs(cfg.epochs, cfg.minibatch_size),
                           publish=actor, max_grad_norm=cfg.max_grad_norm, scheduler=scheduler,
                           device=device.type, capture=capture)
    chunks = []
    for _ in range(4):
        with torch.no_grad():
            chunk = actor(TensorDict({"observation": torch.randn(PPO_CHUNK, PPO_OBS_DIM)}, [PPO_CHUNK]))
        chunk.set("advantage", torch.randn(PPO_CHUNK, 1))
        chunk.set("value_target", torch.randn(PPO_CHUNK, 1))
        chunks.append(chunk.select("observation", "action", "sample_log_prob", "advantage", "value_target"))
    count = math.ceil((warmup + updates) / per_chunk) + 1
    p = Pipeline("bench_ppo").add(ListSource("chunks", [chunks[i % len(chunks)] for i in range(count)]), learner)
    p.connect("chunks.items", "learner.batches", capacity=1)
    return run_timed(p, device, StepClock(warmup))


# -- the benchmark ----------------------------------------------------------------------------------------------
def measure(workload: str, size: int, device: torch.device, args: argparse.Namespace, modules: dict[str, ModuleType],
            ) -> dict[str, float | None]:
    """Best updates/s of each variant over ``--rounds`` interleaved rounds, and the ratios: the median over rounds
    of each round's side-by-side ratio (robust to the machine's drift), and the ratio of the bests."""
    if workload == "dqn":
        cfg = modules["dqn"].Config()
        hands = [HandDQN(cfg, device, size, cfg.buffer_size) for _ in range(2)]

        def run_streamrl(n: int) -> tuple[float, int, float]:
            return streamrl_dqn(modules["dqn"], device, size, args.capture, updates=n, warmup=args.warmup)
    else:
        cfg = modules["ppo"].Config()
        hands = [HandPPO(cfg, device, size) for _ in range(2)]  # type: ignore[misc]

        def run_streamrl(n: int) -> tuple[float, int, float]:
            return streamrl_ppo(modules["ppo"], device, args.capture, updates=n, warmup=args.warmup)

    eager, hand_for_graph = hands
    graph = capture_graph(hand_for_graph.update, hand_for_graph.zero_grad, device) if device.type == "cuda" else None
    best: dict[str, float | None] = {name: None for name in VARIANTS}
    ratios: dict[str, list[float]] = {"eager": [], "graph": []}
    streamrl_rate: float | None = None
    if args.updates is None:  # size the timed streamrl runs from a short first one (also its warm-up)
        streamrl_rate = run_streamrl(CALIBRATION_UPDATES)[0]
    for round_ in range(1, args.rounds + 1):
        rates: dict[str, float] = {}
        for name in VARIANTS:
            if name == "graph" and graph is None:
                print(f"{workload:4s} {size:5d}  round {round_}  {name:8s}       n/a (no CUDA)", flush=True)
                continue
            if name == "streamrl":
                n = args.updates if args.updates is not None else max(20, round(streamrl_rate * args.seconds))
                rate, steps, seconds = run_streamrl(n)
                streamrl_rate = rate
            else:
                update = eager.eager if name == "eager" else graph
                assert update is not None
                rate, steps, seconds = time_loop(update, device, seconds=args.seconds, updates=args.updates,
                                                 warmup=args.warmup)
            best[name] = max(rate, best[name] or 0.0)
            rates[name] = rate
            print(f"{workload:4s} {size:5d}  round {round_}  {name:8s} {rate:10.1f} updates/s  ({steps} updates in "
                  f"{seconds:.2f} s)", flush=True)
        for name in ratios:
            if name in rates:
                ratios[name].append(rates["streamrl"] / rates[name])
    s, e, g = best["streamrl"], best["eager"], best["graph"]
    assert s is not None and e is not None
    out = {"streamrl": round(s, 1), "eager": round(e, 1), "graph": None if g is None else round(g, 1),
           "vs_eager": round(statistics.median(ratios["eager"]), 3),
           "vs_graph": round(statistics.median(ratios["graph"]), 3) if ratios["graph"] else None,
           "best_vs_eager": round(s / e, 3), "best_vs_graph": None if g is None else round(s / g, 3)}
    print(f"{workload:4s} {size:5d}  best: {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="device of all measurements (default: cuda when available, else cpu)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement (default 3)")
    parser.add_argument("--updates", type=int, default=None, help="timed updates per measurement instead of seconds")
    parser.add_argument("--warmup", type=int, default=50, help="untimed updates before each measurement (default 50)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 4096], help="DQN batch sizes")
    parser.add_argument("--capture", choices=["auto", "graph", "compile", "off"], default="auto",
                        help="streamrl's learner capture setting (the pipelines' `capture` config; default auto)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement (default 3)")
    parser.add_argument("--only", choices=["dqn", "ppo"], default=None, help="run one workload only")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False here; use --device cpu")
    modules = {name: load_module(path, module_name_for(path))
               for name, path in (("dqn", DQN_PIPELINE), ("ppo", PPO_PIPELINE))}
    budget = f"{args.updates} updates" if args.updates is not None else f"{args.seconds:g} s"
    print(f"device {device}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}; {budget} per measurement", flush=True)
    results: dict[str, Any] = {"device": device.type, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if args.only in (None, "dqn"):
        results["dqn"] = {str(b): measure("dqn", b, device, args, modules) for b in args.batch_sizes}
    if args.only in (None, "ppo"):
        minibatch = modules["ppo"].Config().minibatch_size
        results["ppo"] = {str(minibatch): measure("ppo", minibatch, device, args, modules)}
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    sys.exit(main())
