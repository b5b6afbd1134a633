"""PPO on InvertedDoublePendulum in a plain training loop, the way TorchRL's PPO tutorial (002) writes it.

    python docs/ppo_plain_loop.py                       # 1M frames, as the tutorial's full run
    python docs/ppo_plain_loop.py --total-frames 10000  # a quick look

The same workload as ``pipelines/ppo_inverted_double_pendulum.py``, written as a ``for`` loop over a
:class:`~streamrl.Collector` instead of a pipeline: collect 1,000 frames, compute GAE advantages, make 10 passes of
minibatches of 64, then hand the new weights to the collector. The collector runs the env and the policy in a
background thread; with ``max_policy_lag=0`` each batch waits for the weights of the last update (on-policy).
The pipeline version overlaps collection with learning and adds checkpoints, evaluation and a progress bar.
"""

from __future__ import annotations

import argparse

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn

from streamrl import GAE, MLP, ClipPPOLoss, Collector, ProbabilisticActor, ValueOperator
from streamrl.envs import Compose, DoubleToFloat, GymEnv, ObservationNorm, StepCounter, TransformedEnv
from streamrl.replay.buffer import transitions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-frames", type=int, default=1_000_000)
    args = parser.parse_args()
    torch.manual_seed(0)

    env = TransformedEnv(GymEnv("InvertedDoublePendulum-v5", num_envs=4, backend="sync", seed=0), Compose(
        DoubleToFloat(), ObservationNorm(in_keys=["observation"], standard_normal=True), StepCounter()))
    env.transform[1].init_stats(1_000, reduce_dim=(0, 1), cat_dim=0)
    obs_dim, act_dim = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]

    cells = (256, 256, 256)
    net = nn.Sequential(MLP(2 * act_dim, in_features=obs_dim, num_cells=cells, activation=nn.Tanh),
                        NormalParamExtractor())
    actor = ProbabilisticActor(TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
                               spec=env.action_spec)
    critic = ValueOperator(MLP(1, in_features=obs_dim, num_cells=cells, activation=nn.Tanh))
    advantage = GAE(gamma=0.99, lmbda=0.95, value_network=critic, average_gae=True)
    loss = ClipPPOLoss(actor, critic, clip_epsilon=0.2, entropy_coef=1e-4, loss_critic_type="smooth_l1")
    optimizer = torch.optim.Adam(loss.parameters(), lr=3e-4, fused=True)
    batches = args.total_frames // 1_000
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, batches * 10 * 16), 0.0)

    with Collector(env, actor, frames_per_batch=1_000, total_frames=args.total_frames, max_policy_lag=0,
                   record=("action", "sample_log_prob")) as collector:
        for i, data in enumerate(collector):
            with torch.no_grad():
                data = advantage(data)  # advantage and value_target, on the chunk's [num_envs, T] structure
            rows = transitions(data)  # the reset rows of auto-resetting envs are not transitions
            for _ in range(10):
                for idx in torch.randperm(rows.shape[0]).split(64):
                    out = loss(rows[idx])
                    optimizer.zero_grad(set_to_none=True)
                    out["loss"].backward()
                    nn.utils.clip_grad_norm_(loss.parameters(), 1.0)
                    optimizer.step()
                    scheduler.step()
            collector.update_policy_weights_()
            if i % 10 == 0:
                done = data["next", "done"].squeeze(-1)
                print(f"frames {collector.frames:>8}  reward {data['next', 'reward'].mean():.3f}  "
                      f"step_count max {data['step_count'].max()}  episodes ended {int(done.sum())}  "
                      f"lr {scheduler.get_last_lr()[0]:.2e}", flush=True)


if __name__ == "__main__":
    main()
