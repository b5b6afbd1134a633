"""TorchRL's argument names, as the tutorials pass them: accepted where the meaning is ours, refused with the
conversion where it is not (issue 14, "familiar names, clear errors")."""

import warnings

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn

from streamrl.envs.specs import Bounded, Categorical, OneHot
from streamrl.errors import ConfigError, torchrl_names
from streamrl.modules.actors import Actor, ProbabilisticActor, QValueActor, ValueOperator
from streamrl.modules.exploration import AdditiveGaussianModule, EGreedyModule, OrnsteinUhlenbeckModule
from streamrl.modules.nets import MLP, ConvNet, DuelingCnnDQNet
from streamrl.objectives import ValueEstimators
from streamrl.objectives.actor_critic import DDPGLoss, SACLoss, TD3Loss
from streamrl.objectives.dqn import DQNLoss
from streamrl.objectives.ppo import A2CLoss, ClipPPOLoss, LossKeys, ReinforceLoss
from streamrl.objectives.updaters import HardUpdate, SoftUpdate
from streamrl.objectives.value import (
    GAE,
    TD0Estimator,
    TD1Estimator,
    TDLambdaEstimator,
    gae,
    td0_return,
    td1_return,
    td_lambda_return,
)
from streamrl.replay.multistep import MultiStep


def q_actor() -> QValueActor:
    return QValueActor(MLP(2, in_features=4, num_cells=(8,)))


def ddpg_parts() -> tuple[Actor, ValueOperator]:
    actor = Actor(MLP(1, in_features=3, num_cells=(8,)), spec=Bounded(shape=(1,), dtype=torch.float32, low=-2, high=2))
    critic = ValueOperator(MLP(1, in_features=4, num_cells=(8,)), in_keys=("observation", "action"))
    return actor, critic


def ppo_parts() -> tuple[ProbabilisticActor, ValueOperator]:
    net = TensorDictModule(nn.Sequential(MLP(2, in_features=3, num_cells=(8,)), NormalParamExtractor()),
                           in_keys=["observation"], out_keys=["loc", "scale"])
    return ProbabilisticActor(net), ValueOperator(MLP(1, in_features=3, num_cells=(8,)))


# -- target updaters -------------------------------------------------------------------------------------------


def test_soft_update_refuses_torchrl_eps_with_the_tau_it_means():
    with pytest.raises(TypeError, match=r"SoftUpdate takes tau, the weight of the online network; TorchRL's "
                                        r"eps=0\.995 \(the weight of the target\) is tau=0\.005"):
        SoftUpdate(DQNLoss(q_actor()), eps=0.995)


def test_soft_update_warns_of_a_tau_that_looks_like_an_eps():
    loss = DQNLoss(q_actor())
    with pytest.warns(UserWarning, match=r"tau=0\.995 moves the target network 99\.5% of the way.*TorchRL's eps"):
        updater = SoftUpdate(loss, tau=0.995)
    assert updater.tau == 0.995
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SoftUpdate(loss, tau=0.005)  # the usual values say nothing


def test_hard_update_accepts_value_network_update_interval():
    loss = DQNLoss(q_actor())
    assert HardUpdate(loss, value_network_update_interval=7).every == 7
    with pytest.raises(TypeError, match=r"value_network_update_interval= is TorchRL's name for every=; pass one"):
        HardUpdate(loss, value_network_update_interval=7, every=3)


# -- losses ----------------------------------------------------------------------------------------------------


def test_dqn_loss_accepts_delay_value_true_and_refuses_false():
    assert DQNLoss(q_actor(), delay_value=True).target_value_net is not None
    with pytest.raises(ConfigError, match=r"DQNLoss always keeps a target network.*HardUpdate\(loss, every=1\)"):
        DQNLoss(q_actor(), delay_value=False)
    assert DQNLoss(q_actor(), loss_function="l2").loss_type == "l2"


def test_ddpg_loss_accepts_actor_network_and_value_network():
    actor, critic = ddpg_parts()
    loss = DDPGLoss(actor_network=actor, value_network=critic)
    assert loss.actor is actor and loss.critics[0] is critic
    with pytest.raises(TypeError, match=r"actor_network= is TorchRL's name for actor=; pass one of them"):
        DDPGLoss(actor, actor_network=actor, value_network=critic)
    with pytest.raises(ConfigError, match=r"always keep target networks.*delay_actor=True"):
        DDPGLoss(actor, critic, delay_actor=False)


