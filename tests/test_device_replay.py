"""Replay rows on the learner's device: the mirror (DeviceRing), RingBatch, sample_ring and SamplerStage's
device_replay. Everything runs on CPU (the mirror then lives in RAM; the code path is the one CUDA takes)."""

import pytest
import torch
from tensordict import TensorDict

import streamrl
from streamrl import Pipeline, RamStorage, RateLimiter, ReplayBuffer, SamplerStage, WriterStage, ZarrStorage
from streamrl.replay.device_ring import DeviceRing, RingBatch
from streamrl.replay.samplers import PrioritizedSampler, UniformSampler
from streamrl.testing import Collect, ListSource, random_chunks

# chi-square critical values at p = 0.001 (scipy.stats.chi2.ppf(0.999, df)): a fair sampler fails 1 in 1000
CHI2_999 = {29: 58.30, 63: 103.44}


def rows(start, n):
    idx = torch.arange(start, start + n)
    return TensorDict({"x": idx.float()[:, None].repeat(1, 3), "next": {"done": (idx % 7 == 0)[:, None]}},
                      batch_size=[n])


def held_slots(storage):
    return (storage.cursor - len(storage) + torch.arange(len(storage))) % storage.capacity


def assert_same_rows(a, b):
    keys = set(a.keys(include_nested=True, leaves_only=True))
    assert keys == set(b.keys(include_nested=True, leaves_only=True))
    assert a.batch_size == b.batch_size
    for key in keys:
        assert a.get(key).dtype == b.get(key).dtype, key
        assert torch.equal(a.get(key), b.get(key)), key


def assert_mirrors(rb):
    slots = held_slots(rb.storage)
    assert_same_rows(rb.ring.gather(slots), rb.storage.get(slots))


@pytest.mark.parametrize("zarr_store", [False, True])
def test_the_mirror_follows_extends_that_wrap_the_ring(tmp_path, zarr_store):
    storage = ZarrStorage(16, path=tmp_path / "r.zarr", block_rows=4, in_ram=False) if zarr_store else RamStorage(16)
    rb = ReplayBuffer(storage, batch_size=4)
    rb.extend(rows(0, 5))
    ring = rb.mirror("cpu")  # filled from the rows held
    assert ring.rows is not None and ring.rows.batch_size == (16,) and ring.device == torch.device("cpu")
    assert_mirrors(rb)
    for start in range(5, 60, 7):  # wraps the ring several times
        rb.extend(rows(start, 7))
        assert_mirrors(rb)
    rb.extend(rows(100, 40))  # more rows than the ring holds in one extend: the newest 16 are kept
    assert_mirrors(rb)
    assert torch.equal(ring.gather(held_slots(storage))["x"][:, 0], torch.arange(124, 140).float())
    assert rb.mirror("cpu") is ring  # one mirror per device


def test_a_resumed_buffer_fills_its_mirror_from_the_storage():
    rb = ReplayBuffer(RamStorage(10), batch_size=4, sampler=UniformSampler(torch.Generator().manual_seed(0)))
    rb.mirror("cpu")
    for start in range(0, 23, 5):
        rb.extend(rows(start, 5))
    state = rb.state_dict()
    assert "ring" not in str(state.keys()) and set(state["sampler"]) == {"generator"}  # the mirror is not saved

    resumed = ReplayBuffer(RamStorage(10), batch_size=4)
    resumed.load_state_dict(state)
    resumed.mirror("cpu")
    assert_mirrors(resumed)

    mirrored_first = ReplayBuffer(RamStorage(10), batch_size=4)  # a mirror made before the state loads follows it
    mirrored_first.extend(rows(1000, 3))
    mirrored_first.mirror("cpu")
    mirrored_first.load_state_dict(state)
    assert_mirrors(mirrored_first)
    assert_same_rows(mirrored_first.ring.gather(held_slots(rb.storage)), rb.ring.gather(held_slots(rb.storage)))


