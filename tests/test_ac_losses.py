"""DDPG, TD3 and SAC losses against formulas written out by hand, on tiny linear modules and a fixed batch."""

import math

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import (
    NormalParamExtractor,
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
)
from torch import nn

from streamrl import MLP, Actor, Bounded, DDPGLoss, ProbabilisticActor, SACLoss, SoftUpdate, TD3Loss, ValueOperator


class CatLinear(nn.Module):
    """Q(s, a) = [s, a] @ w + b, with set weights."""

    def __init__(self, w, b, outputs=1):
        super().__init__()
        self.linear = nn.Linear(3, outputs)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(w).reshape(outputs, 3))
            self.linear.bias.fill_(b)

    def forward(self, observation, action):
        return self.linear(torch.cat([observation, action], -1))


def linear(w, b, outputs=1):
    layer = nn.Linear(2, outputs)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(w).reshape(outputs, 2))
        layer.bias.copy_(torch.as_tensor(b, dtype=torch.float32).reshape(outputs))
    return layer


def actor(w=(0.5, -1.0), b=0.1):
    return TensorDictModule(linear(w, b), in_keys=["observation"], out_keys=["action"])


def critic(w=(1.0, 2.0, -0.5), b=0.3):
    return TensorDictModule(CatLinear(w, b), in_keys=["observation", "action"], out_keys=["state_action_value"])


OBS = torch.tensor([[1.0, 0.0], [0.5, -1.0], [-2.0, 1.0]])
NEXT_OBS = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
ACTION = torch.tensor([[0.2], [-0.4], [1.0]])
REWARD = torch.tensor([1.0, -0.5, 2.0])
TERMINATED = torch.tensor([0.0, 1.0, 0.0])  # row 1 ends: no bootstrap; row 2 is truncated: bootstraps


def batch(**extra):
    return TensorDict({
        "observation": OBS, "action": ACTION, **extra,
        "next": {"observation": NEXT_OBS, "reward": REWARD.reshape(3, 1),
                 "terminated": TERMINATED.bool().reshape(3, 1),
                 "truncated": torch.tensor([[False], [False], [True]])},
    }, batch_size=[3])


def mu(obs, w, b):
    return obs @ torch.tensor(w).reshape(2, 1) + b


def q_fn(obs, action, w, b):
    return (torch.cat([obs, action], -1) @ torch.tensor(w).reshape(3, 1) + b).reshape(-1)


def set_linear(module, w, b):
    layer = next(m for m in module.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(w).reshape(layer.weight.shape))
        layer.bias.fill_(b)


