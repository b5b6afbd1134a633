"""Is a replay store whole? The on-disk layout's rules and the structural checks that need no row data.

::

    found = check_structure("runs/dqn/replay.zarr")
    found.problems         # [] when the metadata, the committed cursor and the chunk files agree
    found.first_damaged    # the oldest committed row that is not intact (None: every one is): where repair cuts
    found.repairable       # False when the metadata itself is unreadable: no cursor to move back

What is checked, cheaply (``os.stat`` of the chunk files that hold committed rows, and the bytes of the committed
part of the newest block, one read per key):

* the group metadata reads (garbage ``zarr.json`` is a problem, never a traceback) and holds the streamrl
  attributes: ``format``, ``capacity``, ``block_rows``, ``keys``, ``committed``;
* the committed cursor ``{"rows": R, "size": S, "disk_rows": D}``: ``0 <= S <= min(R, capacity)`` (``S`` is
  smaller only after a repair dropped damaged rows) and ``D`` is what ``capacity`` and ``block_rows`` give;
* every listed key is an uncompressed array of ``D`` rows in blocks of ``block_rows``, and the chunk file of each
  committed row exists and is whole (``block_rows`` rows long): a missing file would read as zero-filled rows;
* the newest block's checksum: each commit records ``crc32`` of the committed rows of the newest block, per key
  (``committed["crc32"]``); its bytes on disk must match. This catches a cursor moved beyond the data inside a
  chunk file that exists, and a block changed (or lost in a power failure without ``fsync``) after its commit.

``ZarrStorage.open(..., writable=True)`` (what a resume uses) refuses a store with a problem; ``streamrl store
check`` reports them with the row checks; :func:`repair_store` (``streamrl store repair``) moves the cursor back
to ``first_damaged``::

    print(repair_store("runs/dqn/replay.zarr"))   # committed rows 10240 -> 8192, held 10240 -> 8192 (...)
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamrl.errors import StoreError

FORMAT = "streamrl.replay/2"
_SHOWN_ROWS = 10  # rows a problem lists; its message gives the count
Layout = dict[str, tuple[tuple[int, ...], np.dtype]]  # key path -> (row shape, dtype)


def disk_rows_for(capacity: int, block_rows: int) -> int:
    """Disk slots for a ring of ``capacity`` rows: whole blocks, plus one spare block being written."""
    return -(-capacity // block_rows) * block_rows + block_rows


def chunk_file(store: Path, key: str, chunk: int, row_ndim: int) -> Path:
    """The file of chunk ``chunk`` of ``key`` (zarr v3's default chunk key: ``key/c/<chunk>/0/...``)."""
    return store.joinpath(key, "c", str(chunk), *("0" for _ in range(row_ndim)))


def newest_block_rows(rows: int, size: int, block_rows: int) -> tuple[int, int]:
    """The committed rows of the newest block, ``(first, end)``, that a commit's checksum covers."""
    return max((rows - 1) // block_rows * block_rows, rows - size), rows


def crc32_of(data: np.ndarray, previous: int = 0) -> int:
    """The checksum of rows as they lie in a chunk file (C order); ``previous`` continues an earlier one."""
    return zlib.crc32(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data, previous)


@dataclass(frozen=True)
class Problem:
    """An inconsistency a check found: where (a key path or attribute), what, at which rows.

    ``rows`` are row numbers, the first few of them; ``warning`` marks a problem that leaves the rows intact
    (leftover ``*.partial`` files, an array the attrs do not list).
    """

    where: str
    message: str
    rows: tuple[int, ...] = ()
    warning: bool = False

    def __str__(self) -> str:
        level = "warning" if self.warning else "error"
        at = ""
        if self.rows:
            at = f" at row{'s' if len(self.rows) > 1 else ''} {', '.join(map(str, self.rows))}"
        return f"{level}: {self.where}: {self.message}{at}"


def problem_at(where: str, what: str, rows: np.ndarray) -> Problem:
    """A problem at ``rows`` (row numbers): the count in the message, the first few rows listed."""
    return Problem(where, f"{what} ({len(rows)} row{'s' if len(rows) != 1 else ''})",
                   tuple(int(r) for r in rows[:_SHOWN_ROWS]))


@dataclass
class Structure:
    """What :func:`check_structure` found.

    ``first_damaged``: the oldest committed row whose data is not intact (rows before it are). ``repairable``:
    the metadata reads and the arrays are laid out as the attrs say, so moving the cursor back fixes the store.
    ``crc32``: the newest block's checksums as computed from disk (what a writer continues from).
    """

    attrs: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    first_damaged: int | None = None
    repairable: bool = True
    crc32: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if not p.warning]

    def damaged_from(self, row: int) -> None:
        self.first_damaged = row if self.first_damaged is None else min(self.first_damaged, row)

    def fatal(self, problem: Problem) -> Structure:
        self.problems.append(problem)
        self.repairable = False
        return self


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_structure(path: str | Path) -> Structure:
    """The metadata, the committed cursor and the chunk files of the store at ``path``; see the module docstring."""
    import zarr

    path = Path(path)
    found = Structure()
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs: dict[str, Any] = dict(group.attrs)
        found.attrs = attrs
    except Exception as exc:  # noqa: BLE001 - any way the metadata fails to parse is the same problem
        return found.fatal(Problem("zarr.json", f"the group metadata does not read ({type(exc).__name__}: {exc}); "
                                                "the store's zarr.json is damaged"))
    if attrs.get("format") != FORMAT:
        return found.fatal(Problem("format", f"expected {FORMAT!r}, got {attrs.get('format')!r}: not a streamrl "
                                             "replay store, or its creation was interrupted (it holds no rows)"))
    missing = [name for name in ("capacity", "block_rows", "keys", "committed") if name not in attrs]
    if missing:
        return found.fatal(Problem("attrs", f"missing {missing}; a store's attrs hold capacity, block_rows, keys, "
                                            "committed"))
    capacity, block, keys, committed = attrs["capacity"], attrs["block_rows"], attrs["keys"], attrs["committed"]
    if not (_is_int(capacity) and _is_int(block) and capacity > 0 and 0 < block <= capacity
            and isinstance(keys, list) and all(isinstance(k, str) for k in keys)
            and isinstance(committed, dict) and all(_is_int(committed.get(n)) for n in ("rows", "size"))):
        return found.fatal(Problem("attrs", f"expected capacity >= block_rows >= 1, keys a list of key paths and "
                                            f"committed with integer rows and size, got {capacity=}, "
                                            f"block_rows={block}, {keys=}, {committed=}"))
    rows, size, disk = committed["rows"], committed["size"], disk_rows_for(capacity, block)
    if rows < 0 or size < 0:
        return found.fatal(Problem("committed", f"expected rows >= 0 and size >= 0, got {committed=}"))
    if size > min(rows, capacity):
        found.problems.append(Problem("committed", f"expected size <= min(rows, capacity), got {committed=}, "
                                                   f"{capacity=}: the cursor claims rows that were never written"))
        size = min(rows, capacity)  # the size is wrong, not a row: repair keeps the rows and fixes the size
    if committed.get("disk_rows") != disk:
        found.problems.append(Problem("committed", f"expected disk_rows == {disk} for {capacity=} and "
                                                   f"block_rows={block}, got {committed.get('disk_rows')!r}"))
    layout = array_layouts(group, keys, disk, block, found)
    if found.repairable:  # the arrays are as the attrs say: their chunk files can be checked
        _check_chunk_files(path, layout, rows, size, disk, block, found)
        _check_newest_block(path, layout, committed, rows, size, disk, block, found)
    _warn_of_leftovers(group, path, set(keys), found)
    return found


def array_layouts(group: Any, keys: list[str], disk: int, block: int, found: Structure) -> Layout:
    """Each listed key's row shape and dtype, once its array reads and is laid out as the attrs say (else a
    problem in ``found``, which is then not repairable)."""
    import zarr

    layout = {}
    for key in keys:
        try:
            array: Any = group.get(key)
        except Exception as exc:  # noqa: BLE001 - garbage array metadata: a problem, not a traceback
            found.fatal(Problem(key, f"the array metadata does not read ({type(exc).__name__}: {exc})"))
            continue
        if not isinstance(array, zarr.Array):
            found.fatal(Problem(key, "listed in attrs['keys'] but no array of that name is in the group"))
            continue
        row_shape = tuple(array.shape[1:])
        if array.shape[0] != disk or tuple(array.chunks) != (block, *row_shape):
            found.fatal(Problem(key, f"expected shape ({disk}, ...) in chunks of ({block}, ...), got "
                                     f"shape={array.shape}, chunks={array.chunks}"))
            continue
        metadata: dict[str, Any] = array.metadata.to_dict()
        codecs = [codec["name"] for codec in metadata.get("codecs", ())]
        if codecs != ["bytes"]:
            found.fatal(Problem(key, f"expected uncompressed chunks (codecs ['bytes']), got {codecs}"))
            continue
        layout[key] = (row_shape, array.dtype)
    return layout


def chunk_bytes(layout: Layout, key: str, block: int) -> int:
    row_shape, dtype = layout[key]
    return block * int(np.prod(row_shape)) * dtype.itemsize


def _check_chunk_files(path: Path, layout: Layout, rows: int, size: int, disk: int, block: int,
                       found: Structure) -> None:
    row_numbers = np.arange(rows - size, rows)
    chunk_of_row = row_numbers % disk // block
    for key, (row_shape, _) in layout.items():
        expected = chunk_bytes(layout, key, block)
        for chunk in np.unique(chunk_of_row):
            file = chunk_file(path, key, int(chunk), len(row_shape))
            relative = file.relative_to(path)
            if not file.is_file():
                what = f"chunk file {relative} is missing: the committed cursor is ahead of the data"
            elif file.stat().st_size != expected:
                what = f"chunk file {relative} has {file.stat().st_size} bytes, expected {expected}"
            else:
                continue
            damaged = row_numbers[chunk_of_row == chunk]
            found.problems.append(problem_at(key, what, damaged))
            found.damaged_from(int(damaged[0]))


def newest_block_crc32(path: Path, layout: Layout, rows: int, size: int, disk: int, block: int) -> dict[str, int]:
    """The checksums of the committed rows of the newest block, per key, from the chunk files (which exist)."""
    if size == 0:
        return {}
    first, end = newest_block_rows(rows, size, block)
    crc32 = {}
    for key, (row_shape, dtype) in layout.items():
        row_bytes = int(np.prod(row_shape)) * dtype.itemsize
        with chunk_file(path, key, first % disk // block, len(row_shape)).open("rb") as f:
            f.seek(first % block * row_bytes)
            crc32[key] = zlib.crc32(f.read((end - first) * row_bytes))
    return crc32


def _check_newest_block(path: Path, layout: Layout, committed: dict[str, Any], rows: int, size: int, disk: int,
                        block: int, found: Structure) -> None:
    """Compare the newest block's committed bytes with the checksums its commit recorded (stores written before
    checksums were recorded have none: nothing to compare, the computed ones are kept for the writer)."""
    if size == 0 or found.first_damaged is not None:
        return  # nothing committed, or damaged at or before the newest block already
    first, end = newest_block_rows(rows, size, block)
    recorded: dict[str, Any] = committed["crc32"] if isinstance(committed.get("crc32"), dict) else {}
    found.crc32 = newest_block_crc32(path, layout, rows, size, disk, block)
    for key in layout:
        if key in recorded and recorded[key] != found.crc32[key]:
            found.problems.append(problem_at(
                key, "the committed rows of the newest block differ from the checksum their commit recorded: the "
                     "committed cursor is ahead of the data, or the block changed after its commit",
                np.arange(first, end)))
            found.damaged_from(first)


def _warn_of_leftovers(group: Any, path: Path, listed: set[str], found: Structure) -> None:
    import zarr

    try:
        with warnings.catch_warnings():  # zarr warns of the *.partial files, reported below
            warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component")
            members = list(group.members(max_depth=None))
    except Exception as exc:  # noqa: BLE001 - an unlisted node with garbage metadata: readers ignore it
        found.problems.append(Problem("group", f"a member's metadata does not read ({type(exc).__name__}: {exc})",
                                      warning=True))
        members = []
    for name, member in members:
        if isinstance(member, zarr.Array) and name not in listed:
            found.problems.append(Problem(name, "an array not listed in attrs['keys']: readers ignore it",
                                          warning=True))
    for leftover in sorted(path.rglob("*.partial")):
        found.problems.append(Problem(str(leftover.relative_to(path)), "leftover of an interrupted write (opening "
                                      "the store for writing removes it)", warning=True))


def chunks_of(first: int, end: int, disk: int, block: int) -> set[int]:
    """The chunks holding rows ``first .. end - 1`` (row ``r`` lies in chunk ``r % disk // block``)."""
    if end <= first:
        return set()
    chunks = disk // block
    count = min(chunks, (end - 1) // block - first // block + 1)
    return {(first // block + i) % chunks for i in range(count)}


@dataclass(frozen=True)
class Repair:
    """What :func:`repair_store` did: the committed cursor before and after, the errors it found, and the damaged
    chunk files it removed (they held no row that is kept). No ``problems``: the store was intact, unchanged."""

    path: Path
    rows_before: int
    size_before: int
    rows_after: int
    size_after: int
    problems: tuple[Problem, ...] = ()
    removed: tuple[str, ...] = ()

    def __str__(self) -> str:
        if not self.problems:
            return f"{self.path}: intact, nothing to repair ({self.rows_after} rows committed, {self.size_after} held)"
        dropped = self.rows_before - self.rows_after
        removed = f"; removed {len(self.removed)} damaged chunk file(s) past it" if self.removed else ""
        return (f"{self.path}: committed rows {self.rows_before} -> {self.rows_after}, held {self.size_before} -> "
                f"{self.size_after} ({dropped} row(s) dropped from row {self.rows_after} on){removed}. It was: "
                f"{self.problems[0]}" + (f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""))


def repair_store(path: str | Path) -> Repair:
    """Move the committed cursor of a damaged store back to the last intact block: what ``streamrl store repair``
    does. ::

        print(repair_store("runs/dqn/replay.zarr"))   # committed rows 10240 -> 8192, held ... (2048 dropped ...)

    Keeps every committed row before the first damaged one (a chunk file missing or not whole, a newest block that
    differs from its checksum), fixes a ``size`` or ``disk_rows`` the cursor got wrong, and removes the damaged
    chunk files past the new cursor (a writer writes them anew). On an intact store nothing changes. A store whose
    metadata does not read, or whose arrays are not laid out as its attrs say, cannot be repaired this way:
    :class:`StoreError`. A run resumed on a repaired store goes on with the rows it holds
    (:class:`~streamrl.replay.buffer.ReplayBuffer` forgets the rest, with a warning).
    """
    import zarr

    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{str(path)!r} is not a replay store (no zarr.json in it): give the directory of a store, "
                         "e.g. runs/<run>/replay.zarr")
    found = check_structure(path)
    if not found.repairable:
        raise StoreError(f"cannot repair {str(path)!r}: {found.errors[0]}. Repair moves the committed cursor back; it "
                         "does not rewrite damaged metadata or arrays: restore the store from a copy, or start a new "
                         "run")
    attrs = found.attrs
    rows, size = attrs["committed"]["rows"], attrs["committed"]["size"]
    if not found.errors:
        return Repair(path, rows, size, rows, size)
    capacity, block = attrs["capacity"], attrs["block_rows"]
    disk = disk_rows_for(capacity, block)
    oldest = rows - min(size, rows, capacity)
    end = found.first_damaged if found.first_damaged is not None else rows
    group = zarr.open_group(str(path), mode="r+")
    layout = array_layouts(group, attrs["keys"], disk, block, Structure())
    removed = []
    for chunk in sorted(chunks_of(end, rows, disk, block) - chunks_of(oldest, end, disk, block)):
        for key, (row_shape, _) in layout.items():
            file = chunk_file(path, key, chunk, len(row_shape))
            if file.is_file() and file.stat().st_size != chunk_bytes(layout, key, block):
                file.unlink()
                removed.append(str(file.relative_to(path)))
    group.attrs["committed"] = {"rows": end, "size": end - oldest, "disk_rows": disk,
                                "crc32": newest_block_crc32(path, layout, end, end - oldest, disk, block)}
    return Repair(path, rows, size, end, end - oldest, tuple(found.errors), tuple(removed))
