"""Value estimators against forward-view Python loops; episode boundaries; the keyed modules on chunks."""

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn

from streamrl import (
    GAE,
    TD0Estimator,
    TD1Estimator,
    TDLambdaEstimator,
    ValueKeys,
    gae,
    td0_return,
    td1_return,
    td_lambda_return,
)

GAMMA, LMBDA = 0.9, 0.8


def random_chunk(shape, seed, p_end=0.15):
    """Rewards, values and end flags ``shape`` (time last), with terminations and truncations (done = either)."""
    g = torch.Generator().manual_seed(seed)
    reward, value, next_value = (torch.randn(shape, generator=g) for _ in range(3))
    terminated = torch.rand(shape, generator=g) < p_end
    truncated = torch.rand(shape, generator=g) < p_end
    return reward, value, next_value, terminated, terminated | truncated


def bootstrap(next_value, terminated, done, s, last):
    """What the step ``s`` that ends a return adds after its reward (before discounting)."""
    if terminated[s]:
        return 0.0  # a terminal state: nothing follows
    if done[s] or s == last:
        return float(next_value[s])  # truncation or the chunk's end: the value of the true next observation
    raise AssertionError("a return only stops at an episode end or the chunk's end")


def end_of(done, t, last):
    """The step that ends the episode running at ``t`` within the chunk (an episode end or the last step)."""
    s = t
    while not done[s] and s < last:
        s += 1
    return s


def ref_td0(reward, value, next_value, terminated, done):
    T = len(reward)
    out = []
    for t in range(T):
        if terminated[t]:
            out.append(float(reward[t]))
        else:  # truncated or running: the next observation's value
            out.append(float(reward[t]) + GAMMA * float(next_value[t]))
    return out


def ref_td1(reward, value, next_value, terminated, done):
    """Monte-Carlo: the discounted rewards up to the episode's (or chunk's) end, then its bootstrap."""
    last = len(reward) - 1
    out = []
    for t in range(last + 1):
        s = end_of(done, t, last)
        ret = sum(GAMMA ** (k - t) * float(reward[k]) for k in range(t, s + 1))
        out.append(ret + GAMMA ** (s - t + 1) * bootstrap(next_value, terminated, done, s, last))
    return out


def ref_td_lambda(reward, value, next_value, terminated, done):
    """The lambda-weighted average of the n-step returns (forward view); the longest takes the remaining weight."""
    last = len(reward) - 1
    out = []
    for t in range(last + 1):
        s = end_of(done, t, last)
        n_max = s - t + 1
        total = 0.0
        for n in range(1, n_max + 1):
            rewards = sum(GAMMA**k * float(reward[t + k]) for k in range(n))
            end = t + n - 1
            if end == s:
                g_n = rewards + GAMMA**n * bootstrap(next_value, terminated, done, s, last)
            else:  # inside the episode: no end flags here, bootstrap from the next observation
                g_n = rewards + GAMMA**n * float(next_value[end])
            weight = LMBDA ** (n - 1) if n == n_max else (1 - LMBDA) * LMBDA ** (n - 1)
            total += weight * g_n
        out.append(total)
    return out


def ref_gae(reward, value, next_value, terminated, done):
    """Advantages as the (gamma * lambda)-discounted sum of TD errors up to the episode's end."""
    last = len(reward) - 1
    deltas = []
    for t in range(last + 1):
        if terminated[t]:
            deltas.append(float(reward[t]) - float(value[t]))
        else:
            deltas.append(float(reward[t]) + GAMMA * float(next_value[t]) - float(value[t]))
    out = []
    for t in range(last + 1):
        s = end_of(done, t, last)
        out.append(sum((GAMMA * LMBDA) ** (k - t) * deltas[k] for k in range(t, s + 1)))
    return out


