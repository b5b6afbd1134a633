"""Replay samplers: the sum-tree, prioritized, without-replacement, slice and FIFO samplers, the priority hook."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torch import nn

import streamrl
from streamrl import (
    DQNLoss,
    FifoSampler,
    LearnerStage,
    Pipeline,
    PrioritizedSampler,
    PriorityUpdate,
    RamStorage,
    RateLimiter,
    ReplayBuffer,
    SamplerStage,
    SamplerWithoutReplacement,
    SliceSampler,
    SumTree,
    WriterStage,
    ZarrStorage,
)
from streamrl.errors import StoreError
from streamrl.events import Event
from streamrl.testing import ListSource, random_chunks


def numbered(start, n):
    """Rows that carry their write number ``t``."""
    return TensorDict({"t": torch.arange(start, start + n)}, batch_size=[n])


def filled(capacity, n):
    storage = RamStorage(capacity)
    storage.extend(numbered(0, n))
    return storage


# -- sum-tree -------------------------------------------------------------------------------------------------

updates = st.lists(st.lists(st.tuples(st.integers(0, 39), st.integers(0, 50)), min_size=1, max_size=12),
                   min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 40), batches=updates, fractions=st.lists(st.floats(0, 1, exclude_max=True),
                                                                         min_size=1, max_size=20))
def test_sum_tree_nodes_are_sums_of_leaves_and_find_picks_the_containing_interval(capacity, batches, fractions):
    tree = SumTree(capacity)
    leaves = np.zeros(capacity)
    ever_set = np.zeros(capacity, dtype=bool)
    for batch in batches:
        index = np.array([i % capacity for i, _ in batch])
        values = np.array([float(v) for _, v in batch])
        tree.update(index, values)
        for i, v in zip(index, values, strict=True):  # the reference: last write wins
            leaves[i], ever_set[i] = v, True
    padded = np.zeros(tree.size)
    padded[:capacity] = leaves
    for level in range(tree.depth + 1):  # node k of a level covers a run of size >> level leaves
        nodes = tree.sums[1 << level:2 << level]
        assert np.array_equal(nodes, padded.reshape(1 << level, -1).sum(1)), level
    assert tree.total == leaves.sum()
    assert tree.min == (leaves[ever_set].min() if ever_set.any() else math.inf)
    if tree.total == 0:
        return
    cum = np.concatenate([[0.0], np.cumsum(leaves)])
    queries = np.array(fractions) * tree.total
    queries = np.concatenate([queries, cum[:-1][cum[:-1] < tree.total]])  # exact interval starts too
    found = tree.find(queries)
    assert np.all((cum[found] <= queries) & (queries < cum[found + 1]))


def test_sum_tree_takes_the_last_of_repeated_indices_and_restores_its_state():
    tree = SumTree(5)
    tree.update([3, 1, 3, 3], [7.0, 2.0, 1.0, 4.0])
    assert tree[[1, 3]].tolist() == [2.0, 4.0] and tree.total == 6.0 and tree.min == 2.0
    again = SumTree(5)
    again.load_state_dict(tree.state_dict())
    assert np.array_equal(again.sums, tree.sums) and np.array_equal(again.mins, tree.mins)
    with pytest.raises(IndexError, match=r"leaf indices must be in \[0, 5\), got min=0, max=5"):
        tree.update([0, 5], [1.0, 1.0])


# -- prioritized ----------------------------------------------------------------------------------------------

def chi_square_critical(dof, z=3.0902):
    """Upper critical value of chi-square (z = 3.0902: p = 0.001), Wilson-Hilferty approximation."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_prioritized_sampling_frequencies_follow_priorities_to_the_alpha():
    n, alpha, draws = 20, 0.6, 100_000
    rb = ReplayBuffer(RamStorage(n), sampler=PrioritizedSampler(
        alpha=alpha, generator=torch.Generator().manual_seed(0)))
    rb.extend(numbered(0, n))
    rb.sample(1)  # the sampler learns of the rows
    priority = torch.arange(1, n + 1, dtype=torch.float64)
    rb.sampler.update_priority(torch.arange(n), priority)
    counts = np.zeros(n)
    for _ in range(draws // 250):
        np.add.at(counts, rb.sample(250)["index"].numpy(), 1)
    critical = chi_square_critical(n - 1)

    def chi_square(probs):
        expected = draws * probs / probs.sum()
        return float(((counts - expected) ** 2 / expected).sum())

    p = priority.numpy() + 1e-6
    assert chi_square(p ** alpha) < critical
    assert chi_square(p) > critical  # alpha is applied: plain priorities are rejected ...
    assert chi_square(np.ones(n)) > critical  # ... and so is uniform sampling


def test_importance_weights_match_the_formula_and_new_rows_get_the_max_priority():
    sampler = PrioritizedSampler(alpha=0.5, beta=0.4, eps=1.0, generator=torch.Generator().manual_seed(1))
    rb = ReplayBuffer(RamStorage(8), sampler=sampler)
    rb.extend(numbered(0, 4))
    rb.sample(1)
    assert sampler.tree is not None and sampler.tree[range(4)].tolist() == [1.0] * 4  # max_priority ** alpha
    sampler.update_priority(torch.tensor([0, 1, 2, 3]), torch.tensor([0.0, -1.0, 3.0, 7.0]))  # p = |td| + 1
    # by hand: P(i) = p_i^0.5 / sum_j p_j^0.5 with p = 1, 2, 4, 8; w_i = (N P(i))^-0.4 / max_j (N P(j))^-0.4
    root = [1.0, math.sqrt(2), 2.0, math.sqrt(8)]
    w = [(4 * r / sum(root)) ** -0.4 for r in root]
    expected = torch.tensor([x / max(w) for x in w])
    batch = rb.sample(64)
    assert set(batch["index"].tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(batch["weight"], expected[batch["index"]])
    rb.extend(numbered(4, 1))
    rb.sample(1)
    assert sampler.max_priority == 8.0 and sampler.tree[4] == pytest.approx(math.sqrt(8.0))


def test_priority_updates_reject_mismatched_or_non_finite_values_and_state_round_trips():
    sampler = PrioritizedSampler()
    with pytest.raises(StoreError, match="cannot sample from an empty storage"):
        sampler.sample(RamStorage(4), 2)
    with pytest.raises(StoreError, match="update_priority before the first sample"):
        sampler.update_priority(torch.tensor([0]), torch.ones(1))
    rb = ReplayBuffer(RamStorage(4), sampler=sampler)
    rb.extend(numbered(0, 4))
    rb.sample(1)
    with pytest.raises(ValueError, match="2 indices but 3 priorities"):
        sampler.update_priority(torch.tensor([0, 1]), torch.ones(3))
    with pytest.raises(ValueError, match=r"priorities must be finite, got \[nan\]"):
        sampler.update_priority(torch.tensor([0, 1]), torch.tensor([1.0, float("nan")]))
    sampler.update_priority(torch.tensor([2]), torch.tensor([5.0]))
    again = PrioritizedSampler()
    again.load_state_dict(sampler.state_dict())
    assert again.tree is not None and np.array_equal(again.tree.sums, sampler.tree.sums)
    assert again.max_priority == sampler.max_priority == 5.0 + 1e-6


def test_prioritized_sampler_catches_up_with_rows_written_behind_its_back():
    """As after a resume: the state was saved at 4 rows, the reopened store holds 6 (or, after a crash, 3)."""
    sampler = PrioritizedSampler(alpha=1.0, eps=1.0, generator=torch.Generator().manual_seed(0))
    sampler.sample(filled(8, 4), 1)
    sampler.update_priority(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    state = sampler.state_dict()
    resumed = PrioritizedSampler(alpha=1.0, generator=torch.Generator().manual_seed(0))
    resumed.load_state_dict(state)
    index, _ = resumed.sample(filled(8, 6), 200)
    assert resumed.tree is not None and resumed.tree[range(8)].tolist() == [2, 3, 4, 5, 5, 5, 0, 0]
    assert set(index.tolist()) == set(range(6))
    resumed.load_state_dict(state)
    index, _ = resumed.sample(filled(8, 3), 200)  # fewer rows than the tree knew: start afresh on these
    assert resumed.tree[range(8)].tolist() == [5, 5, 5, 0, 0, 0, 0, 0] and set(index.tolist()) == {0, 1, 2}


def test_a_row_written_after_its_slot_was_sampled_keeps_the_max_priority():
    sampler = PrioritizedSampler(alpha=1.0, eps=1.0)
    storage = filled(4, 4)
    sampler.sample(storage, 4)
    sampler.update_priority(torch.arange(4), torch.tensor([9.0, 1.0, 1.0, 1.0]))  # max priority 10
    storage.extend(numbered(4, 1))  # slot 0 now holds a new row ...
    sampler.update_priority(torch.tensor([0]), torch.tensor([0.0]))  # ... and a late update names its slot
    sampler.sample(storage, 4)
    assert sampler.tree is not None and sampler.tree[range(4)].tolist() == [10.0, 2.0, 2.0, 2.0]


# -- without replacement --------------------------------------------------------------------------------------

def test_without_replacement_serves_every_row_once_per_epoch():
    storage = filled(30, 50)  # a wrapped ring holding rows 20..49
    sampler = SamplerWithoutReplacement(generator=torch.Generator().manual_seed(0))
    epochs = []
    for epoch in range(3):
        served = [sampler.sample(storage, 7)[0] for _ in range(5)]
        assert [len(s) for s in served] == [7, 7, 7, 7, 2]
        assert sampler.epochs == epoch + 1
        epochs.append(torch.cat(served))
        assert sorted(epochs[-1].tolist()) == list(range(30))
    assert not torch.equal(epochs[0], epochs[1])  # shuffled afresh each epoch
    head = sampler.sample(storage, 7)[0]
    resumed = SamplerWithoutReplacement(generator=torch.Generator())
    resumed.load_state_dict(sampler.state_dict())  # mid-epoch: the rest of the same permutation follows
    rest = torch.cat([resumed.sample(storage, 7)[0] for _ in range(4)])
    assert sorted(torch.cat([head, rest]).tolist()) == list(range(30)) and resumed.epochs == 4


def test_without_replacement_in_write_order_with_drop_last_and_rows_joining_the_next_epoch():
    storage = filled(30, 50)
    ordered = SamplerWithoutReplacement(shuffle=False, drop_last=True)
    first = [storage.get(ordered.sample(storage, 7)[0])["t"] for _ in range(4)]
    assert torch.cat(first).tolist() == list(range(20, 48)) and ordered.epochs == 1  # 48, 49 dropped
    assert storage.get(ordered.sample(storage, 7)[0])["t"].tolist() == list(range(20, 27))
    growing = filled(100, 23)
    sampler = SamplerWithoutReplacement(generator=torch.Generator().manual_seed(0))
    seen = sampler.sample(growing, 10)[0].tolist()
    growing.extend(numbered(23, 10))
    seen += sampler.sample(growing, 10)[0].tolist() + sampler.sample(growing, 10)[0].tolist()
    assert sorted(seen) == list(range(23)) and sampler.epochs == 1  # the epoch ended after its 23 rows
    assert sorted(sampler.sample(growing, 40)[0].tolist()) == list(range(33))
    with pytest.raises(StoreError, match="holds 23 rows, fewer than a batch of 24"):
        SamplerWithoutReplacement(drop_last=True).sample(filled(100, 23), 24)


# -- slices ---------------------------------------------------------------------------------------------------

def episodes(lengths, *, first_traj=0, t0=0):
    """Consecutive episodes of the given lengths, with traj_id, step_count, write number t and the end flags."""
    traj = torch.cat([torch.full((n,), first_traj + k) for k, n in enumerate(lengths)])
    step = torch.cat([torch.arange(n) for n in lengths])
    end = torch.cat([torch.arange(n) == n - 1 for n in lengths])[:, None]
    truncated = end & (traj[:, None] % 2 == 0)
    return TensorDict({"t": torch.arange(t0, t0 + len(traj)), "traj_id": traj, "step_count": step,
                       "next": {"done": end, "terminated": end & ~truncated, "truncated": truncated}},
                      batch_size=[len(traj)])


def random_episode_storage(capacity=60, seed=0, storage=None):
    """A wrapped ring of random-length episodes, written in chunks that cut episodes; the newest is unfinished."""
    rng = np.random.default_rng(seed)
    rows = episodes(rng.integers(1, 15, 30).tolist())[:170]
    storage = storage if storage is not None else RamStorage(capacity)
    cuts = np.sort(rng.choice(np.arange(1, 170), 12, replace=False))
    for a, b in zip([0, *cuts], [*cuts, 170], strict=True):
        storage.extend(rows[a:b])
    return storage


def valid_starts(storage, slice_len):
    """By brute force: ring slots whose next slice_len held rows (write order) share one episode."""
    held = storage.get(torch.arange(len(storage)))
    by_t = {int(t): (slot, int(traj)) for slot, (t, traj) in enumerate(zip(held["t"], held["traj_id"], strict=True))}
    return {slot for t, (slot, traj) in by_t.items()
            if all(t + k in by_t and by_t[t + k][1] == traj for k in range(slice_len))}


def test_slices_are_contiguous_within_one_episode_and_cover_every_valid_start():
    storage = random_episode_storage()
    assert storage.total_written == 170 and storage.cursor == 50  # wrapped: slot 49 is new, slot 50 old
    sampler = SliceSampler(4, generator=torch.Generator().manual_seed(0))
    rb = ReplayBuffer(storage, sampler=sampler)
    batch = rb.sample(4 * 2000)
    slices = batch.reshape(2000, 4)
    assert torch.equal(slices["slice_id"], torch.arange(2000)[:, None].expand(2000, 4))
    assert (slices["traj_id"] == slices["traj_id"][:, :1]).all()
    assert (slices["t"].diff(dim=1) == 1).all()  # consecutive writes: never across the cursor
    assert (slices["step_count"].diff(dim=1) == 1).all()
    assert not slices["next", "done"][:, :-1].any()
    assert set(slices["index"][:, 0].tolist()) == valid_starts(storage, 4)


@pytest.mark.parametrize("capacity", [10, 40])
@pytest.mark.parametrize("end_key", [("next", "done"), None])
def test_slices_never_span_the_write_cursor_nor_unwritten_slots(capacity, end_key):
    """One long unfinished episode: the same traj_id on both sides of the cursor, and no end flag."""
    storage = RamStorage(capacity)
    storage.extend(episodes([30])[:23])
    sampler = SliceSampler(4, end_key=end_key, generator=torch.Generator().manual_seed(0))
    slices = storage.get(sampler.sample(storage, 4 * 500)[0])["t"].reshape(500, 4)
    assert (slices.diff(dim=1) == 1).all()
    starts = set(slices[:, 0].tolist())
    assert starts == set(range(13, 20) if capacity == 10 else range(20))  # t = 17 wraps slot 9 -> 0: allowed
    assert {t % capacity for t in starts} == valid_starts(storage, 4)


def test_slices_follow_new_writes_and_need_either_key():
    storage = RamStorage(40)
    storage.extend(episodes([3, 3, 3]))
    sampler = SliceSampler(3, generator=torch.Generator().manual_seed(0))
    assert set(sampler.sample(storage, 300)[0].tolist()) == set(range(9))
    storage.extend(episodes([5], first_traj=3, t0=9))  # the cache is refreshed after a write
    assert set(sampler.sample(storage, 300)[0][::3].tolist()) == {0, 3, 6, 9, 10, 11}
    for by_one_key in (SliceSampler(3, traj_key=None, generator=torch.Generator().manual_seed(0)),
                       SliceSampler(3, end_key=None, generator=torch.Generator().manual_seed(0))):
        assert set(by_one_key.sample(storage, 300)[0][::3].tolist()) == {0, 3, 6, 9, 10, 11}
    with pytest.raises(ValueError, match="needs traj_key or end_key"):
        SliceSampler(3, traj_key=None, end_key=None)


def test_slices_read_through_get_when_the_storage_has_no_ram_ring(tmp_path):
    on_disk = random_episode_storage(storage=ZarrStorage(60, path=tmp_path / "s.zarr", block_rows=8, in_ram=False))
    in_ram = random_episode_storage()
    a = SliceSampler(4, generator=torch.Generator().manual_seed(0)).sample(on_disk, 4 * 500)[0]
    b = SliceSampler(4, generator=torch.Generator().manual_seed(0)).sample(in_ram, 4 * 500)[0]
    assert torch.equal(a, b)


def test_short_episodes_are_padded_and_masked_without_strict_length():
    storage = RamStorage(20)
    storage.extend(episodes([2, 5]))
    sampler = SliceSampler(4, strict_length=False, generator=torch.Generator().manual_seed(0))
    index, info = sampler.sample(storage, 4 * 300)
    index, mask = index.reshape(300, 4), info["mask"].reshape(300, 4)
    assert set(index[:, 0].tolist()) == set(range(7))  # any row starts a slice
    room = {0: 2, 1: 1, 2: 4, 3: 4, 4: 3, 5: 2, 6: 1}  # rows left in the episode, at most 4
    for start, rows, m in zip(index[:, 0].tolist(), index.tolist(), mask.tolist(), strict=True):
        n = room[start]
        assert m == [k < n for k in range(4)]
        assert rows == [start + min(k, n - 1) for k in range(4)]  # past the end: the last row, repeated


def test_slice_errors_say_what_to_change():
    storage = RamStorage(20)
    storage.extend(episodes([2, 3, 3]))
    with pytest.raises(ValueError, match="batch_size=10 must be a positive multiple of slice_len=4"):
        SliceSampler(4).sample(storage, 10)
    with pytest.raises(StoreError, match=r"no episode has slice_len=4 .* longest episode segment 3\)"):
        SliceSampler(4).sample(storage, 8)
    with pytest.raises(StoreError, match="empty storage"):
        SliceSampler(4).sample(RamStorage(20), 8)


# -- fifo -----------------------------------------------------------------------------------------------------

def test_fifo_serves_rows_in_write_order_across_the_wrap_and_refuses_missing_rows():
    storage = filled(8, 5)
    fifo = FifoSampler()
    assert storage.get(fifo.sample(storage, 3)[0])["t"].tolist() == [0, 1, 2]
    with pytest.raises(StoreError, match=r"asked for rows 3..5 but only 5 were written"):
        fifo.sample(storage, 3)
    storage.extend(numbered(5, 5))  # 10 written into 8 slots: rows 0, 1 overwritten, never row 3
    index, _ = fifo.sample(storage, 6)
    assert index.tolist() == [3, 4, 5, 6, 7, 0] and storage.get(index)["t"].tolist() == [3, 4, 5, 6, 7, 8]
    again = FifoSampler()
    again.load_state_dict(fifo.state_dict())
    storage.extend(numbered(10, 8))  # 18 written: row 9, the next to serve, was overwritten
    with pytest.raises(StoreError, match=r"row 9 was overwritten \(18 rows written into capacity=8\)"):
        again.sample(storage, 1)


# -- the priority hook and the weighted DQN loss --------------------------------------------------------------

def test_priority_update_hook_sets_the_priorities_of_the_batch_rows():
    rb = ReplayBuffer(RamStorage(4), sampler=PrioritizedSampler(alpha=1.0, eps=0.25))
    rb.extend(numbered(0, 4))
    rb.sample(1)
    hook = PriorityUpdate(rb)
    assert hook.mode == "lockstep" and hook.events == ("loss",)
    batch = rb.storage.get(torch.tensor([0, 2]))
    batch.set("index", torch.tensor([0, 2]))
    loss_out = TensorDict({"td_error": torch.tensor([3.0, 0.5])}, batch_size=[])
    hook.on_event(Event("loss", "learner", 0.0, {"loss": loss_out, "batch": batch, "step": 0}))
    assert rb.sampler.tree[range(4)].tolist() == [3.25, 1.0, 0.75, 1.0]  # |td| + eps; the others keep 1
    with pytest.raises(TypeError, match="sampler has update_priority"):
        PriorityUpdate(ReplayBuffer(RamStorage(4)))


def test_priority_update_follows_every_learner_step_in_a_pipeline(tmp_path):
    torch.manual_seed(0)
    sampler = PrioritizedSampler(generator=torch.Generator().manual_seed(0))
    rb = ReplayBuffer(RamStorage(1000), sampler=sampler, batch_size=16,
                      limiter=RateLimiter(samples_per_insert=2.0, min_fill=40, tolerance=64, batch_size=16))
    loss = DQNLoss(nn.Linear(4, 2), gamma=0.9)
    learner = LearnerStage("learner", loss, torch.optim.SGD(loss.value_net.parameters(), lr=0.01), device="cpu")
    calls = []
    update = sampler.update_priority
    sampler.update_priority = lambda index, priority: (calls.append((index, priority)), update(index, priority))
    p = Pipeline("per")
    p.add(ListSource("src", random_chunks(20, num_envs=2, steps=10)), WriterStage("writer", rb),
          SamplerStage("sampler", rb), learner)
    p.connect("src.items", "writer.chunks").connect("sampler.batches", "learner.batches", capacity=2)
    p.add_hook(PriorityUpdate(rb))
    streamrl.run(p, tmp_path, handle_signals=False)
    assert learner.steps == 400 * 2 // 16 and len(calls) == learner.steps  # lockstep: every loss seen
    td = torch.cat([priority for _, priority in calls])
    assert sampler.max_priority == pytest.approx(max(1.0, float(td.max()) + 1e-6))
    leaves = sampler.tree[range(400)]
    assert len(np.unique(leaves)) > 100  # the initial equal priorities were replaced by TD errors


def test_dqn_loss_weights_each_row_by_its_importance_weight():
    torch.manual_seed(0)
    eye = torch.eye(3)
    batch = TensorDict({"observation": eye, "action": torch.tensor([1, 0, 1]),
                        "next": {"observation": eye[[1, 2, 0]], "reward": torch.tensor([[1.0], [0.5], [-3.0]]),
                                 "terminated": torch.tensor([[False], [True], [False]])}}, batch_size=[3])
    loss = DQNLoss(nn.Linear(3, 2), gamma=0.9)
    td = loss(batch)["td_error"]
    huber = torch.where(td < 1, 0.5 * td ** 2, td - 0.5)
    assert (td >= 1).any() and (td < 1).any()  # both branches of the Huber loss
    torch.testing.assert_close(loss(batch)["loss"], huber.mean())
    batch.set("weight", torch.tensor([1.0, 0.0, 2.0]))
    torch.testing.assert_close(loss(batch)["loss"], (huber[0] + 2 * huber[2]) / 3)
