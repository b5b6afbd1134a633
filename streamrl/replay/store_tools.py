"""Tools for a replay store on disk: inspect, check, repair, sample, export, import and plot it.

::

    info = inspect_store("runs/dqn/replay.zarr")          # keys, shapes, codecs, sizes, counts, episode statistics
    problems = check_store("runs/dqn/replay.zarr")        # [] when the committed rows are whole and consistent
    print(repair_store("runs/dqn/replay.zarr"))           # cursor back to the last intact block (the only writer)
    rows, columns = sample_store("runs/dqn/replay.zarr", 5, seed=0)
    export_store("runs/dqn/replay.zarr", "replay.npz")    # committed rows oldest -> newest, plus the attrs
    import_store("replay.npz", "copy.zarr", capacity=10_000)
    plot_store("runs/dqn/replay.zarr")                     # -> runs/dqn/replay.png

The same functions serve ``streamrl store ...`` and ``python tools/store.py ...``, which only format what they
return. Stores are read with ``ZarrStorage.open(path, in_ram=False, writable=False)``: memory-mapped chunk files,
nothing modified (but by ``repair_store``, from :mod:`streamrl.replay.store_integrity`, which has the structural
checks), nothing unpickled, rows gathered a block at a time so a store larger than RAM is never loaded whole (episode
statistics read the four scalar columns ``traj_id``, ``step_count``, ``next/done``, ``next/reward`` whole: about
25 bytes a row).

Rows are named by their row number, counting every row ever written (``committed.rows - committed.size`` is
the oldest held). An episode is the rows of one ``traj_id`` in row order, up to a row whose ``step_count`` is 0
again (a run resumed after a crash numbers trajectories from 0 again, and the episodes it cut never end). It
counts as complete when its first held row has ``step_count == 0`` (the ring did not cut it) and its last row is
``next/done``.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

from streamrl.errors import ConfigError, StoreError
from streamrl.replay.store_integrity import FORMAT, Problem, Repair, check_structure, problem_at, repair_store
from streamrl.replay.zarr_store import ZarrStorage

__all__ = ["EpisodeStats", "Problem", "Repair", "check_store", "check_structure", "episode_stats", "export_store",
           "import_store", "inspect_store", "open_store", "plot_store", "repair_store", "sample_store"]

EPISODE_KEYS = ("traj_id", "step_count", "next/done", "next/reward")
ATTRS_ENTRY = "attrs.json"  # the export's entry holding the store's attrs as a JSON string
BLOCK_BYTES = 64 << 20  # rows are gathered in blocks of about this many bytes


@dataclass(frozen=True)
class EpisodeStats:
    """The complete episodes of a store, in the order they ended, and the count of incomplete ones."""

    returns: np.ndarray  # float64, one per complete episode
    lengths: np.ndarray  # int64
    incomplete: int  # cut by the ring at the oldest row, or still running at the newest


# -- opening and reading -----------------------------------------------------------------------------------------
def _require_store(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{str(path)!r} is not a replay store (no zarr.json in it): give the directory of a "
                         "store, e.g. runs/<run>/replay.zarr")
    return path


def open_store(path: str | Path) -> ZarrStorage:
    """Open a store read-only and memory-mapped, after the structural checks of :func:`check_store`.

    Raises :class:`StoreError` naming the first problem when the store cannot be read.
    """
    return _storage(_checked(path))


def _checked(path: str | Path) -> Path:
    """``path``, once the structural checks found no error; else :class:`StoreError` naming the first."""
    path = _require_store(path)
    errors = check_structure(path).errors
    if errors:
        raise StoreError(f"cannot read {str(path)!r}: {errors[0]}; `streamrl store check {path}` lists every problem")
    return path


def _storage(path: Path, keys: list[str] | tuple[str, ...] | None = None) -> ZarrStorage:
    """A read-only, memory-mapped storage of a store that passed the structural checks; with ``keys``, its
    :meth:`ZarrStorage.get` gathers (and maps the chunk files of) only those keys."""
    storage = ZarrStorage.open(path, in_ram=False, writable=False)
    if keys is not None:
        storage.layout = {key: storage.layout[key] for key in keys}  # get() gathers the keys of its layout
    return storage


def _blocks(storage: ZarrStorage) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """The committed rows oldest to newest, in blocks of about :data:`BLOCK_BYTES`: (first position, columns)."""
    row_bytes = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in storage.layout.values())
    step = max(1, BLOCK_BYTES // max(1, row_bytes))
    slots = storage.slots_in_order()
    for start in range(0, len(slots), step):
        rows = storage.get(slots[start:start + step])
        yield start, {key: rows.get(tuple(key.split("/"))).numpy() for key in storage.layout}


def _scalar_columns(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """Whole 1-d columns of ``keys`` (one value a row), or None when one is missing or holds more per row."""
    storage = _storage(path)
    if any(key not in storage.layout or int(np.prod(storage.layout[key][0])) != 1 for key in keys):
        return None
    storage.layout = {key: storage.layout[key] for key in keys}
    parts: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    for _, columns in _blocks(storage):
        for key, column in columns.items():
            parts[key].append(column.reshape(len(column)))
    return {key: np.concatenate(chunks) if chunks else np.empty(0, storage.layout[key][1])
            for key, chunks in parts.items()}


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- episodes ------------------------------------------------------------------------------------------------------
def _episode_order(traj_id: np.ndarray, step_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped into episodes: ``order`` sorts the rows by ``traj_id`` (in row order within one), and an
    episode starts at each position of ``starts`` in it: where ``traj_id`` changes or ``step_count`` is 0."""
    order = np.argsort(traj_id, kind="stable")
    ids, steps = traj_id[order], step_count[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (ids[1:] != ids[:-1]) | (steps[1:] == 0)
    return order, np.flatnonzero(starts)


def episode_stats(traj_id: np.ndarray, step_count: np.ndarray, done: np.ndarray,
                  reward: np.ndarray) -> EpisodeStats:
    """Returns and lengths of the complete episodes among rows given oldest first (1-d columns, one per key).

    ::

        stats = episode_stats(traj_id, step_count, done, reward)
        stats.returns.mean(), stats.lengths.max(), stats.incomplete
    """
    if len(traj_id) == 0:
        return EpisodeStats(np.empty(0), np.empty(0, np.int64), 0)
    order, starts = _episode_order(traj_id, step_count)
    ends = np.r_[starts[1:], len(order)] - 1
    complete = (step_count[order][starts] == 0) & done[order][ends].astype(bool)
    returns = np.add.reduceat(reward[order].astype(np.float64), starts)[complete]
    lengths = (ends - starts + 1)[complete]
    by_end = np.argsort(order[ends][complete], kind="stable")
    return EpisodeStats(returns[by_end], lengths[by_end].astype(np.int64), int(len(starts) - complete.sum()))


def _codecs(array: Any) -> list[dict[str, Any]]:
    """The codecs of a zarr v3 array as plain dicts (``{"name": "bytes", "configuration": {...}}``)."""
    return list(array.metadata.to_dict().get("codecs", ()))


def _arguments(configuration: dict[str, Any]) -> str:
    return f"({', '.join(f'{k}={v}' for k, v in configuration.items())})" if configuration else ""


def _summary(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max())}