@pytest.mark.parametrize("trajectories", [False, True])
def test_ring_batch_rows_are_what_sample_gives(trajectories):
    rb = ReplayBuffer(RamStorage(8 if trajectories else 50), batch_size=5, trajectories=trajectories)
    ring = rb.mirror("cpu")
    for chunk in random_chunks(3, num_envs=4, steps=16):
        rb.extend(chunk)
    ring_batch = rb.sample_ring()
    assert isinstance(ring_batch, RingBatch) and ring_batch.index.shape == (5,)
    batch = ring_batch.rows()
    host = rb.sample()  # other indices: compare structure, then values at the ring batch's indices
    assert batch.batch_size == host.batch_size == ring_batch.batch_size == ((5, 16) if trajectories else (5,))
    for key in host.keys(include_nested=True, leaves_only=True):
        assert batch.get(key).shape == host.get(key).shape and batch.get(key).dtype == host.get(key).dtype, key
    assert set(batch.keys(include_nested=True, leaves_only=True)) == set(host.keys(include_nested=True,
                                                                                     leaves_only=True))
    stored = rb.storage.get(ring_batch.index)
    if trajectories:
        assert torch.equal(batch["index"], ring_batch.index[:, None].expand(5, 16))
        stored.batch_size = batch.batch_size
    for key in stored.keys(include_nested=True, leaves_only=True):
        assert torch.equal(batch.get(key), stored.get(key)), key
    # the learner's captured form: a static index tensor in a RingBatch of its own
    static = torch.zeros(5, dtype=torch.long).copy_(ring_batch.index)
    assert_same_rows(RingBatch(ring, static, {}).rows(), batch)


@pytest.mark.parametrize("trajectories", [False, True])
def test_a_prioritized_sampler_sends_its_weights(trajectories):
    generator = torch.Generator().manual_seed(3)
    rb = ReplayBuffer(RamStorage(8 if trajectories else 40), batch_size=6, trajectories=trajectories,
                      sampler=PrioritizedSampler(generator=generator))
    rb.mirror("cpu")
    for chunk in random_chunks(3, num_envs=4, steps=8):
        rb.extend(chunk)
    rb.sample()  # the tree caught up: both draws below start from the same sampler state
    start = generator.get_state()
    host = rb.sample()
    generator.set_state(start)
    ring_batch = rb.sample_ring()
    assert set(ring_batch.info) == {"weight"}
    assert_same_rows(ring_batch.rows(), host)  # same indices, weights, rows: exactly what sample gives


def chi_square(draws, support):
    counts = torch.bincount(draws, minlength=int(support.max()) + 1)
    assert counts.sum() == counts[support].sum(), "drew slots that hold no row"
    expected = draws.numel() / support.numel()
    return float(((counts[support] - expected) ** 2 / expected).sum())


def ring_buffer(capacity, n_rows):
    rb = ReplayBuffer(RamStorage(capacity), batch_size=500, sampler=UniformSampler(torch.Generator().manual_seed(1)))
    rb.mirror("cpu")
    rb.extend(rows(0, n_rows))
    return rb


@pytest.mark.parametrize(("capacity", "n_rows", "df"), [(64, 30, 29), (64, 64 + 21, 63)])
def test_sample_ring_draws_the_rows_held_uniformly(capacity, n_rows, df):
    rb = ring_buffer(capacity, n_rows)
    support = held_slots(rb.storage)
    assert support.numel() == df + 1
    ring_draws = torch.cat([rb.sample_ring().index for _ in range(40)])  # 20k draws
    host_draws = torch.cat([rb.sample()["index"] for _ in range(40)])
    assert chi_square(ring_draws, support) < CHI2_999[df]
    assert chi_square(host_draws, support) < CHI2_999[df]  # the host ring's sampler: the same distribution
    # what a chi-square of draws that miss one row of the support gives: the test has power
    assert chi_square(torch.where(ring_draws == support[0], support[1], ring_draws), support) > CHI2_999[df]


def test_sample_on_offsets_by_the_oldest_slot_of_a_repaired_store():
    """A store that lost rows holds 30 rows from slot 20 on: draws cover those slots, uniformly, like sample."""

    class Repaired:
        capacity, cursor = 64, 50

        def __len__(self):
            return 30

    sampler = UniformSampler(torch.Generator().manual_seed(2))
    support = torch.arange(20, 50)
    on_device = torch.cat([sampler.sample_on(Repaired(), 500, torch.device("cpu"))[0] for _ in range(40)])
    on_host = torch.cat([sampler.sample(Repaired(), 500)[0] for _ in range(40)])
    assert chi_square(on_device, support) < CHI2_999[29]
    assert chi_square(on_host, support) < CHI2_999[29]


