"""Continuous-action policy modules: TanhNormal, the probabilistic and deterministic actors, critics, noise.

Values are checked against formulas computed by hand (the change of variables, the OU recursion) or against
statistics over many samples.
"""

import math

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import InteractionType, TensorDictModule, TensorDictSequential, set_interaction_type
from torch import distributions as D
from torch import nn

from streamrl import (
    MLP,
    Actor,
    AdditiveGaussianModule,
    Bounded,
    Categorical,
    EpsilonAnnealing,
    Event,
    IndependentNormal,
    NormalParamExtractor,
    OrnsteinUhlenbeckModule,
    ProbabilisticActor,
    TanhNormal,
    Unbounded,
    ValueOperator,
)

GREEDY = (InteractionType.DETERMINISTIC, InteractionType.MODE, InteractionType.MEAN)


def by_hand_log_prob(value, loc, scale, low, high):
    """log p(a) for a = mid + half * tanh(x), x ~ Normal(loc, scale), summed over the last dim."""
    mid, half = (high + low) / 2, (high - low) / 2
    x = torch.atanh((value - mid) / half)
    return (D.Normal(loc, scale).log_prob(x) - torch.log(1 - torch.tanh(x) ** 2) - torch.log(half)).sum(-1)


def gaussian_net(n_obs=4, n_act=3):
    return TensorDictModule(nn.Sequential(MLP(2 * n_act, in_features=n_obs, num_cells=(16,)), NormalParamExtractor()),
                            in_keys=["observation"], out_keys=["loc", "scale"])


def observations(n=64, n_obs=4):
    return TensorDict({"observation": torch.randn(n, n_obs)}, batch_size=[n])


def event(frames):
    return Event("chunk", "env", 0.0, {"frames": frames})


# ---------------------------------------------------------------------------------------------------- TanhNormal


def test_tanh_normal_samples_lie_within_the_bounds_and_carry_gradients():
    loc = torch.tensor([[-30.0, 0.0, 30.0], [1.0, -2.0, 0.5]], requires_grad=True)
    scale = torch.tensor([[0.1, 5.0, 1.0], [2.0, 0.5, 3.0]])
    low, high = torch.tensor([-2.0, 0.0, -1.0]), torch.tensor([3.0, 0.5, 1.0])
    dist = TanhNormal(loc, scale, low, high)
    samples = dist.rsample((2000,))
    assert samples.shape == (2000, 2, 3) and dist.batch_shape == (2,) and dist.event_shape == (3,)
    assert bool(((samples >= low) & (samples <= high)).all())
    assert samples[:, 0, 0].max() < -1.99 and samples[:, 0, 2].min() > 0.99  # saturated at the bounds
    samples.sum().backward()
    assert loc.grad is not None and bool(torch.isfinite(loc.grad).all()) and loc.grad[1].abs().min() > 0
    assert not dist.sample().requires_grad


def test_tanh_normal_log_prob_is_the_change_of_variables_formula():
    torch.manual_seed(0)
    loc, scale = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, 3, dtype=torch.float64) + 0.2
    low, high = torch.tensor([-2.0, 0.0, -1.0], dtype=torch.float64), torch.tensor([3.0, 0.5, 1.0],
                                                                                   dtype=torch.float64)
    dist = TanhNormal(loc, scale, low, high)
    value = dist.sample().clone()  # a new tensor: log_prob recovers x by atanh
    log_prob = dist.log_prob(value)
    assert log_prob.shape == (5,)
    torch.testing.assert_close(log_prob, by_hand_log_prob(value, loc, scale, low, high))
    # event_dims=0: one log-probability per element
    elementwise = TanhNormal(loc, scale, low, high, event_dims=0)
    assert elementwise.event_shape == () and elementwise.log_prob(value).shape == (5, 3)
    torch.testing.assert_close(elementwise.log_prob(value).sum(-1), log_prob)