def test_td3_loss_accepts_qvalue_network():
    actor, critic = ddpg_parts()
    _, critic2 = ddpg_parts()
    loss = TD3Loss(actor_network=actor, qvalue_network=[critic, critic2], action_spec=actor.spec)
    assert len(loss.critics) == 2


def test_ppo_losses_map_torchrl_key_arguments_onto_loss_keys():
    actor, critic = ppo_parts()
    loss = ClipPPOLoss(actor=actor, critic=critic, advantage_key="adv", value_target_key="target")
    assert loss.keys == LossKeys(advantage="adv", value_target="target")
    loss = A2CLoss(actor_network=actor, critic_network=critic, keys=LossKeys(action="act"), value_key="v")
    assert loss.keys == LossKeys(action="act", value="v")
    assert loss.set_keys(advantage="a").keys.advantage == "a"
    with pytest.raises(TypeError, match=r"no key named \['foo_key'\]; the keys it reads are LossKeys fields"):
        ClipPPOLoss(actor, critic, foo_key="x")
    with pytest.raises(TypeError, match=r"take no gamma \(got gamma=0\.99\).*GAE\(gamma=0\.99"):
        ClipPPOLoss(actor, critic, gamma=0.99)


def test_ppo_loss_reads_the_key_named_the_torchrl_way():
    actor, critic = ppo_parts()
    batch = TensorDict({"observation": torch.randn(5, 3), "action": torch.rand(5, 1) * 1.8 - 0.9,
                        "sample_log_prob": torch.zeros(5), "adv": torch.randn(5, 1),
                        "value_target": torch.randn(5, 1)}, [5])
    ClipPPOLoss(actor, critic, advantage_key="adv")(batch)
    with pytest.raises(KeyError, match=r"no 'advantage'.*LossKeys\(advantage=\.\.\.\) \(TorchRL's advantage_key=\)"):
        ClipPPOLoss(actor, critic)(batch)  # the default "advantage" is not in the batch


def off_policy_batch(obs: int, action: torch.Tensor) -> TensorDict:
    n = action.shape[0]
    return TensorDict({"observation": torch.randn(n, obs), "action": action,
                       "next": {"observation": torch.randn(n, obs), "reward": torch.randn(n, 1),
                                "terminated": torch.zeros(n, 1, dtype=torch.bool)}}, [n])


def sac_actor() -> ProbabilisticActor:
    net = TensorDictModule(nn.Sequential(MLP(2, in_features=3, num_cells=(8,)), NormalParamExtractor()),
                           in_keys=["observation"], out_keys=["loc", "scale"])
    return ProbabilisticActor(net, spec=Bounded(-2.0, 2.0, (1,)))


def test_losses_return_torchrls_term_names():
    """TorchRL's key sets, plus ``loss`` (the sum our learner steps on) and our diagnostics."""
    diagnostics = {"loss", "q_value", "target_value", "td_error"}
    out = DQNLoss(q_actor())(off_policy_batch(4, torch.randint(0, 2, (5,))))
    assert set(out.keys()) == {"loss", "q_value", "target_value", "td_error"}
    continuous = off_policy_batch(3, torch.rand(5, 1))
    actor, critic = ddpg_parts()
    assert set(DDPGLoss(actor, critic)(continuous).keys()) == {"loss_actor", "loss_value"} | diagnostics
    twins = [ddpg_parts()[1], ddpg_parts()[1]]
    td3 = TD3Loss(actor, twins, action_spec=actor.spec, policy_delay=1)(continuous)
    assert set(td3.keys()) == {"loss_actor", "loss_qvalue"} | diagnostics
    sac = SACLoss(sac_actor(), twins)(continuous)
    assert set(sac.keys()) == {"loss_actor", "loss_qvalue", "loss_alpha", "alpha", "entropy"} | diagnostics
    for out in (td3, sac):  # TorchRL's way to the total: the sum of the loss_* entries
        total = sum(value for key, value in out.items() if key.startswith("loss_"))
        torch.testing.assert_close(total, out["loss"])
    actor, critic = ppo_parts()
    batch = TensorDict({"observation": torch.randn(5, 3), "action": torch.rand(5, 1) * 1.8 - 0.9,
                        "sample_log_prob": torch.zeros(5), "advantage": torch.randn(5, 1),
                        "value_target": torch.randn(5, 1)}, [5])
    assert set(ClipPPOLoss(actor, critic)(batch).keys()) == {
        "loss_objective", "loss_critic", "loss_entropy", "entropy", "kl_approx", "clip_fraction", "ess", "loss"}
    assert set(A2CLoss(actor, critic)(batch).keys()) == {
        "loss_objective", "loss_critic", "loss_entropy", "entropy", "loss"}