# -- inspect ---------------------------------------------------------------------------------------------------
def inspect_store(path: str | Path) -> dict[str, Any]:
    """What a store holds, as plain data (JSON-ready)::

        {"path", "format", "capacity", "block_rows", "disk_rows", "rows_written", "rows_held", "oldest_row",
         "bytes_on_disk", "keys": [{"key", "shape", "dtype", "chunks", "codec", "bytes_on_disk"}, ...],
         "episodes": {"complete", "incomplete", "return": {"mean", "std", "min", "max"}, "length": {...}} or None}
    """
    store_path = _checked(path)
    storage = _storage(store_path)
    keys = []
    for key in sorted(storage.arrays):
        array = storage.arrays[key]
        keys.append({
            "key": key, "shape": list(array.shape), "dtype": str(array.dtype), "chunks": list(array.chunks),
            "codec": ", ".join(c["name"] + _arguments(c.get("configuration") or {}) for c in _codecs(array)),
            "bytes_on_disk": _disk_bytes(store_path / key),
        })
    columns = _scalar_columns(store_path, EPISODE_KEYS)
    episodes = None
    if columns is not None:
        stats = episode_stats(*(columns[key] for key in EPISODE_KEYS))
        episodes = {"complete": len(stats.returns), "incomplete": stats.incomplete,
                    "return": _summary(stats.returns), "length": _summary(stats.lengths)}
    return {
        "path": str(store_path), "format": FORMAT, "capacity": storage.capacity, "block_rows": storage.block_rows,
        "disk_rows": storage.disk_rows, "rows_written": storage.total_written, "rows_held": len(storage),
        "oldest_row": storage.total_written - len(storage), "bytes_on_disk": _disk_bytes(store_path),
        "keys": keys, "episodes": episodes,
    }


