"""Replay storage throughput: sampling and extending ours against plain RAM rings, in one run.

    python tools/bench_replay.py [--quick] [--repeats 5] [--threads 1] [--out DIR]

Five storages, two kinds of rows:

* **torch dict** ("RAM tensors", the reference for the ratios): a dict of preallocated torch tensors, one per key,
  gathered with ``t[idx]`` per key and written with ``t[a:b] = rows`` -- what TorchRL's ``LazyTensorStorage``
  does, written by hand.
* **numpy ring**: the same with numpy arrays, ``np.take(a, idx, axis=0)`` per key.
* **RamStorage**: ours, a TensorDict ring (``index_select`` per key through ``TensorDict.apply``).
* **ZarrStorage in_ram=True** (the default): rows in a RAM ring (a RamStorage) and on disk; samples from RAM.
* **ZarrStorage in_ram=False**: samples from memory-mapped chunk files; only rows not on disk yet stay in RAM.

Rows are laid out as the env stage makes them (``observation``, ``action``, ``traj_id``, ``step_count``;
``next``: ``observation``, ``reward``, ``done``, ``terminated``, ``truncated``): **vector** rows have
float32[8] observations (95 bytes a row, 1M rows); **frame** rows have uint8[4, 84, 84] ``pixels`` instead
(56 KB a row, 100k rows = 5.6 GB per copy). So that frames fit in RAM, the three RAM rings share one set of
arrays (RamStorage's, allocated once); each reads and writes it with its own code. The zarr store (default
``block_rows``) lives in a temporary directory on local disk, removed at the end (``--out DIR``: under DIR,
kept, with the JSON in ``DIR/bench_replay.json``).

* **sample**: batches of 256 uniform random ring slots over a full store (indices drawn before timing, the same
  for every storage in a round); rows/s and mean microseconds per batch. The memory-mapped store is read once
  whole before timing, so its chunk files are in the page cache and mapped (warm, as in a long run).
* **extend**: chunks of 1024 rows (vector) or 256 rows (frames) into a full ring (steady state: overwriting).
  A zarr store is flushed after every extend, as the writer stage does (``flush`` writes whole blocks, each
  followed by a commit, and the partial block once its rows waited ``commit_every_s``, 0.5 s), with
  ``fsync=False`` and with ``fsync=True`` ("durable": every block synced to the device before its commit); zarr
  extends are timed on a fraction of the ring (the row counts are printed).

The zarr store is measured in two phases: in_ram=True (created and filled, then closed) and in_ram=False (the
same directory reopened). The RAM baselines run in both phases, alternating with the zarr store in short
segments because this machine's speed drifts; a zarr ratio is the median over its phase's rounds of zarr / torch
dict ("x torch") and zarr / RamStorage ("x Ram") measured side by side. The last line is JSON: ``{"vector":
{"sample_rows_per_s": {...}, "extend_rows_per_s": {...}, ...}, "frames": {...}, "bars": {...}}``. The issue's
bars: sampling from the zarr store >= 0.5 x RAM tensors (both row kinds; ``bars`` holds the ratios to the torch
dict and to RamStorage, ``_mmap`` for in_ram=False), extend >= 100k rows/s for vector rows with durable flush.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict

from streamrl import RamStorage, ZarrStorage

BATCH = 256


@dataclass
class Kind:
    """One kind of rows and the sizes its runs use."""

    name: str
    rows: int  # ring capacity, filled before sampling
    chunk: int  # rows per extend
    ram_extend_rows: int  # rows per extend segment of a RAM ring
    zarr_extend_rows: int  # rows per extend segment of a zarr store (per fsync setting)
    batches: int  # sample batches per segment
    fill_chunk: int  # rows per extend while filling


KINDS = {
    "vector": Kind("vector", 1_000_000, 1024, 262_144, 40_960, 400, 65_536),
    "frames": Kind("frames", 100_000, 256, 8_192, 8_192, 60, 4_096),
}
QUICK = {
    "vector": Kind("vector", 50_000, 1024, 20_480, 8_192, 100, 16_384),
    "frames": Kind("frames", 5_000, 256, 1_024, 4_096, 20, 1_024),
}
OURS_SAMPLE = ("RamStorage", "zarr in_ram=True", "zarr in_ram=False")
BASELINES = ("torch dict", "numpy ring")


def make_rows(kind: str, n: int, seed: int) -> TensorDict:
    """``n`` rows of random content laid out as the env stage's chunks, flattened."""
    g = torch.Generator().manual_seed(seed)
    if kind == "vector":
        obs_key = "observation"

        def obs() -> torch.Tensor:
            return torch.randn(n, 8, generator=g)
    else:
        obs_key = "pixels"

        def obs() -> torch.Tensor:
            return torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=g)
    done = torch.rand(n, 1, generator=g) < 0.01
    return TensorDict({
        obs_key: obs(),
        "action": torch.randint(0, 4, (n,), generator=g),
        "traj_id": torch.arange(seed * n, seed * n + n),
        "step_count": torch.randint(0, 500, (n,), generator=g),
        "next": {obs_key: obs(), "reward": torch.randn(n, 1, generator=g), "done": done,
                 "terminated": done.clone(), "truncated": torch.zeros(n, 1, dtype=torch.bool)},
    }, batch_size=[n])


