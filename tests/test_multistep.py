"""n-step returns on chunks against a plain Python loop."""

import pytest
import torch
from tensordict import TensorDict

from streamrl.replay.multistep import MultiStep


def reference(reward, done, gamma, n):
    """Per row: (return, steps, index of the row whose next observation is bootstrapped from)."""
    num_envs, T = reward.shape
    out = []
    for e in range(num_envs):
        row = []
        for t in range(T):
            total, k = 0.0, 0
            while k < n and t + k < T:
                total += gamma**k * float(reward[e, t + k])
                k += 1
                if done[e, t + k - 1]:
                    break
            row.append((total, k, t + k - 1))
        out.append(row)
    return out


@pytest.mark.parametrize(("num_envs", "T", "n"), [(1, 5, 1), (3, 12, 3), (2, 7, 10)])
def test_multistep_equals_a_python_loop(num_envs, T, n):
    g = torch.Generator().manual_seed(n)
    reward = torch.rand(num_envs, T, 1, generator=g)
    done = torch.rand(num_envs, T, 1, generator=g) < 0.25
    obs = torch.arange(num_envs * T, dtype=torch.float32).reshape(num_envs, T, 1)
    chunk = TensorDict({"observation": obs, "next": {"observation": obs + 1000, "reward": reward, "done": done,
                                                      "terminated": done}}, [num_envs, T])
    out = MultiStep(0.9, n)(chunk.clone())
    for e, row in enumerate(reference(reward[..., 0], done[..., 0], 0.9, n)):
        for t, (total, k, last) in enumerate(row):
            assert out["next", "reward"][e, t, 0].item() == pytest.approx(total, rel=1e-6)
            assert out["next", "gamma"][e, t, 0].item() == pytest.approx(0.9**k, rel=1e-6)
            assert out["next", "observation"][e, t, 0].item() == obs[e, last, 0].item() + 1000
            assert bool(out["next", "done"][e, t, 0]) == bool(done[e, last, 0])
    assert torch.equal(out["observation"], obs)  # the root is untouched


def test_multistep_says_what_it_expects():
    with pytest.raises(ValueError, match="n must be >= 1"):
        MultiStep(0.9, 0)
    with pytest.raises(ValueError, match=r"chunks \[num_envs, T\]"):
        MultiStep(0.9, 2)(TensorDict({}, [4]))