# -- check -----------------------------------------------------------------------------------------------------
def _episode_problems(columns: dict[str, np.ndarray], first_row: int) -> list[Problem]:
    traj_id, step_count, done = columns["traj_id"], columns["step_count"], columns["next/done"].astype(bool)
    order, starts = _episode_order(traj_id, step_count)
    continues = np.ones(len(order), dtype=bool)  # row order[i] continues the episode of row order[i - 1]
    continues[starts] = False
    problems = []
    steps = step_count[order]
    jumps = order[1:][continues[1:] & (steps[1:] != steps[:-1] + 1)]
    if len(jumps):
        problems.append(problem_at("step_count", "expected step_count to grow by 1 from the previous row of the "
                                               "same traj_id (or to be 0 where an episode starts)",
                                 np.sort(jumps) + first_row))
    early = order[:-1][continues[1:] & done[order][:-1]]
    if len(early):
        problems.append(problem_at("next/done", "done on a row that is not the last of its episode",
                                 np.sort(early) + first_row))
    if "next/terminated" in columns and "next/truncated" in columns:
        ends = columns["next/terminated"].astype(bool) | columns["next/truncated"].astype(bool)
        wrong = np.flatnonzero(done != ends)
        if len(wrong):
            problems.append(problem_at("next/done", "expected done == terminated | truncated", wrong + first_row))
    return problems


def check_store(path: str | Path) -> list[Problem]:
    """Every inconsistency of a store, ``[]`` when it is clean (warnings are problems with ``warning=True``).

    Checks, in this order: the structure (:func:`~streamrl.replay.store_integrity.check_structure`: the metadata
    reads; the attrs (format, committed cursor, disk slots) against every array they list (it exists, its shape
    and chunks match, uncompressed); the chunk files holding committed rows (they exist, whole); the newest
    block's checksum); then, when those are sound, the committed rows: no NaN or inf in float columns, and
    episodes (when the store has ``traj_id``, ``step_count``, ``next/done``): within an episode ``step_count`` grows
    by 1, ``next/done`` is set only on its last row, and ``done == terminated | truncated``. Reads the store only::

        errors = [p for p in check_store("replay.zarr") if not p.warning]
    """
    path = _require_store(path)
    problems = check_structure(path).problems
    if any(not p.warning for p in problems):
        return problems
    storage = _storage(path)
    first_row = storage.total_written - len(storage)
    floats = [key for key, (_, dtype) in storage.layout.items() if dtype.kind in "fc"]
    if floats:
        storage.layout = {key: storage.layout[key] for key in floats}
        bad: dict[str, list[np.ndarray]] = {key: [] for key in floats}
        for start, block in _blocks(storage):
            for key, column in block.items():
                finite = np.isfinite(column.reshape(len(column), -1)).all(axis=1)
                bad[key].append(np.flatnonzero(~finite) + start + first_row)
        for key, rows in bad.items():
            if any(len(r) for r in rows):
                problems.append(problem_at(key, "NaN or inf in a committed row", np.concatenate(rows)))
    keys = EPISODE_KEYS[:3] + tuple(k for k in ("next/terminated", "next/truncated") if k in storage.arrays)
    columns = _scalar_columns(path, keys)
    if columns is not None:
        problems += _episode_problems(columns, first_row)
    return problems