def leaves(td: TensorDict) -> dict[str, torch.Tensor]:
    return {(k if isinstance(k, str) else "/".join(k)): v for k, v in td.items(include_nested=True, leaves_only=True)}


@dataclass
class Chunk:
    """The same rows in each storage's natural form."""

    td: TensorDict
    tensors: dict[str, torch.Tensor]
    arrays: dict[str, np.ndarray]

    @classmethod
    def of(cls, td: TensorDict) -> Chunk:
        tensors = leaves(td)
        return cls(td, tensors, {k: v.numpy() for k, v in tensors.items()})


class Ring:
    """A hand-written ring over preallocated per-key columns (torch tensors or numpy arrays)."""

    def __init__(self, columns: dict, use_numpy: bool) -> None:
        self.columns = columns
        self.use_numpy = use_numpy
        self.capacity = len(next(iter(columns.values())))
        self.cursor = 0

    def extend(self, chunk: Chunk) -> None:
        rows = chunk.arrays if self.use_numpy else chunk.tensors
        n = len(next(iter(rows.values())))
        start, end = self.cursor, self.cursor + n
        if end <= self.capacity:
            for k, col in self.columns.items():
                col[start:end] = rows[k]
        else:
            split = self.capacity - start
            for k, col in self.columns.items():
                col[start:] = rows[k][:split]
                col[: n - split] = rows[k][split:]
        self.cursor = end % self.capacity

    def get(self, idx: torch.Tensor) -> dict:
        if self.use_numpy:
            i = idx.numpy()
            return {k: np.take(col, i, axis=0) for k, col in self.columns.items()}
        return {k: col[idx] for k, col in self.columns.items()}


def fill(store: RamStorage | ZarrStorage, kind: Kind, source: TensorDict) -> float:
    """Write ``kind.rows`` rows (the source, cycled); a zarr store is flushed as it goes, then committed whole."""
    start = time.perf_counter()
    done = 0
    while done < kind.rows:
        take = min(kind.fill_chunk, kind.rows - done)
        store.extend(source[:take])
        if isinstance(store, ZarrStorage):
            store.flush()
        done += take
    if isinstance(store, ZarrStorage):
        store.flush(partial=True)
    return time.perf_counter() - start


def sample_segment(get: Callable[[torch.Tensor], object], indices: torch.Tensor) -> float:
    """Seconds for one ``get`` per row of ``indices``."""
    start = time.perf_counter()
    for idx in indices:
        get(idx)
    return time.perf_counter() - start