def test_tanh_normal_log_prob_is_finite_at_and_near_the_bounds():
    loc, scale = torch.tensor([0.3, -0.2]), torch.tensor([0.5, 2.0])
    low, high = torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 1.0])
    dist = TanhNormal(loc.requires_grad_(), scale, low, high)
    at_bounds = torch.stack([low, high, low + 1e-7, high - 1e-7])
    log_prob = dist.log_prob(at_bounds)
    assert bool(torch.isfinite(log_prob).all())
    log_prob.sum().backward()
    assert loc.grad is not None and bool(torch.isfinite(loc.grad).all())
    # near (not at) the bounds, in float64, the value is the exact formula: the clamp does not touch it
    loc64, scale64, low64, high64 = (t.detach().double() for t in (loc, scale, low, high))
    near = torch.stack([low64 + 1e-9, high64 - 1e-9 * (high64 - low64)])
    near_lp = TanhNormal(loc64, scale64, low64, high64).log_prob(near)
    assert bool(torch.isfinite(near_lp).all())
    torch.testing.assert_close(near_lp, by_hand_log_prob(near, loc64, scale64, low64, high64))


def test_tanh_normal_scores_a_saturated_draw_from_its_pre_tanh_value():
    loc, scale, low, high = torch.tensor([20.0, -1.0]), torch.tensor([1.0, 1.0]), -1.0, 1.0
    torch.manual_seed(3)
    x = D.Normal(loc, scale).rsample()
    exact = (D.Normal(loc, scale).log_prob(x) - 2 * (math.log(2) - x - nn.functional.softplus(-2 * x))).sum()
    torch.manual_seed(3)
    dist = TanhNormal(loc, scale, low, high)
    action = dist.rsample()
    assert action[0] == 1.0  # tanh rounded to the bound: atanh cannot recover x
    torch.testing.assert_close(dist.log_prob(action), exact)  # the tensor rsample returned: its draw is cached
    recovered = dist.log_prob(action.clone())  # any other tensor: clamped below the bound, finite, not exact
    assert bool(torch.isfinite(recovered)) and not torch.isclose(recovered, exact)


def test_a_recorded_log_prob_equals_the_learners_rescoring_even_at_the_bounds():
    # PPO: the actor records sample_log_prob while acting; the learner rescores a copy of the stored action
    torch.manual_seed(0)
    dist = TanhNormal(torch.full((10_000, 1), 7.0), torch.ones(10_000, 1), -3.0, 3.0)
    action, recorded = dist.rsample_and_log_prob()
    assert (action.abs() == 3.0).any()  # some draws saturate in float32
    rescored = TanhNormal(torch.full((10_000, 1), 7.0), torch.ones(10_000, 1), -3.0, 3.0).log_prob(action.clone())
    assert torch.equal(recorded, rescored)  # every ratio is exactly 1 before the first update


def test_tanh_normal_mode_is_the_squashed_loc_and_mean_the_expected_action():
    loc, scale = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[1.5, 0.3, 3.0]])
    low, high = torch.tensor([-2.0, 0.0, -1.0]), torch.tensor([2.0, 1.0, 3.0])
    dist = TanhNormal(loc, scale, low, high)
    expected_mode = (high + low) / 2 + (high - low) / 2 * torch.tanh(loc)
    torch.testing.assert_close(dist.mode, expected_mode)
    torch.testing.assert_close(dist.deterministic_sample, expected_mode)
    torch.manual_seed(0)
    empirical = dist.sample((400_000,)).mean(0)
    torch.testing.assert_close(dist.mean, empirical, atol=8e-3, rtol=0)
    assert (dist.mean - expected_mode).abs().max() > 0.05  # the mean is not the mode when scale is large


def test_tanh_normal_rejects_bounds_it_cannot_squash_into_and_has_no_entropy():
    with pytest.raises(ValueError, match="finite bounds with low < high"):
        TanhNormal(torch.zeros(2), torch.ones(2), 1.0, 1.0)
    with pytest.raises(ValueError, match="IndependentNormal"):
        TanhNormal(torch.zeros(2), torch.ones(2), -math.inf, 1.0)
    with pytest.raises(NotImplementedError):
        TanhNormal(torch.zeros(2), torch.ones(2)).entropy()


