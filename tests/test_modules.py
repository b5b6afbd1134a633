"""Networks, the Q-value actor and epsilon-greedy exploration, against values computed by hand."""

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import InteractionType, TensorDictModule, TensorDictSequential, set_interaction_type
from torch import nn

import streamrl.modules.distributions as distributions
from streamrl import (
    MLP,
    Bounded,
    Categorical,
    ConvNet,
    DuelingCnnDQNet,
    EGreedyModule,
    NormalParamExtractor,
    OneHot,
    ProbabilisticActor,
    QValueActor,
    TanhNormal,
)
from streamrl.modules.distributions import TanhBounds


def side(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


# ---------------------------------------------------------------------------------------------------- networks


def test_mlp_keeps_the_sequence_form_and_takes_an_int_width_with_depth():
    net = MLP(2, in_features=4, num_cells=(8, 16))
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4, 8), (8, 16), (16, 2)]
    net = MLP(2, num_cells=64, depth=3)
    assert net(torch.randn(5, 7)).shape == (5, 2)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(7, 64), (64, 64), (64, 64), (64, 2)]
    assert sum(isinstance(m, nn.ReLU) for m in net) == 3
    assert [type(m) for m in MLP(3, in_features=2, num_cells=4, depth=0)] == [nn.Linear]


def test_mlp_activation_norm_and_activate_last():
    net = MLP(2, in_features=3, num_cells=(4,), activation=nn.LeakyReLU, activation_kwargs={"negative_slope": 0.5},
              norm_class=nn.LayerNorm, activate_last=True)
    assert [type(m) for m in net] == [nn.Linear, nn.LayerNorm, nn.LeakyReLU, nn.Linear, nn.LeakyReLU]
    assert net[2].negative_slope == 0.5
    x = torch.randn(6, 3)
    h = nn.functional.leaky_relu(nn.functional.layer_norm(x @ net[0].weight.T + net[0].bias, (4,),
                                                          net[1].weight, net[1].bias), 0.5)
    expected = nn.functional.leaky_relu(h @ net[3].weight.T + net[3].bias, 0.5)
    torch.testing.assert_close(net(x), expected)


def test_mlp_rejects_int_width_without_depth_and_mismatched_depth():
    with pytest.raises(ValueError, match="depth is needed"):
        MLP(2, num_cells=64)
    with pytest.raises(ValueError, match="has 2 widths"):
        MLP(2, num_cells=(64, 64), depth=3)


@pytest.mark.parametrize(("kernels", "strides", "paddings"),
                         [((8, 4, 3), (4, 2, 1), 0), ((6, 4, 3), (2, 2, 1), (1, 0, 2))])
def test_convnet_output_shape_follows_the_convolution_formula(kernels, strides, paddings):
    pads = paddings if isinstance(paddings, tuple) else (paddings,) * 3
    cnn = ConvNet(num_cells=(32, 64, 16), kernel_sizes=kernels, strides=strides, paddings=paddings)
    h, w = 84, 72
    for k, s, p in zip(kernels, strides, pads, strict=True):
        h, w = side(h, k, s, p), side(w, k, s, p)
    assert cnn(torch.randn(5, 3, 84, 72)).shape == (5, 16 * h * w)
    assert cnn(torch.randn(2, 4, 3, 84, 72)).shape == (2, 4, 16 * h * w)
    assert cnn(torch.randn(3, 84, 72)).shape == (16 * h * w,)
    unflat = ConvNet(num_cells=(32, 64, 16), kernel_sizes=kernels, strides=strides, paddings=paddings, flatten=False)
    assert unflat(torch.randn(2, 4, 3, 84, 72)).shape == (2, 4, 16, h, w)


def test_convnet_is_lazy_until_the_first_call_and_leading_dims_do_not_mix_samples():
    cnn = ConvNet(num_cells=(4, 8), kernel_sizes=3, strides=1)
    assert isinstance(cnn[0], nn.LazyConv2d)
    x = torch.randn(2, 3, 5, 10, 10)
    out = cnn(x)
    assert type(cnn[0]) is nn.Conv2d and cnn[0].in_channels == 5
    assert out.shape == (2, 3, 8 * 6 * 6)
    torch.testing.assert_close(out[1, 2], cnn(x[1, 2:3])[0])  # same as running that image alone
    fixed = ConvNet(num_cells=(4,), kernel_sizes=(3,), strides=(1,), in_features=5)
    assert type(fixed[0]) is nn.Conv2d and fixed[0].in_channels == 5


def test_convnet_errors_name_the_argument():
    with pytest.raises(ValueError, match="kernel_sizes"):
        ConvNet(num_cells=(4, 8), kernel_sizes=(3,))
    with pytest.raises(ValueError, match=r"\[\*batch, C, H, W\]"):
        ConvNet(num_cells=(4,), kernel_sizes=1, strides=1)(torch.randn(4, 4))