def per_env(reference, *tensors):
    """Apply a 1-D reference to every row of ``[..., T]`` tensors; ``[..., T]`` float64 result."""
    shape = tensors[0].shape
    rows = [t.reshape(-1, shape[-1]) for t in tensors]
    out = [reference(*(r[i] for r in rows)) for i in range(rows[0].shape[0])]
    return torch.tensor(out, dtype=torch.float64).reshape(shape)


def close(actual, expected):
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


SHAPES = [(7,), (3, 11), (2, 4, 9), (2, 300)]


@pytest.mark.parametrize("shape", SHAPES)
def test_td0_equals_the_loop(shape):
    reward, value, next_value, terminated, done = data = random_chunk(shape, seed=0)
    close(td0_return(GAMMA, reward, next_value, terminated), per_env(ref_td0, *data))


@pytest.mark.parametrize("shape", SHAPES)
def test_td1_equals_the_loop(shape):
    reward, value, next_value, terminated, done = data = random_chunk(shape, seed=1)
    close(td1_return(GAMMA, reward, next_value, terminated, done), per_env(ref_td1, *data))


@pytest.mark.parametrize("shape", SHAPES)
def test_td_lambda_equals_the_loop(shape):
    reward, value, next_value, terminated, done = data = random_chunk(shape, seed=2)
    close(td_lambda_return(GAMMA, LMBDA, reward, next_value, terminated, done), per_env(ref_td_lambda, *data))


@pytest.mark.parametrize("shape", SHAPES)
def test_gae_equals_the_loop(shape):
    reward, value, next_value, terminated, done = data = random_chunk(shape, seed=3)
    advantage, target = gae(GAMMA, LMBDA, value, next_value, reward, terminated, done)
    expected = per_env(ref_gae, *data)
    close(advantage, expected)
    close(target, expected + value.double())


def test_long_episodes_without_ends():
    # one episode over the whole chunk: the scan's longest spans, against the same loops
    reward, value, next_value, terminated, done = data = random_chunk((2, 300), seed=4, p_end=0.0)
    close(td1_return(GAMMA, reward, next_value, terminated, done), per_env(ref_td1, *data))
    close(gae(GAMMA, LMBDA, value, next_value, reward, terminated, done)[0], per_env(ref_gae, *data))


def test_lambda_zero_and_one_are_td0_and_td1():
    reward, value, next_value, terminated, done = random_chunk((4, 20), seed=5)
    close(td_lambda_return(GAMMA, 0.0, reward, next_value, terminated, done),
          td0_return(GAMMA, reward, next_value, terminated).double())
    close(td_lambda_return(GAMMA, 1.0, reward, next_value, terminated, done),
          td1_return(GAMMA, reward, next_value, terminated, done).double())


@pytest.mark.parametrize("end", ["terminated", "truncated"])
def test_an_episode_end_inside_a_chunk_does_not_leak(end):
    reward, value, next_value, _, _ = random_chunk((1, 10), seed=6)
    terminated = torch.zeros(1, 10, dtype=torch.bool)
    done = torch.zeros(1, 10, dtype=torch.bool)
    done[0, 4] = True
    terminated[0, 4] = end == "terminated"
    # the next episode (from step 5, which could be an auto-reset row) changes entirely
    reward2, value2, next_value2 = reward.clone(), value.clone(), next_value.clone()
    for t in (reward2, value2, next_value2):
        t[0, 5:] += 100.0
    fns = [
        lambda r, v, nv: td1_return(GAMMA, r, nv, terminated, done),
        lambda r, v, nv: td_lambda_return(GAMMA, LMBDA, r, nv, terminated, done),
        lambda r, v, nv: gae(GAMMA, LMBDA, v, nv, r, terminated, done)[0],
    ]
    for fn in fns:
        before, after = fn(reward, value, next_value), fn(reward2, value2, next_value2)
        assert torch.equal(before[0, :5], after[0, :5])
        assert not torch.equal(before[0, 5:], after[0, 5:])
    # at the end itself: a termination bootstraps nothing, a truncation the next observation's value
    expected = reward[0, 4] + (0.0 if end == "terminated" else GAMMA * next_value[0, 4])
    assert td1_return(GAMMA, reward, next_value, terminated, done)[0, 4].item() == pytest.approx(expected.item())


