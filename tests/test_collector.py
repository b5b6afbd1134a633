"""The plain-loop Collector (issue 14): `for data in Collector(...)`, built on the env and policy stages."""

from __future__ import annotations

import threading

import pytest
import torch

from streamrl import MLP, Collector, GymEnv, QValueActor, StageFailed
from streamrl.errors import ConfigError

FAILING = "streamrl.testing:streamrl/FailingCartPole-v0"  # raises at its fail_at-th step


def actor() -> QValueActor:
    torch.manual_seed(0)
    return QValueActor(MLP(2, in_features=4, num_cells=(16,)))


def collector_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "streamrl-collector"]


def test_a_for_loop_gets_batches_with_the_env_stages_keys_until_the_budget():
    with Collector(GymEnv("CartPole-v1", num_envs=4), actor(), frames_per_batch=64, total_frames=256) as collector:
        batches = list(collector)
    assert batches and all(batch.batch_size == (4, 16) for batch in batches)
    first = batches[0]
    for key in ("observation", "action", "traj_id", "policy_version", "valid", ("next", "reward"),
                ("next", "terminated"), ("next", "truncated"), ("next", "done")):
        assert key in first.keys(include_nested=True), key
    trajs = torch.cat([batch["traj_id"].reshape(-1) for batch in batches])
    assert len(set(trajs.tolist())) > 4  # episodes end and continue across batches (auto-reset)
    assert collector.frames >= 256 and not collector_threads()


def test_update_policy_weights_reaches_the_next_batch_and_lag_0_waits_for_it():
    policy = actor()
    collector = Collector(GymEnv("CartPole-v1", num_envs=2), policy, frames_per_batch=32, total_frames=96,
                          max_policy_lag=0)
    versions, actions = [], []
    for data in collector:
        versions.append(int(data["policy_version"].max()))
        actions.append(data["action"])
        target = 1 - int(actions[0].float().mean().round())  # the action the first batch took less
        with torch.no_grad():  # from now on the greedy policy always picks `target`
            params = list(policy.parameters())
            for p in params:
                p.zero_()
            params[-1][target] = 1.0  # the output bias of that action
        collector.update_policy_weights_()
    collector.shutdown()
    assert len(versions) >= 3 and versions == list(range(len(versions)))  # each batch waited for its weights
    assert all(bool((action == target).all()) for action in actions[1:])
    assert not bool((actions[0] == target).all())  # the first batch acted with the weights it started with


def test_breaking_out_of_the_loop_and_shutdown_stop_the_background_run():
    collector = Collector(GymEnv("CartPole-v1", num_envs=2), actor(), frames_per_batch=32, total_frames=10**9)
    for i, _ in enumerate(collector):
        if i == 1:
            break
    collector.shutdown()
    collector.shutdown()  # idempotent
    assert not collector_threads()


def test_an_env_failure_in_the_background_is_raised_by_the_loop():
    env = GymEnv(FAILING, num_envs=1, backend="sync", fail_at=40)
    collector = Collector(env, actor(), frames_per_batch=16, total_frames=10**6)
    with pytest.raises(StageFailed, match="collect_env.*env exploded at step 40"):
        for _ in collector:
            pass
    collector.shutdown()


def test_a_bad_budget_is_refused():
    with pytest.raises(ConfigError, match="total_frames must be an int >= 1, got 0"):
        Collector(GymEnv("CartPole-v1"), actor(), frames_per_batch=16, total_frames=0)
