"""What the graph knows beyond its edges (streamrl.graph_checks): the replay link, stale weights, misplaced hooks;
and the Storage protocol the writer speaks to any storage through."""

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tensordict.nn import TensorDictModule, TensorDictSequential

from streamrl import (
    GAE,
    MLP,
    AdvantageStage,
    Checkpoint,
    ClipPPOLoss,
    DQNLoss,
    EGreedyModule,
    EnvStage,
    Epochs,
    EpsilonAnnealing,
    Evaluate,
    EventLog,
    GymEnv,
    Hook,
    LearnerStage,
    MetricsCSV,
    Pipeline,
    PipelineError,
    PolicyStage,
    PrioritizedSampler,
    PriorityUpdate,
    ProbabilisticActor,
    ProgressBar,
    QValueActor,
    RamStorage,
    ReplayBuffer,
    SamplerStage,
    ValueOperator,
    WriterStage,
    run,
)
from streamrl.loader import load_module
from streamrl.testing import Collect, ListSource, random_chunks

PIPELINES = sorted((Path(__file__).parent.parent / "pipelines").glob("*.py"))
TINY = {"num_envs": 1, "init_stats_steps": 4, "eval_episodes": 1, "total_frames": 256, "buffer_size": 256}


def dqn_graph(*, writer_group="main", weights=True, publish=True, placement="worker_process",
              anneal_group="collect", target_group="main", trained_policy=True):
    """A DQN graph, collector in group "collect"; each keyword moves one piece out of place."""
    q_net = MLP(2, in_features=4, num_cells=(8,))
    actor = QValueActor(q_net)
    explore = EGreedyModule(2, annealing_frames=100)
    loss = DQNLoss(actor, gamma=0.99)
    optimizer = torch.optim.Adam(loss.value_net.parameters())
    acting = actor if trained_policy else QValueActor(MLP(2, in_features=4, num_cells=(8,)))  # a fixed policy
    replay = ReplayBuffer(RamStorage(256), batch_size=4)
    p = Pipeline("dqn")
    p.add(EnvStage("env", GymEnv("CartPole-v1", num_envs=1), frames_per_chunk=8, total_frames=64),
          PolicyStage("policy", TensorDictSequential(acting, explore), weights_module=acting), group="collect")
    p.add(WriterStage("writer", replay), group=writer_group)
    p.add(SamplerStage("sampler", replay), LearnerStage("learner", loss, optimizer, publish=actor if publish else None))
    p.connect("env.policy", "policy.requests", capacity=0)
    p.connect("env.chunks", "writer.chunks", capacity=1)
    p.connect("sampler.batches", "learner.batches", capacity=2)
    if weights:
        p.connect("learner.weights", "policy.weights", capacity=1, overflow="drop_oldest")
    p.place("collect", placement)
    p.add_hook(EpsilonAnnealing(explore), group=anneal_group)
    p.add_hook(LossWatcher(loss), group=target_group)
    return p, replay, explore


class LossWatcher(Hook):
    """A hook holding the learner's loss (as a logger of its figures would)."""

    events = ("optim_step",)

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def on_event(self, event: Any) -> None:
        """Watches only."""


# -- the pipelines as shipped ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PIPELINES, ids=lambda path: path.stem)
def test_every_shipped_pipeline_validates(path):
    module = load_module(path)
    names = {f.name for f in dataclasses.fields(module.Config)}
    pipeline = module.build(module.Config(**{k: v for k, v in TINY.items() if k in names}))
    pipeline.validate()


def test_a_correct_graph_validates_and_describe_draws_the_replay_link():
    p, _, _ = dqn_graph()
    p.validate()
    assert "  writer ==[ReplayBuffer]== sampler" in p.describe().splitlines()


def test_describe_names_the_hooks_acting_on_a_shared_buffer():
    replay = ReplayBuffer(RamStorage(64), sampler=PrioritizedSampler(alpha=0.6, beta=0.4), batch_size=4)
    p = Pipeline("prio").add(ListSource("src", []), WriterStage("writer", replay), SamplerStage("sampler", replay),
                             Collect("sink"))
    p.connect("src.items", "writer.chunks").connect("sampler.batches", "sink.items")
    p.add_hook(PriorityUpdate(replay))
    p.validate()
    assert "  writer ==[ReplayBuffer]== sampler (hooks: PriorityUpdate)" in p.describe()