def test_independent_normal_sums_the_event_dims():
    loc, scale = torch.randn(4, 3), torch.rand(4, 3) + 0.1
    dist = IndependentNormal(loc, scale)
    value = torch.randn(4, 3)
    torch.testing.assert_close(dist.log_prob(value), D.Normal(loc, scale).log_prob(value).sum(-1))
    torch.testing.assert_close(dist.entropy(), D.Normal(loc, scale).entropy().sum(-1))
    assert torch.equal(dist.deterministic_sample, loc) and torch.equal(dist.mode, loc)


# ---------------------------------------------------------------------------------------------------- actors


def test_probabilistic_actor_writes_actions_in_the_spec_bounds_and_their_log_prob():
    spec = Bounded(low=-2.0, high=2.0, shape=(3,), dtype=torch.float32)
    actor = ProbabilisticActor(gaussian_net(), spec=spec)
    assert actor.out_keys == ["loc", "scale", "action", "sample_log_prob"] and actor.in_keys == ["observation"]
    td = actor(observations())
    action = td["action"]
    assert action.shape == (64, 3) and td["sample_log_prob"].shape == (64,) and "action_log_prob" not in td
    assert spec.is_in(action)
    dist = actor.get_dist(td.select("observation"))
    assert isinstance(dist, TanhNormal) and torch.equal(dist.low, spec.low) and torch.equal(dist.high, spec.high)
    torch.testing.assert_close(td["sample_log_prob"], dist.log_prob(action), atol=1e-4, rtol=1e-5)


def test_probabilistic_actor_follows_the_interaction_type():
    actor = ProbabilisticActor(gaussian_net(), spec=Bounded(low=-2.0, high=2.0, shape=(3,), dtype=torch.float32))
    obs = observations(8)
    with torch.no_grad():
        params = actor.module[0](obs.clone())
        loc, scale = params["loc"], params["scale"]
        for kind in (InteractionType.DETERMINISTIC, InteractionType.MODE):
            with set_interaction_type(kind):
                torch.testing.assert_close(actor(obs.clone())["action"], 2 * torch.tanh(loc))
        with set_interaction_type(InteractionType.MEAN):
            mean = actor(obs.clone())["action"]
        torch.manual_seed(0)
        empirical = TanhNormal(loc, scale, -2.0, 2.0).sample((200_000,)).mean(0)
        torch.testing.assert_close(mean, empirical, atol=1e-2, rtol=0)
        draws = [actor(obs.clone())["action"] for _ in range(2)]  # RANDOM: the default outside any block
        with set_interaction_type(InteractionType.RANDOM):
            draws.append(actor(obs.clone())["action"])
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert not torch.allclose(draws[0], 2 * torch.tanh(loc))


def test_probabilistic_actor_takes_bounds_from_distribution_kwargs_or_uses_an_unsquashed_normal():
    actor = ProbabilisticActor(gaussian_net(), distribution_kwargs={"low": 0.0, "high": 5.0})
    with set_interaction_type(InteractionType.DETERMINISTIC):
        td = actor(observations())
    torch.testing.assert_close(td["action"], 2.5 + 2.5 * torch.tanh(td["loc"]))
    normal = ProbabilisticActor(gaussian_net(), spec=Unbounded(shape=(3,), dtype=torch.float32),
                                distribution_class=IndependentNormal)
    td = normal(observations())
    expected = D.Normal(td["loc"], td["scale"]).log_prob(td["action"]).sum(-1)
    torch.testing.assert_close(td["sample_log_prob"], expected)
    assert normal.spec.shape == (3,)


def test_probabilistic_actor_explains_wrong_arguments():
    spec = Bounded(low=-2.0, high=2.0, shape=(3,), dtype=torch.float32)
    with pytest.raises(TypeError, match="wrap it: TensorDictModule"):
        ProbabilisticActor(nn.Linear(4, 6), spec=spec)
    with pytest.raises(ValueError, match=r"reads \['mu'\], which module does not write"):
        ProbabilisticActor(gaussian_net(), in_keys={"loc": "mu", "scale": "scale"})
    with pytest.raises(TypeError, match="spec must be a Bounded spec"):
        ProbabilisticActor(gaussian_net(), spec=Unbounded(shape=(3,), dtype=torch.float32))
    with pytest.raises(ValueError, match=r"distribution_kwargs low=-1.0 differs from the Bounded spec's low=\[-2.0"):
        ProbabilisticActor(gaussian_net(), spec=spec, distribution_kwargs={"low": -1.0})
    agreeing = ProbabilisticActor(gaussian_net(), spec=spec, distribution_kwargs={"low": -2.0, "high": 2.0})
    assert agreeing.spec is spec  # tutorial 002 gives both: accepted when they agree
    with pytest.raises(ValueError, match="out_keys must hold one key"):
        ProbabilisticActor(gaussian_net(), out_keys=("action", "other"))


