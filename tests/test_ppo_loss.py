"""Policy-gradient losses against formulas written out by hand on a small fixed batch."""

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
from torch import distributions as D
from torch import nn

from streamrl import A2CLoss, ClipPPOLoss, LossKeys, ReinforceLoss
from streamrl.objectives.ppo import entropy

EPS = 0.2
RATIOS = [1.5, 0.5, 1.05, 1.5, 0.5]  # current / acting probability of each row's action
ADVANTAGES = [1.0, -1.0, 2.0, -2.0, 0.5]
# rows 0 and 1 leave the trust region on the side the advantage pushes towards: clipped, no gradient;
# row 2 is inside it; rows 3 and 4 left it on the other side: the unclipped term is the smaller one


def make_actor(distribution_class=D.Normal):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), NormalParamExtractor())
    return ProbabilisticTensorDictSequential(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        ProbabilisticTensorDictModule(in_keys=["loc", "scale"], out_keys=["action"],
                                      distribution_class=distribution_class, return_log_prob=True),
    )


def make_critic():
    torch.manual_seed(1)
    return TensorDictModule(nn.Linear(3, 1), in_keys=["observation"], out_keys=["state_value"])


def loc_scale(actor, batch):
    with torch.no_grad():
        return actor.module[0].module(batch["observation"])