def test_sampling_from_the_ring_does_no_host_sync(monkeypatch):
    rb = ring_buffer(64, 64 + 21)  # a wrapped ring
    traj = ReplayBuffer(RamStorage(8), batch_size=4, trajectories=True)
    traj.mirror("cpu")
    traj.extend(random_chunks(1, num_envs=4, steps=5)[0])

    def sync(*args, **kwargs):
        raise AssertionError("a host sync while sampling from the ring")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    batches = [rb.sample_ring(), rb.sample_ring(), traj.sample_ring()]  # the first draw seeds the device generator
    rows_ = [b.rows() for b in batches]
    monkeypatch.undo()
    assert rows_[0].batch_size == (500,) and rows_[2].batch_size == (4, 5)
    with pytest.raises(AssertionError, match="host sync"):  # the patch does catch a sync
        monkeypatch.setattr(torch.Tensor, "item", sync)
        rb.sample_ring().index[0].item()


def replay_pipeline(device_replay, events):
    rb = ReplayBuffer(RamStorage(1000), batch_size=8,
                      limiter=RateLimiter(samples_per_insert=2.0, min_fill=40, tolerance=64, batch_size=8))
    learner = Collect("learner")
    sampler = SamplerStage("sampler", rb, device_replay=device_replay)
    p = Pipeline("device-replay")
    p.add(ListSource("src", random_chunks(10, num_envs=2, steps=10)), WriterStage("writer", rb), sampler, learner)
    p.connect("src.items", "writer.chunks").connect("sampler.batches", "learner.items", capacity=2)
    p.on("replay_device", events.append)
    return p, rb, sampler, learner


def test_sampler_stage_sends_ring_batches_with_device_replay(tmp_path):
    events = []
    p, rb, sampler, learner = replay_pipeline(True, events)
    streamrl.run(p, tmp_path, handle_signals=False)
    assert learner.count > 10 and all(isinstance(b, RingBatch) for b in learner.items)
    assert sampler.mirrored is True
    assert [(e.data["device"], e.data["mirrored"]) for e in events] == [("cpu", True)]
    for ring_batch in learner.items:  # 200 rows in a ring of 1000: no row was overwritten since it was sent
        batch = ring_batch.rows()
        assert batch.batch_size == (8,)
        assert_same_rows(batch.exclude("index"), rb.storage.get(ring_batch.index))


def test_sampler_stage_auto_stays_on_the_host_on_cpu(tmp_path):
    events = []
    p, rb, sampler, learner = replay_pipeline(None, events)
    streamrl.run(p, tmp_path, handle_signals=False)
    assert learner.count > 10 and all(isinstance(b, TensorDict) for b in learner.items)
    assert rb.ring is None and sampler.mirrored is False
    assert len(events) == 1 and events[0].data["mirrored"] is False and "not CUDA" in events[0].data["reason"]


def test_auto_device_replay_mirrors_vector_rows_that_fit(monkeypatch):
    """On CUDA (faked: only the free memory is asked), auto mirrors vector rows that take <= 1/4 of free memory."""
    cuda = torch.device("cuda", 0)

    def decide(capacity, row, free):
        rb = ReplayBuffer(RamStorage(capacity))
        rb.extend(row)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 2 * free))
        return SamplerStage("sampler", rb).decide(cuda)

    vector = TensorDict({"obs": torch.zeros(2, 16)}, batch_size=[2])  # 64 bytes a row
    assert DeviceRing.row_bytes(vector) == 64
    assert decide(1000, vector, free=4 * 64_000)[0] is True
    mirrored, reason = decide(1000, vector, free=4 * 64_000 - 4)
    assert not mirrored and "quarter" in reason
    pixels = TensorDict({"obs": torch.zeros(2, 4, 84, 84 * 3)}, batch_size=[2])  # 338 KiB a row
    mirrored, reason = decide(10, pixels, free=2**40)
    assert not mirrored and "'obs'" in reason and "pixel" in reason
    assert SamplerStage("s", ReplayBuffer(RamStorage(4)), device_replay=False).decide(cuda)[0] is False