def test_probabilistic_actor_bounds_follow_the_module_and_stay_out_of_the_state_dict():
    spec = Bounded(low=-2.0, high=2.0, shape=(3,), dtype=torch.float32)
    actor = ProbabilisticActor(gaussian_net(), spec=spec).to("cpu")
    state = actor.state_dict()
    assert not any(key.endswith(("low", "high")) for key in state)
    twin = ProbabilisticActor(gaussian_net(), spec=spec)
    twin.load_state_dict(state)
    obs = observations()
    with set_interaction_type(InteractionType.DETERMINISTIC):
        torch.testing.assert_close(twin(obs.clone())["action"], actor(obs.clone())["action"])
        doubled = actor.double()(obs.double())
    assert actor.module[1].low.dtype == torch.float64 and doubled["action"].dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_actor_bounds_move_to_the_gpu_with_the_module():
    spec = Bounded(low=-2.0, high=2.0, shape=(3,), dtype=torch.float32)
    actor = ProbabilisticActor(gaussian_net(), spec=spec).to("cuda")
    deterministic = Actor(MLP(3, in_features=4), spec=spec).to("cuda")
    explore = OrnsteinUhlenbeckModule(spec).to("cuda")
    obs = observations().to("cuda")
    assert actor.module[1].low.device.type == "cuda" and deterministic.low.device.type == "cuda"
    td = explore(actor(obs.clone()))
    assert td["action"].device.type == "cuda" and bool((td["action"].abs() <= 2).all())
    assert deterministic(obs.clone())["action"].device.type == "cuda"


def test_actor_squashes_the_module_output_into_the_spec_bounds():
    spec = Bounded(low=torch.tensor([-2.0, 0.0]), high=torch.tensor([2.0, 1.0]), shape=(2,), dtype=torch.float32)
    net = nn.Linear(4, 2)
    actor = Actor(net, spec=spec)
    td = observations()
    with torch.no_grad():
        net.weight.mul_(100)  # outputs far beyond the bounds
        out = net(td["observation"])
        action = actor(td)["action"]
    torch.testing.assert_close(action, spec.low + (spec.high - spec.low) * (torch.tanh(out) + 1) / 2)
    assert spec.is_in(action) and actor.out_keys == ["action"]
    # without a spec the module is responsible for the range; several in_keys are passed as arguments
    raw = Actor(nn.Bilinear(4, 3, 2), in_keys=("observation", "goal"))
    td = observations().update({"goal": torch.randn(64, 3)})
    with torch.no_grad():
        torch.testing.assert_close(raw(td)["action"], raw.module(td["observation"], td["goal"]))


def test_value_operator_names_its_output_after_its_inputs():
    value = ValueOperator(MLP(1, in_features=4))
    assert value.out_keys == ["state_value"]
    td = observations()
    with torch.no_grad():
        torch.testing.assert_close(value(td)["state_value"], value.module(td["observation"]))
    q = ValueOperator(MLP(1, in_features=6), in_keys=("observation", "action"))
    assert q.out_keys == ["state_action_value"] and q.in_keys == ["observation", "action"]
    td.set("action", torch.randn(64, 2))
    with torch.no_grad():
        expected = q.module(torch.cat([td["observation"], td["action"]], -1))
        torch.testing.assert_close(q(td)["state_action_value"], expected)
    assert ValueOperator(MLP(1), out_keys=("v",)).out_keys == ["v"]
    with pytest.raises(ValueError, match="non-empty sequence"):
        ValueOperator(MLP(1), in_keys="observation")


# ---------------------------------------------------------------------------------------------------- noise


def wide(n=2):
    return Bounded(low=-100.0, high=100.0, shape=(n,), dtype=torch.float32)