# -- 2. the writer-sampler link ----------------------------------------------------------------------------------
def test_a_writer_and_its_sampler_in_two_processes_fail_naming_both_and_the_fix():
    p, _, _ = dqn_graph(writer_group="collect")
    with pytest.raises(PipelineError) as caught:
        p.validate()
    message = str(caught.value)
    assert ("stages 'writer' (group 'collect', a worker process) and 'sampler' (group 'main', the main process) "
            "share one ReplayBuffer") in message
    assert "add 'writer' with group='main'" in message
    assert "p.place('collect', 'in_process')" in message


def test_a_writer_in_an_in_process_group_shares_the_main_process():
    p, _, _ = dqn_graph(writer_group="collect", placement="in_process")
    p.validate()


# -- 3. stale weights --------------------------------------------------------------------------------------------
def test_a_policy_acting_with_trained_parameters_needs_the_weights_edge():
    p, _, _ = dqn_graph(weights=False)
    with pytest.raises(PipelineError, match="weights input is not connected") as caught:
        p.validate()
    message = str(caught.value)
    assert "stage 'policy' (group 'collect', a worker process) acts with parameter" in message
    assert "which learner 'learner' trains" in message
    assert "p.connect('learner.weights', 'policy.weights', capacity=1, overflow='drop_oldest')" in message
    assert "publish=" not in message  # the learner publishes already


def test_a_learner_that_publishes_nothing_is_told_what_to_publish():
    p, _, _ = dqn_graph(publish=False)
    with pytest.raises(PipelineError, match="takes weights from learner 'learner', which publishes none") as caught:
        p.validate()
    assert "LearnerStage('learner', loss, optimizer, publish=actor)" in str(caught.value)
    p, _, _ = dqn_graph(publish=False, weights=False)  # the optimizer's parameters tie the policy to the learner
    with pytest.raises(PipelineError, match="p.connect\\('learner.weights', 'policy.weights'.*publish=actor"):
        p.validate()


def test_a_policy_that_acts_with_untrained_parameters_needs_no_weights():
    p, _, _ = dqn_graph(weights=False, trained_policy=False)
    p.validate()


def test_a_stage_using_trained_parameters_in_another_process_fails():
    """The advantage stage values chunks with the critic the learner trains: in a worker it would use a copy."""
    logits = TensorDictModule(MLP(2, in_features=4, num_cells=(8,)), in_keys=["observation"], out_keys=["logits"])
    actor = ProbabilisticActor(logits, in_keys=("logits",), distribution_class=torch.distributions.Categorical)
    critic = ValueOperator(MLP(1, in_features=4, num_cells=(8,)))
    loss = ClipPPOLoss(actor, critic)
    p = Pipeline("ppo")
    p.add(EnvStage("env", GymEnv("CartPole-v1", num_envs=1), frames_per_chunk=8, total_frames=64),
          PolicyStage("policy", actor), AdvantageStage("gae", GAE(gamma=0.99, lmbda=0.95, value_network=critic)),
          group="collect")
    p.add(LearnerStage("learner", loss, torch.optim.Adam(loss.parameters()), publish=actor,
                       schedule=Epochs(1, 8)))
    p.connect("env.policy", "policy.requests", capacity=0)
    p.connect("env.chunks", "gae.chunks").connect("gae.chunks", "learner.batches")
    p.connect("learner.weights", "policy.weights", capacity=1, overflow="drop_oldest")
    p.place("collect", "worker_process")
    with pytest.raises(PipelineError) as caught:
        p.validate()
    assert "stage 'gae' (group 'collect', a worker process) uses parameter" in str(caught.value)
    assert "add 'gae' with group='main', next to its learner" in str(caught.value)


# -- 4. misplaced hooks ------------------------------------------------------------------------------------------
def test_a_hook_annealing_the_collectors_exploration_in_main_fails():
    p, _, _ = dqn_graph(anneal_group="main")
    with pytest.raises(PipelineError) as caught:
        p.validate()
    message = str(caught.value)
    assert ("hook 'EpsilonAnnealing' (group 'main', the main process) acts on EGreedyModule, which only stage "
            "'policy' (group 'collect', a worker process) holds") in message
    assert "p.add_hook(EpsilonAnnealing(...), group='collect')" in message


def test_placement_in_process_makes_any_group_right_for_the_hook():
    p, _, _ = dqn_graph(anneal_group="main", placement="in_process")
    p.validate()