def test_bootstrapping_losses_take_gamma_from_make_value_estimator():
    loss = DQNLoss(q_actor(), gamma=0.99)
    assert loss.make_value_estimator(gamma=0.9) is loss and loss.gamma == 0.9  # TD0, the default (tutorial 001)
    assert loss.make_value_estimator(ValueEstimators.TD0).gamma == 0.9  # no gamma: keeps the current one
    actor, critic = ddpg_parts()
    assert DDPGLoss(actor, critic).make_value_estimator("TD0", gamma=0.5).gamma == 0.5  # by name, as TorchRL's
    for value_type in (ValueEstimators.GAE, ValueEstimators.TD1, ValueEstimators.TDLambda):
        with pytest.raises(ValueError, match=rf"DQNLoss\.make_value_estimator takes ValueEstimators\.TD0 only .* "
                                             rf"got ValueEstimators\.{value_type.name}; for n-step returns add "
                                             rf"MultiStep"):
            loss.make_value_estimator(value_type, gamma=0.9)
    with pytest.raises(ValueError, match=r"SACLoss\.make_value_estimator takes ValueEstimators\.TD0 only"):
        SACLoss(sac_actor(), [ddpg_parts()[1], ddpg_parts()[1]]).make_value_estimator(ValueEstimators.GAE)
    with pytest.raises(TypeError, match=r"ValueEstimators\.TD0 takes \['gamma'\], got \['lmbda'\]"):
        loss.make_value_estimator(lmbda=0.9)
    with pytest.raises(ConfigError, match=r"gamma must be in \[0, 1\], got 1\.5"):
        loss.make_value_estimator(gamma=1.5)
    with pytest.raises(ValueError, match=r"unknown value type 'vtrace'; pass one of \['ValueEstimators\.TD0'"):
        loss.make_value_estimator("vtrace")


def test_the_target_discount_is_the_one_make_value_estimator_set():
    actor, critic = ddpg_parts()
    batch = off_policy_batch(3, torch.rand(5, 1))
    zero = DDPGLoss(actor, critic).make_value_estimator(gamma=0.0)(batch)
    torch.testing.assert_close(zero["target_value"], batch["next", "reward"].mean())


@pytest.mark.parametrize("loss_class", [ClipPPOLoss, A2CLoss, ReinforceLoss])
def test_policy_gradient_losses_build_the_estimator_over_their_critic(loss_class):
    actor, critic = ppo_parts()
    loss = loss_class(actor, critic, advantage_key="adv")
    assert loss.value_estimator is None
    assert loss.make_value_estimator(ValueEstimators.GAE, gamma=0.9, lmbda=0.8) is loss  # TorchRL returns the loss
    estimator = loss.value_estimator
    assert isinstance(estimator, GAE) and estimator.value_network is critic
    assert (estimator.gamma, estimator.lmbda, estimator.keys.advantage) == (0.9, 0.8, "adv")
    chunk = TensorDict({"observation": torch.randn(2, 6, 3), "action": torch.rand(2, 6, 1) * 1.8 - 0.9,
                        "sample_log_prob": torch.zeros(2, 6),
                        "next": {"observation": torch.randn(2, 6, 3), "reward": torch.randn(2, 6, 1),
                                 "done": torch.zeros(2, 6, 1, dtype=torch.bool),
                                 "terminated": torch.zeros(2, 6, 1, dtype=torch.bool)}}, [2, 6])
    expected = GAE(gamma=0.9, lmbda=0.8, value_network=critic)(chunk.clone())["advantage"]
    torch.testing.assert_close(estimator(chunk)["adv"], expected)
    assert torch.isfinite(loss(chunk.reshape(-1))["loss"])
    kinds = {ValueEstimators.TD0: TD0Estimator, ValueEstimators.TD1: TD1Estimator,
             ValueEstimators.TDLambda: TDLambdaEstimator, "gae": GAE}
    for value_type, kind in kinds.items():
        assert type(loss.make_value_estimator(value_type).value_estimator) is kind
    assert (loss.value_estimator.gamma, loss.value_estimator.lmbda) == (0.99, 0.95)  # TorchRL's defaults
    with pytest.raises(TypeError, match=r"ValueEstimators\.TD1 takes \['gamma'\], got \['lmbda'\]"):
        loss.make_value_estimator(ValueEstimators.TD1, lmbda=0.9)


# -- modules ---------------------------------------------------------------------------------------------------