def normal_log_prob(action, loc, scale):
    """Per row: the log-density of a diagonal normal, summed over the action's dims."""
    return (-((action - loc) ** 2) / (2 * scale**2) - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def make_batch(actor, ratios=RATIOS, advantages=ADVANTAGES):
    g = torch.Generator().manual_seed(2)
    n = len(ratios)
    batch = TensorDict({
        "observation": torch.randn(n, 3, generator=g),
        "action": torch.randn(n, 2, generator=g),
        "advantage": torch.tensor(advantages).unsqueeze(-1),
        "value_target": torch.tensor([0.3, -2.0, 1.0, 0.1, 4.0][:n]).unsqueeze(-1),
    }, batch_size=[n])
    loc, scale = loc_scale(actor, batch)
    current = normal_log_prob(batch["action"], loc, scale)
    # the acting policy's log-probabilities, set so that current / acting = ratios
    batch.set("sample_log_prob", current - torch.tensor(ratios).log())
    return batch


def smooth_l1(value, target):
    d = (value - target).abs()
    return torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()


def normal_entropy(scale):
    return (0.5 + 0.5 * math.log(2 * math.pi) + scale.log()).sum(-1)


def critic_values(critic, batch):
    with torch.no_grad():
        return critic.module(batch["observation"]).squeeze(-1)


def test_clip_ppo_equals_the_formula():
    actor, critic = make_actor(), make_critic()
    batch = make_batch(actor)
    out = ClipPPOLoss(actor, critic, clip_epsilon=EPS, entropy_coef=0.01, critic_coef=0.5)(batch)
    surrogate = []
    for r, a in zip(RATIOS, ADVANTAGES, strict=True):
        if a >= 0:  # pessimistic: gains from raising the ratio stop at 1 + eps
            surrogate.append(min(r, 1 + EPS) * a)
        else:  # ... and from lowering it at 1 - eps
            surrogate.append(max(r, 1 - EPS) * a)
    assert out["loss_objective"].item() == pytest.approx(-sum(surrogate) / 5, rel=1e-5)
    value, target = critic_values(critic, batch), batch["value_target"].squeeze(-1)
    assert out["loss_critic"].item() == pytest.approx(0.5 * smooth_l1(value, target).item(), rel=1e-5)
    _, scale = loc_scale(actor, batch)
    mean_entropy = normal_entropy(scale).mean().item()
    assert out["entropy"].item() == pytest.approx(mean_entropy, rel=1e-5)
    assert out["loss_entropy"].item() == pytest.approx(-0.01 * mean_entropy, rel=1e-5)
    total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    r = torch.tensor(RATIOS)
    assert out["kl_approx"].item() == pytest.approx((r - 1 - r.log()).mean().item(), rel=1e-5)
    assert out["clip_fraction"].item() == pytest.approx(4 / 5)
    assert out["ess"].item() == pytest.approx((r.sum() ** 2 / (5 * (r**2).sum())).item(), rel=1e-5)
    assert not out["kl_approx"].requires_grad and not out["entropy"].requires_grad


def test_clip_ppo_l2_critic_normalized_advantages_and_no_entropy_bonus():
    actor, critic = make_actor(), make_critic()
    batch = make_batch(actor)
    out = ClipPPOLoss(actor, critic, clip_epsilon=EPS, entropy_bonus=False, loss_critic_type="l2",
                      normalize_advantage=True)(batch)
    a = torch.tensor(ADVANTAGES)
    a = (a - a.mean()) / a.std()
    r = torch.tensor(RATIOS)
    surrogate = torch.minimum(r * a, r.clamp(1 - EPS, 1 + EPS) * a)
    assert out["loss_objective"].item() == pytest.approx(-surrogate.mean().item(), rel=1e-5)
    value, target = critic_values(critic, batch), batch["value_target"].squeeze(-1)
    assert out["loss_critic"].item() == pytest.approx(((value - target) ** 2).mean().item(), rel=1e-5)
    assert "loss_entropy" not in out.keys() and "entropy" not in out.keys()
    assert out["loss"].item() == pytest.approx((out["loss_objective"] + out["loss_critic"]).item(), rel=1e-6)


def test_gradients_reach_actor_and_critic_and_leave_the_batch_alone():
    actor, critic = make_actor(), make_critic()
    batch = make_batch(actor)
    keys_before = set(batch.keys())
    ClipPPOLoss(actor, critic)(batch)["loss"].backward()
    for module in (actor, critic):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert set(batch.keys()) == keys_before  # no loc/scale/state_value (with their graphs) written into it


@pytest.mark.parametrize("row", range(5))
def test_clipped_rows_give_no_objective_gradient(row):
    actor = make_actor()
    batch = make_batch(actor)[row:row + 1]
    out = ClipPPOLoss(actor, make_critic(), clip_epsilon=EPS, entropy_bonus=False)(batch)
    out["loss_objective"].backward()
    grad = sum(p.grad.abs().sum() for p in actor.parameters())
    clipped = row in (0, 1)
    assert (grad == 0) == clipped


def test_acting_log_probs_as_the_actor_writes_them():
    # tensordict's probabilistic modules write per-dim log-probs at "action_log_prob": summed per row, and the
    # policy that acted is the current one, so every ratio is 1
    actor = make_actor()
    batch = make_batch(actor).exclude("sample_log_prob", "action")
    with torch.no_grad():
        actor(batch)
    assert batch["action_log_prob"].shape == (5, 2)
    loss = ClipPPOLoss(actor, make_critic(), keys=LossKeys(sample_log_prob="action_log_prob"))
    out = loss(batch)
    assert out["loss_objective"].item() == pytest.approx(-sum(ADVANTAGES) / 5, rel=1e-6)
    assert out["kl_approx"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["clip_fraction"].item() == 0.0
    assert out["ess"].item() == pytest.approx(1.0)


def test_a2c_equals_the_formula():
    actor, critic = make_actor(), make_critic()
    batch = make_batch(actor)
    out = A2CLoss(actor, critic, entropy_coef=0.1, critic_coef=2.0, loss_critic_type="l2")(batch)
    loc, scale = loc_scale(actor, batch)
    log_prob = normal_log_prob(batch["action"], loc, scale)
    a = torch.tensor(ADVANTAGES)
    assert out["loss_objective"].item() == pytest.approx(-(log_prob * a).mean().item(), rel=1e-5)
    value, target = critic_values(critic, batch), batch["value_target"].squeeze(-1)
    assert out["loss_critic"].item() == pytest.approx(2.0 * ((value - target) ** 2).mean().item(), rel=1e-5)
    assert out["loss_entropy"].item() == pytest.approx(-0.1 * normal_entropy(scale).mean().item(), rel=1e-5)
    total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None for p in [*actor.parameters(), *critic.parameters()])


def test_reinforce_with_and_without_a_baseline():
    actor = make_actor()
    batch = make_batch(actor).exclude("sample_log_prob")  # on-policy: not needed
    loc, scale = loc_scale(actor, batch)
    expected = -(normal_log_prob(batch["action"], loc, scale) * torch.tensor(ADVANTAGES)).mean().item()
    alone = ReinforceLoss(actor)(batch)
    assert set(alone.keys()) == {"loss_objective", "loss"}
    assert alone["loss"].item() == pytest.approx(expected, rel=1e-5)
    critic = make_critic()
    out = ReinforceLoss(actor, critic)(batch)
    value, target = critic_values(critic, batch), batch["value_target"].squeeze(-1)
    assert out["loss_critic"].item() == pytest.approx(smooth_l1(value, target).item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected + out["loss_critic"].item(), rel=1e-5)


def tanh_normal(loc, scale):
    return D.TransformedDistribution(D.Normal(loc, scale), [D.TanhTransform(cache_size=1)])


def test_entropy_falls_back_to_a_reparameterised_sample():
    loc, scale = torch.zeros(4, 2, requires_grad=True), torch.ones(4, 2)
    dist = tanh_normal(loc, scale)
    torch.manual_seed(3)
    estimate = entropy(dist)
    torch.manual_seed(3)
    x = dist.base_dist.rsample()
    torch.testing.assert_close(estimate, -dist.log_prob(x.tanh()), rtol=1e-4, atol=1e-4)
    estimate.sum().backward()
    # through the sample x = loc + scale * noise, only log|d tanh(x)/dx| = log(1 - tanh(x)^2) depends on loc
    torch.testing.assert_close(loc.grad, -2 * x.detach().tanh())
    # in the loss: actions in (-1, 1), entropy from the fallback, gradients to the actor
    actor = make_actor(tanh_normal)
    batch = make_batch(actor).exclude("sample_log_prob")
    batch.set("action", batch["action"].tanh())
    out = A2CLoss(actor, make_critic(), entropy_coef=1.0)(batch)
    assert torch.isfinite(out["entropy"])
    out["loss_entropy"].backward()
    assert any(p.grad.abs().sum() > 0 for p in actor.parameters())


class NoEntropy(D.Bernoulli):
    def entropy(self):
        raise NotImplementedError


def test_errors_say_what_to_do():
    actor, critic = make_actor(), make_critic()
    with pytest.raises(TypeError, match="neither entropy\\(\\) nor rsample\\(\\).*entropy_bonus=False"):
        entropy(NoEntropy(probs=torch.tensor([0.3])))
    with pytest.raises(KeyError, match="no 'sample_log_prob'.*LossKeys\\(sample_log_prob=...\\)"):
        ClipPPOLoss(actor, critic)(make_batch(actor).exclude("sample_log_prob"))
    with pytest.raises(ValueError, match="loss_critic_type must be 'smooth_l1' or 'l2', got 'l1'"):
        A2CLoss(actor, critic, loss_critic_type="l1")
    with pytest.raises(ValueError, match=r"clip_epsilon must be in \(0, 1\), got 1.5"):
        ClipPPOLoss(actor, critic, clip_epsilon=1.5)
    with pytest.raises(ValueError, match="coefficients must be >= 0"):
        ReinforceLoss(actor, critic, critic_coef=-1.0)
