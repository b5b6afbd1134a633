"""On-policy mode: chunk -> advantages -> epochs x minibatches -> weights, with a bounded policy lag."""

import time

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import streamrl
from streamrl import MLP, EnvStage, GymEnv, LearnerStage, Pipeline, PolicyStage, QValueActor
from streamrl.stages.advantage import AdvantageStage

FRAMES_PER_CHUNK = 64  # 2 envs x 32 steps


class SquaredQ(nn.Module):
    """A stand-in loss with gradients to the actor; slow enough that collection could run ahead of it."""

    def __init__(self, actor):
        super().__init__()
        self.actor = actor

    def forward(self, batch):
        time.sleep(0.002)
        q = self.actor.value_net(batch["observation"])
        return TensorDict({"loss": q.pow(2).mean()}, batch_size=[])


def run_on_policy(tmp_path, max_policy_lag, *, chunks=12, backend="sync"):
    actor = QValueActor(MLP(2, in_features=4, num_cells=(16,)))
    loss = SquaredQ(actor)
    learner = LearnerStage("learner", loss, torch.optim.Adam(loss.parameters(), lr=1e-3), publish=actor,
                           epochs=3, minibatch_size=16, device="cpu")
    advantages = []

    def estimator(chunk):
        advantages.append(int(chunk.get("valid", torch.ones(chunk.batch_size, dtype=torch.bool)).sum()))
        chunk["advantage"] = torch.zeros(*chunk.batch_size, 1)
        return chunk

    p = Pipeline("on_policy")
    p.add(EnvStage("env", GymEnv("CartPole-v1", num_envs=2, seed=0, backend=backend), frames_per_chunk=FRAMES_PER_CHUNK,
                   total_frames=chunks * FRAMES_PER_CHUNK),
          PolicyStage("policy", actor, max_policy_lag=max_policy_lag), group="collect")
    p.add(AdvantageStage("gae", estimator), learner)
    p.place("collect", "worker_process")  # collection runs on its own core, free to run ahead of the learner
    p.connect("env.requests", "policy.requests", capacity=1)
    p.connect("policy.actions", "env.actions", capacity=1)
    p.connect("env.chunks", "gae.chunks", capacity=1)
    p.connect("gae.chunks", "learner.batches", capacity=1)
    p.connect("learner.weights", "policy.weights", capacity=1, overflow="drop_oldest")
    ages, rows = [], []

    def check(event):  # on every minibatch, before the loss: how many versions behind the learner its rows are
        batch = event.data["batch"]
        ages.append(int((learner.version - batch["policy_version"]).max()))
        rows.append(batch.shape[0])

    p.on("batch", check)
    result = streamrl.run(p, tmp_path, handle_signals=False)
    assert result.exit_reason == "completed"
    assert len(advantages) >= chunks  # the estimator saw every chunk (frames count valid rows only)
    return ages, rows, learner, advantages


@pytest.mark.parametrize("lag", [0, 1])
def test_no_minibatch_holds_data_older_than_max_policy_lag(tmp_path, lag):
    ages, rows, learner, _ = run_on_policy(tmp_path, lag)
    assert ages and max(ages) <= lag
    if lag == 1:
        assert max(ages) == 1  # collection did run ahead while the learner trained
    per_chunk = 3 * (FRAMES_PER_CHUNK // 16)  # epochs x minibatches; every row once per epoch
    assert learner.steps % per_chunk == 0 and sum(rows) == learner.steps * 16
    assert learner.version == learner.steps // per_chunk  # one publication per chunk


def test_without_a_lag_bound_collection_runs_ahead(tmp_path):
    ages, _, _, _ = run_on_policy(tmp_path, None)
    assert max(ages) >= 1  # what max_policy_lag=0 prevents


def test_reset_rows_of_next_step_auto_reset_envs_are_not_trained_on(tmp_path):
    _, rows, _, valid = run_on_policy(tmp_path, 0, backend="native")
    assert sum(valid) < len(valid) * FRAMES_PER_CHUNK  # CartPole episodes ended: some rows were resets
    assert sum(rows) == 3 * sum(valid)  # each epoch passes over the valid rows only