def test_ddpg_loss_matches_the_formulas_by_hand():
    loss_fn = DDPGLoss(actor(), critic(), gamma=0.9)
    set_linear(loss_fn.target_actor, (1.0, 1.0), 0.0)
    set_linear(loss_fn.target_critics[0], (0.5, 0.5, 1.0), -0.2)
    weight = torch.tensor([1.0, 0.5, 2.0])
    out = loss_fn(batch(weight=weight))
    next_q = q_fn(NEXT_OBS, mu(NEXT_OBS, (1.0, 1.0), 0.0), (0.5, 0.5, 1.0), -0.2)
    target = REWARD + 0.9 * (1 - TERMINATED) * next_q
    q = q_fn(OBS, ACTION, (1.0, 2.0, -0.5), 0.3)
    assert out["loss_value"].item() == pytest.approx((weight * (q - target) ** 2).mean().item(), rel=1e-6)
    actor_q = q_fn(OBS, mu(OBS, (0.5, -1.0), 0.1), (1.0, 2.0, -0.5), 0.3)
    assert out["loss_actor"].item() == pytest.approx(-actor_q.mean().item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx((out["loss_actor"] + out["loss_value"]).item(), rel=1e-6)
    assert torch.allclose(out["td_error"], (q - target).abs())
    assert out["q_value"].item() == pytest.approx(q.mean().item(), rel=1e-6)
    assert out["target_value"].item() == pytest.approx(target.mean().item(), rel=1e-6)
    assert batch().get("action").equal(ACTION)  # the loss wrote its actions elsewhere


def test_ddpg_smooth_l1_and_n_step_discounts():
    loss_fn = DDPGLoss(actor(), critic(), gamma=0.9, loss_function="smooth_l1")
    gamma = torch.tensor([0.5, 0.9, 0.25])
    out = loss_fn(batch().set(("next", "gamma"), gamma.reshape(3, 1)))
    next_q = q_fn(NEXT_OBS, mu(NEXT_OBS, (0.5, -1.0), 0.1), (1.0, 2.0, -0.5), 0.3)  # targets start as copies
    target = REWARD + gamma * (1 - TERMINATED) * next_q
    q = q_fn(OBS, ACTION, (1.0, 2.0, -0.5), 0.3)
    expected = nn.functional.smooth_l1_loss(q, target)
    assert out["loss_value"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_each_term_reaches_only_its_own_network():
    loss_fn = DDPGLoss(actor(), critic(), gamma=0.9)
    out = loss_fn(batch())
    actor_params, critic_params = list(loss_fn.actor.parameters()), list(loss_fn.critics.parameters())
    from_actor_loss = torch.autograd.grad(out["loss_actor"], critic_params, retain_graph=True, allow_unused=True)
    from_critic_loss = torch.autograd.grad(out["loss_value"], actor_params, retain_graph=True, allow_unused=True)
    assert all(g is None for g in from_actor_loss) and all(g is None for g in from_critic_loss)
    out["loss"].backward()
    assert all(p.grad is not None for p in actor_params + critic_params)
    assert all(p.grad is None for p in loss_fn.target_critics.parameters())


def test_one_optimizer_over_the_sum_equals_one_optimizer_per_network():
    torch.manual_seed(0)
    joint = DDPGLoss(actor(), critic(), gamma=0.9)
    split = DDPGLoss(actor(), critic(), gamma=0.9)
    opt = torch.optim.Adam(joint.parameters(), lr=0.01)
    opt_actor = torch.optim.Adam(split.actor.parameters(), lr=0.01)
    opt_critic = torch.optim.Adam(split.critics.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        joint(batch())["loss"].backward()
        opt.step()
        out = split(batch())
        opt_actor.zero_grad()
        opt_critic.zero_grad()
        out["loss_value"].backward(inputs=list(split.critics.parameters()), retain_graph=True)
        out["loss_actor"].backward(inputs=list(split.actor.parameters()))
        opt_actor.step()
        opt_critic.step()
    for a, b in zip(joint.parameters(), split.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(joint.actor.module.weight, actor().module.weight)  # it did train


class FixedNoiseNormal(torch.distributions.Normal):
    """A normal whose reparameterized samples use fixed noise, so a test can write the sample down."""

    EPS = torch.tensor([[0.5], [-1.0], [0.25]])

    def rsample(self, sample_shape=torch.Size()):  # noqa: B008
        return self.loc + self.scale * self.EPS


class LocScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = linear([[0.5, -1.0], [0.2, 0.1]], [0.1, -0.3], outputs=2)

    def forward(self, observation):
        out = self.linear(observation)
        return out[..., :1], out[..., 1:].exp()


def sac_actor():
    return ProbabilisticTensorDictSequential(
        TensorDictModule(LocScale(), in_keys=["observation"], out_keys=["loc", "scale"]),
        ProbabilisticTensorDictModule(in_keys=["loc", "scale"], out_keys=["action"],
                                      distribution_class=FixedNoiseNormal),
    )


def sac_sample(obs):
    loc = obs @ torch.tensor([0.5, -1.0]).reshape(2, 1) + 0.1
    log_scale = obs @ torch.tensor([0.2, 0.1]).reshape(2, 1) - 0.3
    action = loc + log_scale.exp() * FixedNoiseNormal.EPS
    log_prob = (-FixedNoiseNormal.EPS**2 / 2 - log_scale - 0.5 * math.log(2 * math.pi)).reshape(-1)
    return action, log_prob


Q1, Q2 = ((1.0, 2.0, -0.5), 0.3), ((-0.5, 1.0, 0.7), 0.0)


def test_sac_loss_matches_the_formulas_by_hand():
    loss_fn = SACLoss(sac_actor(), [critic(*Q1), critic(*Q2)], gamma=0.9, alpha_init=0.5)
    set_linear(loss_fn.target_critics[1], (0.5, 0.5, 1.0), -0.2)
    out = loss_fn(batch())
    alpha = 0.5
    next_action, next_log_prob = sac_sample(NEXT_OBS)
    next_q = torch.minimum(q_fn(NEXT_OBS, next_action, *Q1), q_fn(NEXT_OBS, next_action, (0.5, 0.5, 1.0), -0.2))
    target = REWARD + 0.9 * (1 - TERMINATED) * (next_q - alpha * next_log_prob)
    q1, q2 = q_fn(OBS, ACTION, *Q1), q_fn(OBS, ACTION, *Q2)
    loss_critic = ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()
    action, log_prob = sac_sample(OBS)
    actor_q = torch.minimum(q_fn(OBS, action, *Q1), q_fn(OBS, action, *Q2))
    loss_actor = (alpha * log_prob - actor_q).mean()
    loss_alpha = -(math.log(alpha) * (log_prob - 1.0)).mean()  # target entropy "auto": -action_dim = -1
    for key, expected in [("loss_qvalue", loss_critic), ("loss_actor", loss_actor), ("loss_alpha", loss_alpha),
                          ("loss", loss_critic + loss_actor + loss_alpha), ("entropy", -log_prob.mean()),
                          ("target_value", target.mean()), ("q_value", torch.stack([q1, q2]).mean())]:
        assert out[key].item() == pytest.approx(expected.item(), rel=1e-6), key
    assert out["alpha"].item() == pytest.approx(alpha)
    assert torch.allclose(out["td_error"], torch.maximum((q1 - target).abs(), (q2 - target).abs()))


def test_sac_alpha_gradient_follows_the_entropy_gap_and_fixed_alpha_stays():
    loss_fn = SACLoss(sac_actor(), [critic(*Q1), critic(*Q2)], gamma=0.9, target_entropy=-3.0)
    out = loss_fn(batch())
    (grad,) = torch.autograd.grad(out["loss"], [loss_fn.log_alpha], retain_graph=True)
    _, log_prob = sac_sample(OBS)
    assert grad.item() == pytest.approx(-(log_prob - 3.0).mean().item(), rel=1e-6)
    critic_params = list(loss_fn.critics.parameters())
    from_actor = torch.autograd.grad(out["loss_actor"], critic_params, retain_graph=True, allow_unused=True)
    assert all(g is None for g in from_actor)
    fixed = SACLoss(sac_actor(), [critic(*Q1), critic(*Q2)], gamma=0.9, alpha_init=0.2, fixed_alpha=True)
    out = fixed(batch())
    assert out["loss_alpha"].item() == 0.0 and out["alpha"].item() == pytest.approx(0.2)
    assert all(p is not fixed.log_alpha for p in fixed.parameters())


def test_one_ensemble_critic_equals_a_list_of_critics():
    pair = SACLoss(sac_actor(), [critic(*Q1), critic(*Q2)], gamma=0.9)
    ensemble_net = CatLinear([*Q1[0], *Q2[0]], 0.0, outputs=2)
    with torch.no_grad():
        ensemble_net.linear.bias.copy_(torch.tensor([Q1[1], Q2[1]]))
    ensemble = SACLoss(sac_actor(), TensorDictModule(ensemble_net, ["observation", "action"], [
        "state_action_value"]), gamma=0.9)
    a, b = pair(batch()), ensemble(batch())
    for key in ("loss_qvalue", "loss_actor", "loss_alpha", "target_value"):
        assert a[key].item() == pytest.approx(b[key].item(), rel=1e-6), key


SPEC = Bounded(shape=(1,), dtype=torch.float32, low=-2.0, high=2.0)


def test_td3_targets_use_the_smaller_target_critic_and_clipped_smoothing_noise():
    loss_fn = TD3Loss(actor(), [critic(*Q1), critic(*Q2)], gamma=0.9, action_spec=SPEC, noise_clip=0.0)
    set_linear(loss_fn.target_actor, (3.0, 3.0), 0.0)  # some next actions leave [-2, 2]: they are clamped
    out = loss_fn(batch())
    next_action = mu(NEXT_OBS, (3.0, 3.0), 0.0).clamp(-2.0, 2.0)
    next_q = torch.minimum(q_fn(NEXT_OBS, next_action, *Q1), q_fn(NEXT_OBS, next_action, *Q2))
    target = REWARD + 0.9 * (1 - TERMINATED) * next_q
    q1, q2 = q_fn(OBS, ACTION, *Q1), q_fn(OBS, ACTION, *Q2)
    expected = ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()
    assert out["loss_qvalue"].item() == pytest.approx(expected.item(), rel=1e-6)
    noisy = TD3Loss(actor(), [critic(*Q1), critic(*Q2)], gamma=0.9, action_spec=SPEC, policy_noise=1.0,
                    noise_clip=0.3)
    torch.manual_seed(1)
    target_noisy = noisy(batch())["target_value"]
    torch.manual_seed(1)
    noise = (torch.randn(3, 1) * 2.0).clamp(-0.6, 0.6)  # scaled and clipped in units of the half-range 2
    assert (noise.abs() == 0.6).any() and (noise.abs() < 0.6).any()  # the draw exercises both cases
    next_action = (mu(NEXT_OBS, (0.5, -1.0), 0.1) + noise).clamp(-2.0, 2.0)
    next_q = torch.minimum(q_fn(NEXT_OBS, next_action, *Q1), q_fn(NEXT_OBS, next_action, *Q2))
    expected = (REWARD + 0.9 * (1 - TERMINATED) * next_q).mean()
    assert target_noisy.item() == pytest.approx(expected.item(), rel=1e-6)


def test_td3_updates_the_actor_every_policy_delay_calls():
    loss_fn = TD3Loss(actor(), [critic(*Q1), critic(*Q2)], gamma=0.9, action_spec=SPEC, policy_delay=3)
    updated = []
    for _ in range(6):
        loss_fn.zero_grad(set_to_none=True)
        out = loss_fn(batch())
        out["loss"].backward()
        updated.append(loss_fn.actor.module.weight.grad is not None)
        if updated[-1]:
            expected = -q_fn(OBS, mu(OBS, (0.5, -1.0), 0.1), *Q1).mean()
            assert out["loss_actor"].item() == pytest.approx(expected.item(), rel=1e-6)
        else:
            assert out["loss_actor"].item() == 0.0
    assert updated == [False, False, True, False, False, True]
    restored = TD3Loss(actor(), [critic(*Q1), critic(*Q2)], gamma=0.9, action_spec=SPEC, policy_delay=3)
    restored.load_state_dict(loss_fn.state_dict())
    assert restored.calls == 6


def test_soft_update_moves_target_actor_and_critics():
    loss_fn = TD3Loss(actor(), [critic(*Q1), critic(*Q2)], gamma=0.9, action_spec=SPEC)
    set_linear(loss_fn.target_actor, (1.0, 1.0), 0.0)
    set_linear(loss_fn.target_critics[1], (0.0, 0.0, 0.0), 1.0)
    assert len(loss_fn.target_pairs()) == 6  # weight and bias of the actor and of each critic
    SoftUpdate(loss_fn, tau=0.25).step()
    assert torch.allclose(loss_fn.target_actor.module.weight, torch.tensor([[0.875, 0.5]]))
    assert torch.allclose(loss_fn.target_critics[1].module.linear.weight, 0.25 * torch.tensor([Q2[0]]))
    assert loss_fn.target_critics[1].module.linear.bias.item() == pytest.approx(0.75)
    sac = SACLoss(sac_actor(), [critic(*Q1), critic(*Q2)])
    assert len(sac.target_pairs()) == 4  # SAC has no target actor


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="gamma must be in"):
        DDPGLoss(actor(), critic(), gamma=1.5)
    with pytest.raises(ValueError, match="loss_function must be one of"):
        DDPGLoss(actor(), critic(), loss_function="huber")
    with pytest.raises(ValueError, match="expected 1 critic"):
        DDPGLoss(actor(), [critic(), critic()])
    lazy = TensorDictModule(MLP(1), in_keys=["observation"], out_keys=["action"])
    with pytest.raises(ValueError, match="uninitialized"):
        DDPGLoss(lazy, critic())
    with pytest.raises(TypeError, match="must be probabilistic"):
        SACLoss(actor(), [critic(), critic()])
    with pytest.raises(ValueError, match="alpha_init must be > 0"):
        SACLoss(sac_actor(), [critic(), critic()], alpha_init=0.0)
    with pytest.raises(TypeError, match="must be a Bounded spec"):
        TD3Loss(actor(), [critic(), critic()], action_spec=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="policy_delay >= 1"):
        TD3Loss(actor(), [critic(), critic()], action_spec=SPEC, policy_delay=0)
    with pytest.raises(ValueError, match="expected at least 2 Q-value"):
        TD3Loss(actor(), critic(), action_spec=SPEC)(batch())


class PeakAt(nn.Module):
    """Q(s, a) = w - (a - peak)^2 over the [s, a] a ValueOperator concatenates: training moves w, not the peak."""

    def __init__(self, peak):
        super().__init__()
        self.peak = peak
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return -((x[..., -1:] - self.peak) ** 2) + self.w


def random_batch(n=64):
    return TensorDict({
        "observation": torch.randn(n, 2), "action": torch.rand(n, 1) * 4 - 2,
        "next": {"observation": torch.randn(n, 2), "reward": torch.randn(n, 1),
                 "terminated": torch.zeros(n, 1, dtype=torch.bool)},
    }, batch_size=[n])


def test_ddpg_with_the_library_actor_moves_actions_to_the_critics_peak():
    torch.manual_seed(0)
    actor_module = Actor(MLP(1, in_features=2, num_cells=(16,)), spec=SPEC)
    loss_fn = DDPGLoss(actor_module, ValueOperator(PeakAt(1.5), in_keys=["observation", "action"]), gamma=0.9)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        loss_fn(random_batch())["loss"].backward()
        optimizer.step()
    actions = actor_module(TensorDict({"observation": torch.randn(32, 2)}, [32]))["action"]
    assert torch.allclose(actions, torch.full_like(actions, 1.5), atol=0.05)


@pytest.mark.parametrize(("target_entropy", "rises"), [(5.0, True), (-10.0, False)])
def test_sac_with_the_library_actor_tunes_alpha_towards_the_target_entropy(target_entropy, rises):
    torch.manual_seed(0)
    net = nn.Sequential(MLP(2, in_features=2, num_cells=(16,)), NormalParamExtractor())
    prob_actor = ProbabilisticActor(TensorDictModule(net, ["observation"], ["loc", "scale"]), spec=SPEC)
    critics = [ValueOperator(MLP(1, in_features=3, num_cells=(16,)), in_keys=["observation", "action"])
               for _ in range(2)]
    loss_fn = SACLoss(prob_actor, critics, gamma=0.9, target_entropy=target_entropy)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=0.01)
    for _ in range(20):
        optimizer.zero_grad()
        out = loss_fn(random_batch())
        out["loss"].backward()
        optimizer.step()
        assert all(torch.isfinite(out[key]) for key in ("loss", "entropy", "q_value"))
    assert (out["alpha"].item() > 1.0) is rises