# -- sample ----------------------------------------------------------------------------------------------------
def sample_store(path: str | Path, n: int, *, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Up to ``n`` distinct random committed rows, in row order: (row numbers, columns by key path)."""
    if n < 1:
        raise ConfigError(f"sample takes n >= 1 rows, got {n=}")
    storage = open_store(path)
    if len(storage) == 0:
        raise StoreError(f"{str(path)!r} holds no committed rows yet; nothing to sample")
    positions = np.sort(np.random.default_rng(seed).choice(len(storage), min(n, len(storage)), replace=False))
    rows = storage.get(storage.slots_in_order()[torch.from_numpy(positions)])
    columns = {key: rows.get(tuple(key.split("/"))).numpy() for key in sorted(storage.layout)}
    return positions + storage.total_written - len(storage), columns


# -- export and import -----------------------------------------------------------------------------------------
def export_store(path: str | Path, to: str | Path) -> Path:
    """Write the committed rows, oldest to newest, to an ``.npz``: one array per key path, and the attrs.

    ``np.load(to)["next/reward"]`` is a column; ``json.loads(str(np.load(to)["attrs.json"]))`` the store's attrs.
    Each array streams into the file a block at a time.
    """
    path, to = _checked(path), Path(to)
    storage = _storage(path)
    attrs = dict(storage.group.attrs)
    with zipfile.ZipFile(to, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, (shape, dtype) in sorted(storage.layout.items()):
            one = _storage(path, [key])  # a pass per key reads only that key's chunk files
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                      "shape": (len(one), *shape)}
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header)
                for _, columns in _blocks(one):
                    member.write(np.ascontiguousarray(columns[key]).tobytes())
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.array(json.dumps(attrs)))
        archive.writestr(f"{ATTRS_ENTRY}.npy", buffer.getvalue())
    return to


def import_store(npz: str | Path, to: str | Path, *, capacity: int | None = None,
                 block_rows: int | None = None) -> ZarrStorage:
    """Write the rows of an ``.npz`` (from :func:`export_store`, or any arrays of equal length) into a new store.

    ``capacity`` and ``block_rows`` default to the exported store's (without its attrs: the row count and 4096);
    with a smaller capacity the newest rows are kept. Rows are renumbered from 0. Returns the closed storage.
    Nothing in the file is unpickled: an entry holding Python objects is refused with :class:`StoreError`.
    """
    npz, to = Path(npz), Path(to)
    if to.exists():
        raise ConfigError(f"{str(to)!r} already exists: import writes a new store; choose a new path or remove it")
    if not zipfile.is_zipfile(npz):
        raise StoreError(f"{str(npz)!r} is not an .npz file (a zip of .npy entries, as export_store writes)")
    with zipfile.ZipFile(npz) as archive:
        names = [name.removesuffix(".npy") for name in archive.namelist() if name.endswith(".npy")]
        attrs = {}
        if ATTRS_ENTRY in names:
            names.remove(ATTRS_ENTRY)
            with archive.open(f"{ATTRS_ENTRY}.npy") as member:
                attrs = _read_attrs(npz, member)
        members = {name: archive.open(f"{name}.npy") for name in names}
        try:
            layout = {name: _read_npy_header(npz, name, member) for name, member in members.items()}
            lengths = {shape[0] for shape, _ in layout.values()}
            if len(lengths) != 1:
                raise StoreError(f"{str(npz)!r}: expected arrays with the same number of rows (axis 0), got "
                                 f"{({name: shape for name, (shape, _) in layout.items()})}")
            total = lengths.pop()
            if total == 0:
                raise StoreError(f"{str(npz)!r} holds no rows: nothing to import")
            storage = ZarrStorage(capacity if capacity is not None else attrs.get("capacity", total), path=to,
                                  block_rows=block_rows if block_rows is not None else attrs.get("block_rows", 4096),
                                  in_ram=False)
            row_bytes = sum(int(np.prod(shape[1:])) * dtype.itemsize for shape, dtype in layout.values())
            step = max(1, BLOCK_BYTES // max(1, row_bytes))
            for start in range(0, total, step):
                n = min(step, total - start)
                rows = TensorDict({}, batch_size=[n])
                for name, (shape, dtype) in layout.items():
                    size = n * int(np.prod(shape[1:])) * dtype.itemsize
                    data = members[name].read(size)
                    if len(data) != size:
                        raise StoreError(f"{str(npz)!r}: entry {name!r} ends before its {total} rows; the file is "
                                         "truncated: export it again")
                    column = np.frombuffer(data, dtype).reshape(n, *shape[1:]).copy()
                    rows.set(tuple(name.split("/")), torch.from_numpy(column))
                storage.extend(rows)
                storage.flush()
        finally:
            for member in members.values():
                member.close()
    storage.close()
    return storage


def _read_attrs(npz: Path, member: Any) -> dict[str, Any]:
    """The export's attrs: a JSON object in a string array, read with ``allow_pickle=False``."""
    try:
        attrs = json.loads(str(np.lib.format.read_array(member, allow_pickle=False)))
    except ValueError as exc:  # an object array (pickled), or text that is not JSON
        raise StoreError(f"{str(npz)!r}: entry {ATTRS_ENTRY!r} must be a JSON string (as export_store writes); "
                         f"it is not ({exc}). Nothing in an .npz is unpickled") from None
    if not isinstance(attrs, dict) or not all(isinstance(attrs.get(k, 1), int) for k in ("capacity", "block_rows")):
        raise StoreError(f"{str(npz)!r}: entry {ATTRS_ENTRY!r} must be a JSON object with integer capacity and "
                         f"block_rows, got {attrs!r:.200}")
    return attrs


def _read_npy_header(npz: Path, name: str, member: Any) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(member)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise StoreError(f"{str(npz)!r}: entry {name!r} is .npy format {version}; expected 1.0 or 2.0 "
                         "(as np.savez and export_store write)")
    shape, fortran_order, dtype = read_header[version](member)
    if fortran_order or dtype.hasobject or not shape:
        raise StoreError(f"{str(npz)!r}: entry {name!r} must be a C-ordered array of plain values with a row axis, "
                         f"got {shape=}, {dtype=}, {fortran_order=}")
    return shape, dtype


# -- plot ------------------------------------------------------------------------------------------------------
def plot_store(path: str | Path, out: str | Path | None = None) -> Path:
    """Draw episode returns and lengths (histograms of complete episodes) and the reward over time (rows in write
    order, a moving average) into a PNG: ``out``, by default next to the store (``replay.zarr`` -> ``replay.png``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = _checked(path)
    columns = _scalar_columns(path, EPISODE_KEYS)
    if columns is None:
        raise StoreError(f"{str(path)!r} lacks one of the keys {list(EPISODE_KEYS)} (one value a row), which the "
                         "episode plots need")
    stats = episode_stats(*(columns[key] for key in EPISODE_KEYS))
    storage = _storage(path)
    first_row = storage.total_written - len(storage)
    fig, axes = plt.subplot_mosaic([["returns", "lengths"], ["reward", "reward"]], figsize=(10, 7))
    for name, values, label in (("returns", stats.returns, "episode return"),
                                ("lengths", stats.lengths, "episode length")):
        ax = axes[name]
        if len(values):
            ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
        else:
            ax.text(0.5, 0.5, "no complete episode", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(label)
        ax.set_ylabel("episodes")
        ax.grid(alpha=0.3)
    reward = columns["next/reward"].astype(np.float64)
    window = max(1, len(reward) // 200)
    sums = np.cumsum(np.r_[0.0, reward])
    smooth = (sums[window:] - sums[:-window]) / window
    x = np.arange(window - 1, len(reward)) + first_row
    every = max(1, len(smooth) // 4000)  # a few thousand points draw the same line
    ax = axes["reward"]
    ax.plot(x[::every], smooth[::every], color="tab:orange", label=f"moving average over {window} rows")
    ax.set_xlabel("row (write order)")
    ax.set_ylabel("reward")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.suptitle(f"{path}: {len(stats.returns)} complete episodes, {stats.incomplete} incomplete, "
                 f"{len(reward)} rows")
    fig.tight_layout()
    target = Path(out) if out is not None else path.with_suffix(".png")
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target