def actions(n, dims=2, value=0.0):
    return TensorDict({"action": torch.full((n, dims), value)}, batch_size=[n])


def test_gaussian_noise_has_the_annealed_sigma_and_mean():
    explore = AdditiveGaussianModule(wide(), sigma_init=0.5, sigma_end=0.1, annealing_frames=1000, mean=0.3)
    torch.manual_seed(0)
    noise = explore(actions(200_000))["action"]
    torch.testing.assert_close(noise.std(0), torch.full((2,), 0.5), rtol=0.01, atol=0)
    torch.testing.assert_close(noise.mean(0), torch.full((2,), 0.3), rtol=0, atol=5e-3)
    explore.step(500)
    assert explore.sigma == pytest.approx(0.3)
    explore.step(600)
    assert explore.sigma == pytest.approx(0.1)
    explore.step(10_000)
    assert explore.sigma == pytest.approx(0.1)
    noise = explore(actions(200_000))["action"]
    torch.testing.assert_close(noise.std(0), torch.full((2,), 0.1), rtol=0.01, atol=0)


@pytest.mark.parametrize("make", [lambda spec: AdditiveGaussianModule(spec, sigma_init=2.0),
                                  lambda spec: OrnsteinUhlenbeckModule(spec, sigma=20.0, theta=1.0, dt=1.0)])
def test_noise_is_clipped_into_the_spec_bounds(make):
    spec = Bounded(low=torch.tensor([-1.0, 0.0]), high=torch.tensor([1.0, 0.5]), shape=(2,), dtype=torch.float32)
    explore = make(spec)
    action = explore(actions(1000, value=0.4))["action"]
    assert spec.is_in(action)
    assert bool((action == spec.high).any(0).all()) and bool((action == spec.low).any(0).all())


@pytest.mark.parametrize("make", [lambda: AdditiveGaussianModule(wide()), lambda: OrnsteinUhlenbeckModule(wide())])
def test_noise_is_off_under_deterministic_interaction_types(make):
    explore = make()
    for kind in GREEDY:
        with set_interaction_type(kind):
            assert torch.equal(explore(actions(16, value=0.25))["action"], torch.full((16, 2), 0.25))
    assert getattr(explore, "state", None) is None  # OU: the process did not advance either
    with set_interaction_type(InteractionType.RANDOM):
        assert not torch.equal(explore(actions(16, value=0.25))["action"], torch.full((16, 2), 0.25))
    assert not torch.equal(explore(actions(16, value=0.25))["action"], torch.full((16, 2), 0.25))


def test_ou_noise_reverts_to_zero_with_positive_autocorrelation():
    theta, dt, sigma = 1.0, 0.1, 0.5
    explore = OrnsteinUhlenbeckModule(Unbounded(shape=(1,), dtype=torch.float32), theta=theta, sigma=sigma, dt=dt)
    torch.manual_seed(0)
    noise = torch.stack([explore(actions(20_000, dims=1))["action"][:, 0] for _ in range(80)]).double()
    assert noise[0].std() == pytest.approx(sigma * math.sqrt(dt), rel=0.02)  # from 0: one increment
    now, later = noise[40:-1].flatten(), noise[41:].flatten()  # stationary by step 40
    slope = ((later - now) * now).sum() / (now * now).sum()
    assert slope == pytest.approx(-theta * dt, abs=0.01)  # pulled back to 0 at rate theta
    correlation = torch.corrcoef(torch.stack([now, later]))[0, 1]
    assert correlation == pytest.approx(1 - theta * dt, abs=0.01) and correlation > 0
    stationary_var = sigma**2 * dt / (1 - (1 - theta * dt) ** 2)
    assert noise[-1].var() == pytest.approx(stationary_var, rel=0.05)