def test_functions_say_what_shapes_they_take():
    reward, value, next_value, terminated, done = random_chunk((3, 5), seed=7)
    with pytest.raises(ValueError, match=r"one shape \[\.\.\., T\], time last"):
        td0_return(GAMMA, reward.unsqueeze(-1), next_value, terminated)
    with pytest.raises(ValueError, match=r"squeeze\(-1\)"):
        gae(GAMMA, LMBDA, value, next_value, reward, terminated, done.unsqueeze(-1))


# -- the keyed modules ------------------------------------------------------------------------------------------


def make_critic(seed=0):
    torch.manual_seed(seed)
    return TensorDictModule(nn.Linear(3, 1), in_keys=["observation"], out_keys=["state_value"])


def make_chunk(num_envs=3, T=11, seed=8):
    reward, _, _, terminated, done = random_chunk((num_envs, T), seed=seed)
    g = torch.Generator().manual_seed(seed)
    return TensorDict({
        "observation": torch.randn(num_envs, T, 3, generator=g),
        "next": {
            "observation": torch.randn(num_envs, T, 3, generator=g),
            "reward": reward.unsqueeze(-1),
            "terminated": terminated.unsqueeze(-1),
            "truncated": (done & ~terminated).unsqueeze(-1),
            "done": done.unsqueeze(-1),
        },
    }, batch_size=[num_envs, T])


def critic_values(critic, chunk):
    with torch.no_grad():
        return critic.module(chunk["observation"]).squeeze(-1), critic.module(chunk["next", "observation"]).squeeze(-1)


def flags(chunk):
    return (chunk["next", "reward"].squeeze(-1), chunk["next", "terminated"].squeeze(-1),
            chunk["next", "done"].squeeze(-1))


@pytest.mark.parametrize("kind", ["td0", "td1", "td_lambda", "gae"])
def test_modules_run_the_critic_and_write_advantage_and_target(kind):
    critic, chunk = make_critic(), make_chunk()
    value, next_value = critic_values(critic, chunk)
    reward, terminated, done = flags(chunk)
    if kind == "td0":
        module = TD0Estimator(gamma=GAMMA, value_network=critic)
        target = td0_return(GAMMA, reward, next_value, terminated)
    elif kind == "td1":
        module = TD1Estimator(gamma=GAMMA, value_network=critic)
        target = td1_return(GAMMA, reward, next_value, terminated, done)
    elif kind == "td_lambda":
        module = TDLambdaEstimator(gamma=GAMMA, lmbda=LMBDA, value_network=critic)
        target = td_lambda_return(GAMMA, LMBDA, reward, next_value, terminated, done)
    else:
        module = GAE(gamma=GAMMA, lmbda=LMBDA, value_network=critic)
        target = gae(GAMMA, LMBDA, value, next_value, reward, terminated, done)[1]
    out = module(chunk)
    assert out is chunk
    for key in ("state_value", "advantage", "value_target"):
        assert out[key].shape == (3, 11, 1)
        assert not out[key].requires_grad
    torch.testing.assert_close(out["state_value"].squeeze(-1), value)
    torch.testing.assert_close(out["value_target"].squeeze(-1), target)
    torch.testing.assert_close(out["advantage"].squeeze(-1), target - value)
    assert "state_value" not in out["next"].keys()  # only the declared outputs are written