def test_a_hook_on_the_learners_loss_in_a_worker_group_fails():
    p, _, _ = dqn_graph(target_group="collect")
    with pytest.raises(PipelineError, match="hook 'LossWatcher' \\(group 'collect', a worker process\\) acts "
                                            "on DQNLoss, which only stage 'learner'") as caught:
        p.validate()
    assert "p.add_hook(LossWatcher(...), group='main')" in str(caught.value)


def test_a_function_hook_is_judged_by_what_its_closure_holds():
    p, _, explore = dqn_graph()
    p.on("chunk", lambda event: explore.step(0))  # group "main": explore lives in the collector's worker
    with pytest.raises(PipelineError, match="acts on EGreedyModule.*group='collect'\\)"):
        p.validate()


MAIN_ONLY = {
    "Checkpoint": lambda: Checkpoint(every_frames=1_000),
    "Evaluate": lambda: Evaluate(GymEnv("CartPole-v1"), QValueActor(MLP(2, in_features=4)), every_frames=100),
    "ProgressBar": ProgressBar,
    "MetricsCSV": MetricsCSV,
    "EventLog": EventLog,
}


@pytest.mark.parametrize("name", MAIN_ONLY)
def test_a_main_only_hook_in_a_worker_group_fails(name):
    p, _, _ = dqn_graph()
    p.add_hook(MAIN_ONLY[name](), group="collect")
    with pytest.raises(PipelineError, match=f"hook '{name}' needs the main process .* placed in group 'collect'"):
        p.validate()


def test_a_hook_on_a_shared_buffer_in_a_worker_group_fails():
    replay = ReplayBuffer(RamStorage(64), sampler=PrioritizedSampler(alpha=0.6, beta=0.4), batch_size=4)
    p = Pipeline("prio").add(ListSource("src", []), WriterStage("writer", replay), SamplerStage("sampler", replay),
                             Collect("sink"))
    p.add(ListSource("far_src", []), group="far").add(Collect("far_sink"))
    p.place("far", "worker_process")
    p.connect("src.items", "writer.chunks").connect("sampler.batches", "sink.items")
    p.connect("far_src.items", "far_sink.items")
    p.add_hook(PriorityUpdate(replay), group="far")
    with pytest.raises(PipelineError, match="acts on ReplayBuffer, which only stages 'writer' .* and 'sampler'"):
        p.validate()


# -- 1. the Storage protocol -------------------------------------------------------------------------------------
class JournalStorage:
    """A durable storage of our own (no base class): rows in RAM, flushes written to a journal."""

    durable = True
    path = None

    def __init__(self, capacity: int) -> None:
        self.ram = RamStorage(capacity)
        self.capacity = capacity
        self.committed = 0
        self.journal: list[tuple[str, bool, int]] = []
        self.run_dir = None

    cursor = property(lambda self: self.ram.cursor)
    total_written = property(lambda self: self.ram.total_written)
    pending_rows = property(lambda self: self.total_written - self.committed)
    ram_rows = property(lambda self: self.ram.data)

    def __len__(self):
        return len(self.ram)

    def extend(self, rows):
        return self.ram.extend(rows)

    def get(self, index):
        return self.ram.get(index)

    def attach(self, run_dir):
        self.run_dir = run_dir

    def commit_due(self):
        return False

    def seconds_to_commit(self):
        return math.inf

    def flush_due(self):
        return self.pending_rows >= 16

    def flush(self, *, partial=False):
        self.journal.append(("flush", partial, self.pending_rows))
        self.committed = self.total_written if partial else self.total_written - self.total_written % 16
        return self.committed

    def needs_run_dir(self, state):
        return False

    def state_dict(self):
        return self.ram.state_dict()

    def load_state_dict(self, state):
        self.ram.load_state_dict(state)

    def close(self):
        self.flush(partial=True)
        self.journal.append(("close", True, self.pending_rows))


def test_the_writer_flushes_any_durable_storage_through_the_protocol(tmp_path):
    storage = JournalStorage(256)
    p = Pipeline("journal").add(ListSource("src", random_chunks(3, num_envs=2, steps=4)),
                                WriterStage("writer", ReplayBuffer(storage, batch_size=4)))
    p.connect("src.items", "writer.chunks")
    run(p, tmp_path, handle_signals=False)
    assert storage.run_dir is not None  # the buffer attached it
    # 8 rows a chunk: a whole 16-row block after the second chunk; the rest when the writer closes
    assert storage.journal == [("flush", False, 16), ("flush", True, 8), ("close", True, 0)]