def test_q_value_actor_accepts_in_keys_of_one_key():
    actor = QValueActor(MLP(2, in_features=4), in_keys=["pixels"])
    assert actor.in_keys == ["pixels"]
    assert actor(TensorDict({"pixels": torch.randn(3, 4)}, [3]))["action"].shape == (3,)
    with pytest.raises(ConfigError, match=r"QValueActor reads one key \(in_key=\), got \['a', 'b'\]"):
        QValueActor(MLP(2), in_keys=["a", "b"])


def test_exploration_modules_accept_annealing_num_steps():
    explore = EGreedyModule(2, eps_init=1.0, eps_end=0.0, annealing_num_steps=10)
    explore.step(5)
    assert explore.annealing_frames == 10 and explore.eps == pytest.approx(0.5)
    spec = Bounded(shape=(1,), dtype=torch.float32, low=-1, high=1)
    assert AdditiveGaussianModule(spec, annealing_num_steps=20).annealing_frames == 20
    assert OrnsteinUhlenbeckModule(spec, annealing_num_steps=30).annealing_frames == 30


def test_mlp_and_convnet_accept_activation_class():
    mlp = MLP(2, in_features=3, num_cells=(4,), activation_class=nn.ELU, activate_last_layer=True)
    assert [type(m) for m in mlp] == [nn.Linear, nn.ELU, nn.Linear, nn.ELU]
    assert any(isinstance(m, nn.Tanh) for m in ConvNet(num_cells=(4,), kernel_sizes=3, strides=1,
                                                       activation_class=nn.Tanh))
    with pytest.raises(TypeError, match=r"takes none of TorchRL's aggregator_class.*nn\.AdaptiveAvgPool2d"):
        ConvNet(aggregator_class=nn.AdaptiveAvgPool2d)


def test_dueling_cnn_takes_torchrl_positional_arguments():
    cnn = {"num_cells": [4, 8], "kernel_sizes": [3, 3], "strides": [2, 1], "activation_class": nn.ELU}
    mlp = {"depth": 1, "num_cells": [16], "activation_class": nn.ELU}
    net = DuelingCnnDQNet(2, 1, cnn, mlp)
    assert net(torch.rand(5, 3, 12, 12)).shape == (5, 2)
    assert any(isinstance(m, nn.ELU) for m in net.features) and any(isinstance(m, nn.ELU) for m in net.value)
    net = DuelingCnnDQNet(2, 1, {}, {})
    assert net(torch.rand(1, 3, 64, 64)).shape == (1, 2)
    with pytest.raises(ConfigError, match=r"out_features_value must be 1 .* or out_features=2"):
        DuelingCnnDQNet(2, 3)


def test_multistep_accepts_n_steps():
    assert MultiStep(gamma=0.9, n_steps=3).n == 3


# -- specs -----------------------------------------------------------------------------------------------------


def test_discrete_specs_answer_shape_n_and_space():
    categorical = Categorical(shape=(), dtype=torch.int64, n=2)
    assert categorical.shape == torch.Size([]) and len(categorical.shape) == 0
    assert categorical.n == 2 and categorical.space.n == 2
    with pytest.raises(IndexError, match=r"shape is \(\) .* shape\[-1\] does not exist; the number of actions is "
                                         r"spec\.n"):
        categorical.shape[-1]
    assert categorical.shape[:-1] == ()
    one_hot = OneHot(shape=(3,), dtype=torch.int64, n=3)
    assert one_hot.shape[-1] == 3 and one_hot.space.n == 3
    bounded = Bounded(shape=(2,), dtype=torch.float32, low=-1.0, high=2.0)
    assert torch.equal(bounded.space.low, bounded.low) and torch.equal(bounded.space.maximum, bounded.high)


def test_gym_cartpole_action_spec_says_to_use_n():
    from streamrl.envs.gym import GymEnv

    env = GymEnv("CartPole-v1", num_envs=1)
    try:
        assert env.action_spec.n == 2 and env.action_spec.space.n == 2
        with pytest.raises(IndexError, match=r"spec\.n"):
            env.action_spec.shape[-1]
    finally:
        env.close()