def test_gae_module_on_time_only_batches_and_unsqueezed_entries():
    critic, chunk = make_critic(), make_chunk(num_envs=1, T=9)
    single = chunk[0]  # batch [T]
    single.set(("next", "reward"), single["next", "reward"].squeeze(-1))  # [T] entries are taken as well
    out = GAE(gamma=GAMMA, lmbda=LMBDA, value_network=critic)(single.clone())
    expected = GAE(gamma=GAMMA, lmbda=LMBDA, value_network=critic)(chunk)["advantage"][0]
    torch.testing.assert_close(out["advantage"], expected)


def test_average_gae_normalizes_over_valid_rows():
    critic, chunk = make_critic(), make_chunk(num_envs=4, T=16)
    valid = torch.ones(4, 16, dtype=torch.bool)
    valid[:, 3] = False
    chunk.set("valid", valid)
    raw = GAE(gamma=GAMMA, lmbda=LMBDA, value_network=critic)(chunk.clone())["advantage"]
    raw[~valid] = 1e4  # rows that are not transitions must not enter the statistics
    chunk.set("advantage", raw)
    out = GAE(gamma=GAMMA, lmbda=LMBDA, value_network=critic, average_gae=True)(chunk)["advantage"]
    rows = out[valid]
    assert rows.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert rows.std().item() == pytest.approx(1.0, rel=1e-5)
    plain = raw[valid]
    torch.testing.assert_close(rows, (plain - plain.mean()) / plain.std())


def test_average_gae_of_a_single_valid_row_is_centred_not_nan():
    critic, chunk = make_critic(), make_chunk(num_envs=1, T=2)
    chunk.set("valid", torch.tensor([[True, False]]))
    out = GAE(gamma=GAMMA, lmbda=LMBDA, value_network=critic, average_gae=True)(chunk)["advantage"]
    assert torch.isfinite(out).all() and out[0, 0].abs().item() < 1e-6


def test_no_critic_gives_monte_carlo_returns():
    chunk = make_chunk()
    reward, terminated, done = flags(chunk)
    out = TD1Estimator(gamma=GAMMA, value_network=None)(chunk)
    zeros = torch.zeros_like(reward)
    expected = td1_return(GAMMA, reward, zeros, terminated, done)
    torch.testing.assert_close(out["advantage"].squeeze(-1), expected)
    torch.testing.assert_close(out["value_target"].squeeze(-1), expected)
    assert torch.equal(out["state_value"], torch.zeros(3, 11, 1))


def test_keys_are_configurable():
    torch.manual_seed(0)
    critic = TensorDictModule(nn.Linear(3, 1), in_keys=["observation"], out_keys=["v"])
    chunk = make_chunk()
    chunk.rename_key_(("next", "reward"), ("next", "r"))
    keys = ValueKeys(reward=("next", "r"), value="v", advantage="adv", value_target="ret")
    out = GAE(gamma=GAMMA, lmbda=LMBDA, value_network=critic, keys=keys)(chunk)
    reference = GAE(gamma=GAMMA, lmbda=LMBDA, value_network=make_critic())(make_chunk())
    torch.testing.assert_close(out["adv"], reference["advantage"])
    torch.testing.assert_close(out["ret"], reference["value_target"])
    torch.testing.assert_close(out["v"], reference["state_value"])


def test_modules_say_what_they_expect():
    critic = make_critic()
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        GAE(gamma=1.5, lmbda=0.9, value_network=critic)
    with pytest.raises(ValueError, match=r"lmbda must be in \[0, 1\]"):
        TDLambdaEstimator(gamma=0.9, lmbda=-0.1, value_network=critic)
    with pytest.raises(ValueError, match=r"needs a time dim"):
        GAE(gamma=0.9, lmbda=0.9, value_network=critic)(make_chunk()[0, 0])
    chunk = make_chunk()
    chunk.set(("next", "reward"), torch.zeros(3, 11, 2))
    with pytest.raises(ValueError, match=r"\('next', 'reward'\): expected shape \(3, 11, 1\) or \(3, 11\)"):
        GAE(gamma=0.9, lmbda=0.9, value_network=critic)(chunk)