def extend_segment(extend: Callable[[Chunk], object], pool: list[Chunk], rows: int,
                   store: ZarrStorage | None = None) -> tuple[float, float]:
    """(seconds, of which flushing) to extend ``rows`` rows in the pool's chunks, flushing ``store`` after each as
    the writer stage does (whole blocks, and the partial block once its rows waited ``commit_every_s``)."""
    n = len(pool[0].td)
    flush_s = 0.0
    start = time.perf_counter()
    for i in range(rows // n):
        extend(pool[i % len(pool)])
        if store is not None:
            t = time.perf_counter()
            store.flush(partial=store.commit_due())
            flush_s += time.perf_counter() - t
    return time.perf_counter() - start, flush_s


class Results:
    """Per storage: segment rates; per zarr storage: its rate / a reference's rate in the same round."""

    def __init__(self) -> None:
        self.rates: dict[str, list[float]] = {}
        self.ratios: dict[str, dict[str, list[float]]] = {"torch dict": {}, "RamStorage": {}}
        self.flush_share: dict[str, list[float]] = {}

    def add_round(self, got: dict[str, float]) -> None:
        for name, rate in got.items():
            self.rates.setdefault(name, []).append(rate)
            if name.startswith("zarr"):
                for ref, ratios in self.ratios.items():
                    ratios.setdefault(name, []).append(rate / got[ref])

    def median(self, name: str) -> float:
        return statistics.median(self.rates[name])

    def ratio(self, name: str, ref: str) -> float:
        """Paired median for a zarr store, else the ratio of medians."""
        paired = self.ratios[ref].get(name)
        return statistics.median(paired) if paired else self.median(name) / self.median(ref)


def measure_phase(kind: Kind, zname: str, zstore: ZarrStorage, rings: dict[str, object], pool: list[Chunk],
                  repeats: int, sample: Results, extend: Results) -> None:
    """Rounds of sample segments, then rounds of extend segments: the RAM rings and one zarr store, alternating."""
    getters: dict[str, Callable] = {name: ring.get for name, ring in rings.items()}  # type: ignore[attr-defined]
    getters[zname] = zstore.get
    names = list(getters)
    gen = torch.Generator().manual_seed(1)
    for name in names:  # warm-up
        sample_segment(getters[name], torch.randint(0, kind.rows, (5, BATCH), generator=gen))
    for r in range(repeats):
        indices = torch.randint(0, kind.rows, (kind.batches, BATCH), generator=gen)
        got = {}
        for name in names[r % len(names):] + names[: r % len(names)]:
            got[name] = kind.batches * BATCH / sample_segment(getters[name], indices)
        sample.add_round(got)
        print(f"  {kind.name} sample round {r + 1}/{repeats}: "
              + ", ".join(f"{n} {v / 1e6:.2f}M" for n, v in got.items()) + " rows/s", flush=True)

    def zarr_extend(fsync: bool) -> tuple[float, float]:
        zstore.fsync = fsync
        return extend_segment(lambda c: zstore.extend(c.td), pool, kind.zarr_extend_rows, zstore)

    extenders: dict[str, Callable[[], tuple[float, float]]] = {
        name: (lambda ring=ring: extend_segment(ring.extend, pool, kind.ram_extend_rows))  # type: ignore[attr-defined]
        for name, ring in rings.items() if name != "RamStorage"}
    extenders["RamStorage"] = lambda: extend_segment(lambda c: rings["RamStorage"].extend(c.td),  # type: ignore
                                                     pool, kind.ram_extend_rows)
    extenders[zname + " + flush"] = lambda: zarr_extend(False)
    extenders[zname + " + durable flush"] = lambda: zarr_extend(True)
    names = list(extenders)
    for r in range(repeats):
        got = {}
        for name in names[r % len(names):] + names[: r % len(names)]:
            seconds, flush_s = extenders[name]()
            rows = kind.zarr_extend_rows if name.startswith("zarr") else kind.ram_extend_rows
            got[name] = rows / seconds
            if name.startswith("zarr"):
                extend.flush_share.setdefault(name, []).append(flush_s / seconds)
        extend.add_round(got)
        print(f"  {kind.name} extend round {r + 1}/{repeats}: "
              + ", ".join(f"{n} {v / 1e3:,.0f}k" for n, v in got.items()) + " rows/s", flush=True)


def run_kind(kind: Kind, repeats: int, root: Path) -> dict:
    """Both phases for one kind of rows; returns its JSON section and prints its table."""
    print(f"{kind.name}: {kind.rows:,} rows", flush=True)
    source = make_rows(kind.name, kind.fill_chunk, seed=0)
    pool = [Chunk.of(make_rows(kind.name, kind.chunk, seed=s)) for s in range(1, 9)]
    ram = RamStorage(kind.rows)
    seconds = fill(ram, kind, source)
    print(f"  filled the RAM ring in {seconds:.1f} s", flush=True)
    assert ram.data is not None
    columns = leaves(ram.data)
    rings: dict[str, object] = {"torch dict": Ring(columns, use_numpy=False),
                                "numpy ring": Ring({k: v.numpy() for k, v in columns.items()}, use_numpy=True),
                                "RamStorage": ram}
    sample, extend = Results(), Results()
    path = root / f"{kind.name}.zarr"

    zstore = ZarrStorage(kind.rows, path=path)
    seconds = fill(zstore, kind, source)
    print(f"  filled the zarr store (in_ram=True, block_rows={zstore.block_rows}) in {seconds:.1f} s", flush=True)
    check = torch.randint(0, kind.rows, (BATCH,), generator=torch.Generator().manual_seed(2))
    assert (zstore.get(check) == ram.get(check)).all(), "the zarr store does not hold the rows the RAM ring holds"
    measure_phase(kind, "zarr in_ram=True", zstore, rings, pool, repeats, sample, extend)
    zstore.close()
    expected = zstore.get(check)
    del zstore
    gc.collect()

    zstore = ZarrStorage.open(path, in_ram=False)
    assert (zstore.get(check) == expected).all(), "the memory-mapped store does not read back its rows"
    start = time.perf_counter()
    slots = zstore.slots_in_order()
    for i in range(0, len(slots), 8192):  # read every chunk file once: in the page cache and mapped
        zstore.get(slots[i:i + 8192])
    print(f"  reopened in_ram=False and read it whole in {time.perf_counter() - start:.1f} s", flush=True)
    measure_phase(kind, "zarr in_ram=False", zstore, rings, pool, repeats, sample, extend)
    zstore.close()
    del zstore, rings, ram, columns
    gc.collect()

    row_bytes = sum(v[0].numel() * v.element_size() for v in pool[0].tensors.values())
    print_table(kind, row_bytes, sample, extend)
    return {
        "rows": kind.rows, "row_bytes": row_bytes, "block_rows": min(4096, kind.rows),
        "zarr_extend_rows_per_variant": kind.zarr_extend_rows * repeats,
        "sample_rows_per_s": {n: round(sample.median(n)) for n in sample.rates},
        "sample_us_per_batch": {n: round(BATCH / sample.median(n) * 1e6, 1) for n in sample.rates},
        "sample_vs_torch": {n: round(sample.ratio(n, "torch dict"), 3) for n in sample.rates},
        "sample_vs_ram_storage": {n: round(sample.ratio(n, "RamStorage"), 3) for n in sample.rates},
        "extend_rows_per_s": {n: round(extend.median(n)) for n in extend.rates},
        "extend_vs_torch": {n: round(extend.ratio(n, "torch dict"), 3) for n in extend.rates},
        "extend_flush_share": {n: round(statistics.median(v), 3) for n, v in extend.flush_share.items()},
    }


def print_table(kind: Kind, row_bytes: int, sample: Results, extend: Results) -> None:
    print(f"\n{kind.name} rows: {kind.rows:,} rows of {row_bytes:,} B; sample {BATCH} rows; extend {kind.chunk}-row "
          "chunks; x torch = / torch dict (RAM tensors; zarr: paired median), x Ram = / RamStorage")
    print(f"  {'sample':34s} {'rows/s':>12s} {'us/batch':>10s} {'x torch':>8s} {'x Ram':>7s}")
    for name in (*BASELINES, *OURS_SAMPLE):
        rate = sample.median(name)
        print(f"  {name:34s} {rate:12,.0f} {BATCH / rate * 1e6:10,.1f} {sample.ratio(name, 'torch dict'):8.3f} "
              f"{sample.ratio(name, 'RamStorage'):7.3f}")
    print(f"  {'extend':34s} {'rows/s':>12s} {'flush %':>10s} {'x torch':>8s} {'x Ram':>7s}")
    for name in extend.rates:
        rate = extend.median(name)
        share = f"{statistics.median(extend.flush_share[name]) * 100:.0f}" if name in extend.flush_share else ""
        print(f"  {name:34s} {rate:12,.0f} {share:>10s} {extend.ratio(name, 'torch dict'):8.3f} "
              f"{extend.ratio(name, 'RamStorage'):7.3f}")
    print(f"  (zarr extends: {kind.zarr_extend_rows:,} rows a segment; RAM rings: {kind.ram_extend_rows:,})\n",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small stores and few batches: a smoke run")
    parser.add_argument("--repeats", type=int, default=5, help="alternating segments per storage (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a pipeline's learner process: 1 here)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--out", help="put the zarr stores and bench_replay.json here, and keep them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kinds = QUICK if args.quick else KINDS
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_replay_"))
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    start = time.perf_counter()
    try:
        for name in args.kinds:
            results[name] = run_kind(kinds[name], args.repeats, root)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    bars: dict[str, object] = {"ram_tensors": "torch dict"}
    for mode, suffix in (("in_ram=True", ""), ("in_ram=False", "_mmap")):
        for name in results:
            bars[f"zarr{suffix}_sample_vs_ram_{name}"] = results[name]["sample_vs_torch"][f"zarr {mode}"]
            bars[f"zarr{suffix}_sample_vs_ram_storage_{name}"] = results[name]["sample_vs_ram_storage"][f"zarr {mode}"]
        if "vector" in results:
            bars[f"zarr{suffix}_extend_vector_durable_rows_per_s"] = \
                results["vector"]["extend_rows_per_s"][f"zarr {mode} + durable flush"]
    met = {k: v >= 0.5 for k, v in bars.items() if "sample_vs" in k and isinstance(v, float)}
    met.update({k: v >= 100_000 for k, v in bars.items() if k.endswith("durable_rows_per_s") and isinstance(v, int)})
    bars["met"] = met
    results["bars"] = bars
    results["wall_s"] = round(time.perf_counter() - start, 1)
    for key, ok in met.items():
        print(f"bar {key}: {bars[key]} -> {'met' if ok else 'NOT met'}")
    line = json.dumps(results)
    if args.out:
        (root / "bench_replay.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