def test_ou_noise_restarts_for_rows_whose_episode_starts():
    theta, dt, sigma = 0.5, 0.2, 1.0
    explore = OrnsteinUhlenbeckModule(wide(), theta=theta, sigma=sigma, dt=dt)
    for _ in range(5):
        explore(actions(3).update({"step_count": torch.tensor([[4], [4], [4]])}))
    previous = explore.state.clone()
    torch.manual_seed(7)
    eps = torch.randn(3, 2)
    torch.manual_seed(7)
    out = explore(actions(3).update({"step_count": torch.tensor([[0], [5], [0]])}))["action"]
    restarted = torch.tensor([[True], [False], [True]])
    expected = torch.where(restarted, 0.0, previous * (1 - theta * dt)) + math.sqrt(dt) * eps
    torch.testing.assert_close(explore.state, expected)
    torch.testing.assert_close(out, sigma * expected)
    # a bool flag marks starts with True; without the entry nothing restarts
    flagged = OrnsteinUhlenbeckModule(wide(), theta=theta, dt=dt, reset_key="is_init")
    flagged(actions(2))
    previous = flagged.state.clone()
    torch.manual_seed(1)
    eps = torch.randn(2, 2)
    torch.manual_seed(1)
    flagged(actions(2).update({"is_init": torch.tensor([[False], [True]])}))
    expected = torch.where(torch.tensor([[False], [True]]), 0.0, previous * (1 - theta * dt)) + math.sqrt(dt) * eps
    torch.testing.assert_close(flagged.state, expected)
    previous = flagged.state.clone()
    torch.manual_seed(2)
    eps = torch.randn(2, 2)
    torch.manual_seed(2)
    flagged(actions(2))
    torch.testing.assert_close(flagged.state, previous * (1 - theta * dt) + math.sqrt(dt) * eps)


def test_ou_sigma_anneals_and_a_new_batch_shape_restarts_the_process():
    explore = OrnsteinUhlenbeckModule(wide(), sigma=0.4, sigma_end=0.1, annealing_frames=100)
    assert explore.sigma == pytest.approx(0.4)
    explore.step(50)
    assert explore.sigma == pytest.approx(0.25)
    explore.step(50)
    assert explore.sigma == pytest.approx(0.1)
    assert OrnsteinUhlenbeckModule(wide(), sigma=0.4).sigma == pytest.approx(0.4)  # sigma_end=None: constant
    explore(actions(4))
    explore(actions(6))
    assert explore.state.shape == (6, 2)


@pytest.mark.parametrize("make", [lambda: AdditiveGaussianModule(wide(), annealing_frames=1000),
                                  lambda: OrnsteinUhlenbeckModule(wide(), sigma_end=0.0, annealing_frames=1000)])
def test_noise_schedules_round_trip_through_the_state_dict_and_the_annealing_hook(make):
    explore = make()
    hook = EpsilonAnnealing(explore)
    hook.on_event(event(300))
    hook.on_event(event(700))
    assert explore.frames == 700
    state = explore.to("cpu").state_dict()
    assert set(state) == {"_extra_state"}  # the bounds are the spec's, not saved
    restored = make()
    restored.load_state_dict(state)
    assert restored.frames == 700 and restored.sigma == pytest.approx(explore.sigma)


def test_noise_modules_explain_wrong_arguments():
    with pytest.raises(TypeError, match="floating-point Bounded or Unbounded"):
        AdditiveGaussianModule(Categorical(shape=(), dtype=torch.int64, n=3))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        AdditiveGaussianModule(wide(), sigma_init=-1.0)
    with pytest.raises(ValueError, match="annealing_frames must be >= 1"):
        OrnsteinUhlenbeckModule(wide(), annealing_frames=0)
    with pytest.raises(ValueError, match="dt > 0"):
        OrnsteinUhlenbeckModule(wide(), dt=0.0)


def test_a_ddpg_policy_explores_within_bounds_and_acts_greedily_in_evaluation():
    spec = Bounded(low=-2.0, high=2.0, shape=(2,), dtype=torch.float32)
    actor = Actor(MLP(2, in_features=4, num_cells=(16,)), spec=spec)
    policy = TensorDictSequential(actor, AdditiveGaussianModule(spec, sigma_init=0.5))
    obs = observations()
    with torch.no_grad():
        greedy = actor(obs.clone())["action"]
        explored = policy(obs.clone())["action"]
        with set_interaction_type(InteractionType.DETERMINISTIC):
            evaluated = policy(obs.clone())["action"]
    assert spec.is_in(explored) and not torch.equal(explored, greedy)
    torch.testing.assert_close(evaluated, greedy)
