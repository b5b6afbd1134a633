"""On-policy mode: chunk -> advantages -> epochs x minibatches -> weights, with a bounded policy lag."""

import time

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import streamrl
from streamrl import MLP, EnvStage, Epochs, GymEnv, LearnerStage, Pipeline, PolicyStage, QValueActor
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
                           schedule=Epochs(3, 16), device="cpu")
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
    p.connect("env.policy", "policy.requests", capacity=0)
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


async def test_a_chunk_without_valid_rows_still_moves_the_version_on():
    # a lag-bound policy waits for one publication per chunk: a chunk of resets only must not stall it
    import anyio

    from streamrl.streams import open_stream

    actor = QValueActor(MLP(2, in_features=4, num_cells=(8,)))
    loss = SquaredQ(actor)
    learner = LearnerStage("learner", loss, torch.optim.Adam(loss.parameters()), publish=actor,
                           schedule=Epochs(2, 4), device="cpu")
    empty = TensorDict({"observation": torch.zeros(2, 3, 4), "valid": torch.zeros(2, 3, dtype=torch.bool),
                        "policy_version": torch.zeros(2, 3, dtype=torch.int64)}, batch_size=[2, 3])
    send, receive = open_stream(2)
    weights_send, weights_receive = open_stream(2)

    class Ctx:
        def has_output(self, port):
            return True

        def output(self, port):
            return weights_send

        def input(self, port):
            return receive

        def wants(self, kind):
            return False

        async def publish(self, kind, **data):
            pass

    await send.send(empty)
    send.close()
    with anyio.fail_after(10):
        await learner.run(Ctx())
    assert learner.steps == 0 and learner.version == 1
    assert int(weights_receive.receive_nowait()["version"]) == 1


def test_reset_rows_of_next_step_auto_reset_envs_are_not_trained_on(tmp_path):
    _, rows, _, valid = run_on_policy(tmp_path, 0, backend="native")
    assert sum(valid) < len(valid) * FRAMES_PER_CHUNK  # CartPole episodes ended: some rows were resets
    assert sum(rows) == 3 * sum(valid)  # each epoch passes over the valid rows only


def test_advantage_stage_values_chunks_on_the_device_of_the_shared_critic(tmp_path):
    # the learner moves the loss, critic included, to its device (CUDA with device="auto"); chunks come from the
    # env on the CPU. "meta" stands in for CUDA: a CPU input to a meta critic fails as it would on CUDA.
    from streamrl import GAE, ValueOperator
    from streamrl.testing import Collect, ListSource, random_chunks

    critic = ValueOperator(nn.Linear(4, 1)).to("meta")
    sink = Collect("sink")
    p = Pipeline("gae_device")
    p.add(ListSource("src", random_chunks(2)), AdvantageStage("gae", GAE(gamma=0.9, lmbda=0.9, value_network=critic)),
          sink)
    p.connect("src.items", "gae.chunks").connect("gae.chunks", "sink.items")
    result = streamrl.run(p, tmp_path, handle_signals=False)
    assert result.exit_reason == "completed"
    assert [chunk["advantage"].device.type for chunk in sink.items] == ["meta", "meta"]