def test_dueling_net_combines_value_and_advantage_heads_by_hand():
    torch.manual_seed(0)
    net = DuelingCnnDQNet(3, cnn_kwargs={"num_cells": (4, 8), "kernel_sizes": (3, 3), "strides": (2, 1)},
                          mlp_kwargs={"num_cells": (16,)})
    x = torch.randn(6, 2, 16, 16)
    q = net(x)
    features = net.features(x)
    a, v = net.advantage(features), net.value(features)
    assert a.shape == (6, 3) and v.shape == (6, 1)
    expected = torch.stack([v[i, 0] + a[i] - a[i].sum() / 3 for i in range(6)])
    torch.testing.assert_close(q, expected)
    assert isinstance(net.value[-1], nn.Linear)  # users initialise the value bias as in TorchRL's tutorial


def test_dueling_net_defaults_are_nature_dqn_sizes():
    net = DuelingCnnDQNet(6)
    assert net(torch.randn(2, 4, 84, 84)).shape == (2, 6)
    assert [m.out_channels for m in net.features if isinstance(m, nn.Conv2d)] == [32, 64, 64]
    assert net.features[0].in_channels == 4
    assert net.advantage[0].in_features == 64 * 7 * 7 and net.advantage[0].out_features == 512


# ---------------------------------------------------------------------------------------------------- actor