def test_bounded_takes_torchrls_positional_order():
    spec = Bounded(-2.0, 2.0, (3,))  # TorchRL's Bounded(low, high, shape, device=None, dtype=None)
    assert spec.shape == (3,) and spec.dtype == torch.float32 and spec.device == torch.device("cpu")
    assert torch.equal(spec.low, torch.full((3,), -2.0)) and torch.equal(spec.high, torch.full((3,), 2.0))
    assert Bounded(torch.zeros(2), torch.ones(2)).shape == (2,)  # the shape of the bounds
    spec = Bounded(0, 255, (2, 2), "cpu", torch.uint8)
    assert spec.dtype == torch.uint8 and spec.high.dtype == torch.uint8
    assert Bounded(shape=(1,), dtype=torch.float64, low=-1, high=1).dtype == torch.float64  # keywords as before
    with pytest.raises(TypeError, match=r"Bounded takes TorchRL's positional order \(low, high, shape, device, "
                                        r"dtype\); got the dtype torch\.float32 as high.*Bounded\(shape=\(3,\), "
                                        r"dtype=torch\.float32, low=\.\.\., high=\.\.\.\)"):
        Bounded((3,), torch.float32)


def test_discrete_specs_share_space():
    assert Categorical(shape=(), dtype=torch.int64, n=4).space == OneHot(shape=(4,), dtype=torch.int64, n=4).space


# -- value functions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["td0", "td1", "td_lambda", "gae"])
def test_value_functions_refuse_torchrl_shaped_tensors(fn):
    x = torch.rand(4, 10, 1)  # TorchRL's [..., T, 1]: read as T=1 it would give one-step estimates
    call = {
        "td0": lambda: td0_return(0.99, x, x, x < 0),
        "td1": lambda: td1_return(0.99, x, x, x < 0, x < 0),
        "td_lambda": lambda: td_lambda_return(0.99, 0.95, x, x, x < 0, x < 0),
        "gae": lambda: gae(0.99, 0.95, x, x, x, x < 0, x < 0),
    }[fn]
    with pytest.raises(ConfigError, match=r"got shape \(4, 10, 1\).*squeeze the last dim: ours take \[\.\.\., T\]"):
        call()
    squeezed = x.squeeze(-1)
    assert gae(0.99, 0.95, squeezed, squeezed, squeezed, squeezed < 0, squeezed < 0)[0].shape == (4, 10)


def test_value_functions_take_single_step_tensors_when_told():
    reward, value = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.5], [0.5]])
    terminated = torch.tensor([[False], [True]])
    with pytest.raises(ConfigError, match=r"For chunks of one step \(T=1\), pass single_step=True"):
        td0_return(0.9, reward, value, terminated)
    expected = torch.tensor([[1.45], [2.0]])
    torch.testing.assert_close(td0_return(0.9, reward, value, terminated, single_step=True), expected)
    torch.testing.assert_close(td1_return(0.9, reward, value, terminated, terminated, single_step=True), expected)
    torch.testing.assert_close(td_lambda_return(0.9, 0.5, reward, value, terminated, terminated, single_step=True),
                               expected)
    advantage, target = gae(0.9, 0.5, value, value, reward, terminated, terminated, single_step=True)
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(advantage, expected - value)


# -- the helper ------------------------------------------------------------------------------------------------


def test_torchrl_names_keeps_other_errors_as_python_gives_them():
    class Thing:
        @torchrl_names("Thing", accept={"old": "new"}, convert={"gone": lambda value: f"no gone, got {value}"})
        def __init__(self, new: int = 0) -> None:
            self.new = new

    assert Thing(old=3).new == 3 and Thing(4).new == 4
    with pytest.raises(TypeError, match=r"old= is TorchRL's name for new=; pass one of them, got both"):
        Thing(4, old=3)  # ours given by position counts too
    with pytest.raises(TypeError, match=r"no gone, got 1"):
        Thing(gone=1)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'typo'"):
        Thing(typo=1)


def test_an_mlp_joins_several_inputs_as_torchrls_does():
    import torch
    from tensordict import TensorDict
    from tensordict.nn import TensorDictModule

    from streamrl import MLP

    critic = TensorDictModule(MLP(1, in_features=5, num_cells=(8,)), in_keys=["observation", "action"],
                              out_keys=["state_action_value"])
    td = critic(TensorDict({"observation": torch.randn(3, 3), "action": torch.randn(3, 2)}, batch_size=[3]))
    assert td["state_action_value"].shape == (3, 1)


def test_add_collector_takes_torchrls_frames_per_batch():
    from streamrl import MLP, GymEnv, Pipeline, QValueActor

    p = Pipeline("p")
    group = p.add_collector("collect", GymEnv("CartPole-v1", num_envs=2), QValueActor(MLP(2, in_features=4)),
                            frames_per_batch=64, total_frames=128, weights_from=None)
    assert p.stages[group.env].steps_per_chunk == 32