class Fixed(nn.Module):
    """A 'network' that returns the given Q-values whatever the observation."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def forward(self, obs):
        return self.values[: obs.shape[0]]


Q = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 2.0], [-3.0, -2.0, -1.0], [5.0, 5.0, 5.0]])


def run(actor, batch=4):
    return actor(TensorDict({"observation": torch.zeros(batch, 2)}, [batch]))


def test_q_value_actor_writes_index_actions_and_the_chosen_value():
    td = run(QValueActor(Fixed(Q), spec=Categorical(shape=(), dtype=torch.int64, n=3)))
    index = [max(range(3), key=lambda j, row=row: (row[j], -j)) for row in Q.tolist()]  # first max on ties
    assert td["action"].tolist() == index == [1, 0, 2, 0]
    assert td["action"].dtype == torch.int64
    torch.testing.assert_close(td["action_value"], Q)
    expected = torch.tensor([[Q[i, a].item()] for i, a in enumerate(index)])
    torch.testing.assert_close(td["chosen_action_value"], expected)
    assert td["chosen_action_value"].shape == (4, 1)
    assert set(QValueActor(Fixed(Q)).out_keys) == {"action", "action_value", "chosen_action_value"}


def test_q_value_actor_writes_one_hot_actions_for_a_one_hot_spec():
    td = run(QValueActor(Fixed(Q), spec=OneHot(shape=(3,), dtype=torch.uint8, n=3)))
    assert td["action"].dtype == torch.uint8
    assert td["action"].tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]]
    chosen = (Q * td["action"]).sum(-1, keepdim=True)
    torch.testing.assert_close(td["chosen_action_value"], chosen)


def test_q_value_actor_one_hot_override_and_default():
    assert run(QValueActor(Fixed(Q)))["action"].tolist() == [1, 0, 2, 0]
    td = run(QValueActor(Fixed(Q), one_hot=True))
    assert td["action"].tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]]
    td = run(QValueActor(Fixed(Q), spec=OneHot(shape=(3,), dtype=torch.float32, n=3), one_hot=False))
    assert td["action"].tolist() == [1, 0, 2, 0] and td["action"].dtype == torch.int64


def test_q_value_actor_reads_its_in_key_and_rejects_other_specs():
    from streamrl import Bounded

    actor = QValueActor(MLP(3, num_cells=(8,)), in_key="pixels")
    td = actor(TensorDict({"pixels": torch.randn(5, 4)}, [5]))
    assert td["action"].shape == (5,) and td["action_value"].shape == (5, 3)
    with pytest.raises(TypeError, match="Categorical or OneHot"):
        QValueActor(Fixed(Q), spec=Bounded(shape=(3,), dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------- exploration


def greedy_td(n):
    return TensorDict({"action": torch.zeros(n, dtype=torch.int64)}, [n])


def test_eps_schedule_is_linear_in_frames_then_flat():
    explore = EGreedyModule(4, eps_init=1.0, eps_end=0.1, annealing_frames=1000)
    assert explore.eps == 1.0
    expected = {250: 1.0 - 0.9 * 0.25, 500: 0.55, 1000: 0.1, 5000: 0.1}
    done = 0
    for frames, eps in expected.items():
        explore.step(frames - done)
        done = frames
        assert explore.eps == pytest.approx(eps)
    explore = EGreedyModule(4, eps_init=0.5, eps_end=0.0, annealing_frames=10)
    for _ in range(3):
        explore.step()
    assert explore.frames == 3 and explore.eps == pytest.approx(0.35)


@pytest.mark.parametrize("eps_end", [0.3, 0.8])
def test_random_actions_come_with_frequency_eps(eps_end):
    torch.manual_seed(0)
    n_actions, n = 4, 20_000
    explore = EGreedyModule(n_actions, eps_init=eps_end, eps_end=eps_end)
    action = explore(greedy_td(n))["action"]
    # a random action equals the greedy one (0) a quarter of the time
    changed = (action != 0).float().mean().item()
    assert changed == pytest.approx(eps_end * (n_actions - 1) / n_actions, abs=0.02)
    counts = torch.bincount(action[action != 0], minlength=n_actions)[1:].float()
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.03  # uniform over the other actions
    assert int(action.min()) >= 0 and int(action.max()) < n_actions


def test_exploration_is_off_in_deterministic_mode_and_at_eps_zero():
    explore = EGreedyModule(4, eps_init=1.0, eps_end=1.0)
    with set_interaction_type(InteractionType.DETERMINISTIC):
        assert (explore(greedy_td(1000))["action"] == 0).all()
    assert not (explore(greedy_td(1000))["action"] == 0).all()
    assert (EGreedyModule(4, eps_init=0.0, eps_end=0.0)(greedy_td(1000))["action"] == 0).all()


def test_one_hot_spec_gives_valid_one_hot_random_actions():
    torch.manual_seed(1)
    spec = OneHot(shape=(5,), dtype=torch.float32, n=5)
    explore = EGreedyModule(spec=spec, eps_init=1.0, eps_end=1.0)
    greedy = torch.nn.functional.one_hot(torch.zeros(2000, dtype=torch.int64), 5).float()
    action = explore(TensorDict({"action": greedy.clone()}, [2000]))["action"]
    assert action.shape == (2000, 5) and action.dtype == torch.float32
    assert spec.is_in(action)
    assert set(action.argmax(-1).tolist()) == {0, 1, 2, 3, 4}


def test_categorical_spec_with_several_choices_replaces_whole_actions():
    torch.manual_seed(2)
    spec = Categorical(shape=(3,), dtype=torch.int64, n=6)
    explore = EGreedyModule(spec=spec, eps_init=0.5, eps_end=0.5)
    action = explore(TensorDict({"action": torch.full((4000, 3), -1)}, [4000]))["action"]
    touched = (action != -1).any(-1)
    assert ((action != -1).all(-1) == touched).all()  # never a partly replaced action
    assert touched.float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert spec.is_in(action[touched])


def test_actor_then_exploration_with_a_one_hot_spec():
    spec = OneHot(shape=(3,), dtype=torch.int64, n=3)
    policy = TensorDictSequential(QValueActor(Fixed(Q), spec=spec), EGreedyModule(spec=spec, eps_init=0.5))
    td = run(policy)
    assert spec.is_in(td["action"]) and td["chosen_action_value"].shape == (4, 1)


def test_state_dict_round_trip_restores_the_schedule():
    explore = EGreedyModule(4, eps_init=1.0, eps_end=0.1, annealing_frames=100)
    explore.step(40)
    state = explore.state_dict()
    fresh = EGreedyModule(4, eps_init=1.0, eps_end=0.1, annealing_frames=100)
    fresh.load_state_dict(state)
    assert fresh.frames == 40 and fresh.eps == pytest.approx(explore.eps) == pytest.approx(0.64)


def test_egreedy_argument_errors():
    with pytest.raises(ValueError, match="n_actions"):
        EGreedyModule()
    with pytest.raises(ValueError, match="eps_init"):
        EGreedyModule(2, eps_init=1.5)
    with pytest.raises(ValueError, match="annealing_frames"):
        EGreedyModule(2, annealing_frames=0)
    with pytest.raises(ValueError, match="disagrees"):
        EGreedyModule(3, spec=Categorical(shape=(), dtype=torch.int64, n=2))


# ----------------------------------------------------------------------------------------- squashed-normal bounds


def test_probabilistic_actor_passes_its_precomputed_bounds_to_every_distribution():
    net = TensorDictModule(nn.Sequential(MLP(2, in_features=3, num_cells=(8,)), NormalParamExtractor()),
                           in_keys=["observation"], out_keys=["loc", "scale"])
    actor = ProbabilisticActor(net, spec=Bounded(torch.tensor([-1.0]), torch.tensor([3.0])))
    td = TensorDict({"observation": torch.randn(4, 3)}, [4])
    first, second = actor.get_dist(td.copy()), actor.get_dist(td.copy())
    assert first._half is second._half is actor.module[1].half_range  # converted once, by the actor
    torch.testing.assert_close((first._mid, first._half, first._log_half),
                               (torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([2.0]).log()))
    assert not hasattr(distributions, "_bounds_cache")  # no module-level state behind the distributions
    loc, scale = torch.randn(4, 1), torch.rand(4, 1) + 0.1
    given = TanhNormal(loc, scale, bounds=TanhBounds.of(torch.tensor([-1.0]), torch.tensor([3.0])))
    action = torch.rand(4, 1) * 4 - 1
    torch.testing.assert_close(given.log_prob(action), TanhNormal(loc, scale, -1.0, 3.0).log_prob(action))
    actor.double()  # the bounds are buffers: they follow, and the distribution is float64 throughout
    dist = actor.get_dist(td.double())
    assert dist._half.dtype == dist.mode.dtype == torch.float64
