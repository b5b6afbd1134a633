"""A replay storage on disk: a zarr v3 group that survives ``kill -9`` at any instant and that a run resumes from.

::

    storage = ZarrStorage(1_000_000, path="replay.zarr", block_rows=4096)   # fsync=True for power-loss safety
    index = storage.extend(rows)            # rows land in RAM first ...
    storage.flush()                         # ... and on disk in whole blocks, each followed by a commit
    storage.flush(partial=storage.commit_due())   # ... and the incomplete block once its rows waited 1 s
    batch = storage.get(index[:256])        # from the RAM ring (in_ram=True) or memory-mapped chunk files
    storage = ZarrStorage.open("replay.zarr")    # after a crash: the committed rows, writing resumes after them

    with ZarrStorage(100_000, path="mine.zarr") as store:   # on its own, without a pipeline's writer stage:
        store.extend(rows)                                   # close() (here: leaving the block) flushes and commits

A store that is extended and never closed is flushed and committed when the interpreter exits (a normal exit or
an uncaught exception; not ``kill -9`` or ``os._exit``): a script that fills a store and ends keeps its rows. A
pipeline's writer stage commits as it goes and closes the store when the run ends.

Layout. Each key (nested keys become paths: ``next/reward``) is an uncompressed array of ``disk_rows`` rows,
chunked in blocks of ``block_rows``; row number ``r`` (counting every row ever written) lives at disk slot
``r % disk_rows``. ``disk_rows`` is the capacity rounded up to whole blocks plus one spare block, so the block
being written never holds one of the ``capacity`` newest committed rows. The group attribute ``committed`` =
``{"rows": R, "size": S, "disk_rows": D, "crc32": {key: checksum}}`` says the rows ``R - S .. R - 1`` are whole
(``S == min(R, capacity)``, or less after ``streamrl store repair`` dropped damaged rows); ``crc32`` is the
checksum of the committed rows of the newest block, per key. Any zarr reader opens the store::

    g = zarr.open_group("replay.zarr", mode="r")
    c = g.attrs["committed"]
    rows = np.arange(c["rows"] - c["size"], c["rows"]) % c["disk_rows"]   # oldest to newest
    rewards = g["next/reward"][:][rows]

Commit protocol. A flush writes the pending rows block by block, all keys of a block at once, and after each
block's data (and its fsync, if asked) writes ``committed``: zarr writes every file through a temporary file and
a rename, so a chunk file or the commit record is either the old one or the new one, never torn. A commit may
cover a *partial* block: the writer stage commits pending rows at least every ``commit_every_s`` (default 0.5 s:
half a second of margin for the commit itself) and whole blocks as they fill, so ``kill -9`` loses at most the rows
of the last second or the last chunk, however large ``block_rows`` is. The next flush rewrites that block's chunk
files with the committed rows unchanged and more rows after them; a writer killed mid-rewrite leaves, per file, the
old or the new version, and both hold the committed rows. Why not one commit per flush: a writer killed mid-flush
leaves the blocks it was writing half old, half new across keys; one block of slack bounds that damage to rows
nobody trusts. The price of partial commits: zarr writes a chunk file whole, so each timed commit rewrites the
block's files (``block_rows`` rows of every key) for the rows that came since the last one. That is nothing for
vector rows; for large rows (frames) choose a smaller ``block_rows`` or a larger ``commit_every_s`` (``math.inf``:
whole blocks only, as before, and the durability bound becomes a block).

Integrity. ``ZarrStorage.open(path)`` (writable, what a resume uses) first runs the structural checks of
:mod:`streamrl.replay.store_integrity` (metadata, cursor, chunk files of the committed rows, the newest block's
checksum; no row data read but that block) and refuses a damaged store, naming the problem and
``streamrl store repair PATH``, which moves the cursor back to the last intact block. A store is never opened with
``mode="w"``: creating one where anything exists is a :class:`StoreError`. A failed write (disk full: ``ENOSPC``)
raises :class:`StoreError` naming the store and the rows not committed; the committed rows stay intact.

Why uncompressed: chunk files are then plain arrays that :class:`numpy.memmap` maps, so stores larger than RAM
sample without going through zarr (``in_ram=False``); zarr-python gathers random rows 100x slower than RAM. A
chunk file is replaced (not rewritten in place) on every flush, so a mapped chunk is remapped after its block is
written. Nothing is pickled: the metadata is JSON, the chunks raw arrays.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

from streamrl.errors import ConfigError, StoreDiskFull, StoreError
from streamrl.replay.storage import RamStorage
from streamrl.replay.store_integrity import FORMAT, check_structure, chunk_file, crc32_of, disk_rows_for

__all__ = ["FORMAT", "ZarrStorage", "disk_rows_for"]


class ZarrStorage:
    """Rows in a zarr v3 group, with a committed cursor; see the module docstring.

    ``path=None`` puts the group at ``<run dir>/replay.zarr`` (the writer stage calls :meth:`attach`).
    ``in_ram=True`` also keeps every row in a RAM ring and samples from it; ``False`` samples from memory-mapped
    chunk files and keeps only the rows not yet on disk in RAM. ``fsync=True`` syncs each block's files to the
    device before its commit (durable across power loss, not only process death). ``commit_every_s``: pending
    rows are due for a commit once the oldest of them waited this long (:meth:`commit_due`); the writer stage
    commits them then, partial block or not, which bounds what ``kill -9`` loses to about that many seconds.
    It is a :class:`~streamrl.replay.storage.Storage`.
    """

    durable: ClassVar[bool] = True

    def __init__(self, capacity: int, *, path: str | Path | None = None, block_rows: int = 4096,
                 fsync: bool = False, in_ram: bool = True, commit_every_s: float = 0.5) -> None:
        if capacity < 1 or block_rows < 1:
            raise ConfigError(f"ZarrStorage needs capacity >= 1 and block_rows >= 1, got {capacity}, {block_rows}")
        if not commit_every_s > 0:
            raise ConfigError(f"ZarrStorage needs commit_every_s > 0 (seconds rows may wait uncommitted), got "
                              f"{commit_every_s}")
        self.capacity = capacity
        self.block_rows = min(block_rows, capacity)
        self.disk_rows = disk_rows_for(capacity, self.block_rows)
        self.path = Path(path) if path is not None else None
        self.run_dir: Path | None = None  # set by attach; the state records the path relative to it
        self.fsync = fsync
        self.in_ram = in_ram
        self.commit_every_s = commit_every_s
        self.ram = RamStorage(capacity) if in_ram else None
        # in_ram=False: (first row number, columns) of the rows not on disk yet; replaced whole, never edited in
        # place, so a reader on the loop never sees it half updated by a flush in the writer's thread
        # (its first row number, columns with room to grow, rows in use)
        self.tail: tuple[int, dict[str, np.ndarray], int] = (0, {}, 0)
        self.group: Any = None
        self.arrays: dict[str, Any] = {}
        self.layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {}  # key path -> (row shape, dtype)
        self.committed_rows = 0
        self.total_written = 0
        self.first_row = 0  # no row before it is held: > 0 only after a repair dropped rows (len counts from it)
        # (rows written after it, time.monotonic()) per extend: when the oldest pending row came (event loop only)
        self._arrivals: deque[tuple[int, float]] = deque()
        self.crc32: dict[str, int] = {}  # per key: the committed rows of the newest block (the commit records it)
        self.write_error: StoreError | None = None  # the last flush failed (disk full): close does not retry
        self._maps: dict[int, dict[str, np.ndarray]] = {}  # chunk number -> key path -> memmap
        self._rewrites: dict[int, int] = {}  # chunk number -> times its files began or ended a rewrite
        self._pool: Executor | None = None

    def __enter__(self) -> ZarrStorage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- ring bookkeeping (the sampler contract) -------------------------------------------------------------
    def __len__(self) -> int:
        return min(self.total_written - self.first_row, self.capacity)

    @property
    def cursor(self) -> int:
        return self.total_written % self.capacity

    @property
    def pending_rows(self) -> int:
        return self.total_written - self.committed_rows

    @property
    def ram_rows(self) -> TensorDict | None:
        """The RAM ring's rows by slot (``in_ram=True``), else ``None``: samplers then gather with :meth:`get`."""
        return self.ram.data if self.ram is not None else None

    def slots_in_order(self) -> torch.Tensor:
        """Ring slots of the rows held, oldest first (what ``get`` takes)."""
        return torch.arange(self.total_written - len(self), self.total_written) % self.capacity

    def _row_numbers(self, slots: np.ndarray) -> np.ndarray:
        """The row number (count of rows written before it) now held at each ring slot."""
        last = self.total_written - 1
        return last - (last - slots) % self.capacity

    # -- creation ----------------------------------------------------------------------------------------------
    def attach(self, run_dir: str | Path) -> None:
        """Resolve a relative or missing path against the run directory, which :meth:`state_dict` records the
        path relative to (a copied or moved run directory then resumes into its own store)."""
        self.run_dir = Path(run_dir)
        if self.path is None:
            self.path = self.run_dir / "replay.zarr"
        elif not self.path.is_absolute():
            self.path = self.run_dir / self.path

    def _create(self, rows: TensorDictBase) -> None:
        import zarr

        if self.path is None:
            raise StoreError("ZarrStorage has no path: pass path= or run it in a pipeline (the writer attaches it)")
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            what = "a replay store" if (self.path / "zarr.json").exists() else "something that is not empty"
            raise StoreError(f"{str(self.path)!r} already holds {what}: a new store is never written over it. Resume "
                             "the run that wrote it (streamrl run FILE --resume RUN_DIR), or remove it (streamrl "
                             "run --overwrite does, for a run directory) or choose another path")
        self.group = zarr.open_group(str(self.path), mode="w-")
        for name, leaf in _columns(rows).items():
            shape, dtype = tuple(leaf.shape[1:]), _numpy_dtype(leaf.dtype)
            array = self.group.create_array(name, shape=(self.disk_rows, *shape), chunks=(self.block_rows, *shape),
                                            dtype=dtype, fill_value=0, compressors=None)
            self.arrays[name] = array.with_config({"write_empty_chunks": True})
            self.layout[name] = (shape, dtype)
        # the format attribute comes last: a store without it was never fully created
        self.group.attrs.update({"capacity": self.capacity, "block_rows": self.block_rows, "keys": sorted(self.arrays),
                                 "committed": self._commit_record(self.committed_rows, self.crc32)})
        self.group.attrs["format"] = FORMAT

    def _commit_record(self, rows: int, crc32: dict[str, int]) -> dict[str, Any]:
        return {"rows": rows, "size": min(rows - self.first_row, self.capacity), "disk_rows": self.disk_rows,
                "crc32": crc32}

    # -- writing -----------------------------------------------------------------------------------------------
    def extend(self, rows: TensorDictBase) -> torch.Tensor:
        """Append ``rows`` (one batch dim) in RAM; return their ring slots. :meth:`flush` puts them on disk.

        Rows are never dropped unwritten: if more rows than the ring holds would wait for a flush, this flushes
        first (blocking I/O; the writer stage flushes after every extend, so it never comes to that).
        """
        if rows.batch_dims != 1:
            raise ValueError(f"extend takes rows with one batch dim, got batch_size={tuple(rows.batch_size)}")
        if self.group is None:
            self._create(rows)
        _flush_at_exit(self)
        first, n, done = self.total_written, rows.shape[0], 0
        while done < n:
            if self.pending_rows == self.capacity:
                self.flush(partial=True)
            take = min(n - done, self.capacity - self.pending_rows)
            piece = rows[done:done + take]
            if self.ram is not None:
                self.ram.extend(piece)
            else:
                self._append_tail(piece)
            self.total_written += take
            done += take
        self._arrivals.append((self.total_written, time.monotonic()))
        self.seconds_to_commit()  # drops the arrivals of committed rows: at most one entry per pending extend
        return torch.arange(first, first + n) % self.capacity

    def _append_tail(self, rows: TensorDictBase) -> None:
        first, columns, used = self.tail
        new = {name: leaf.detach().cpu().numpy() for name, leaf in _columns(rows).items()}
        n = rows.shape[0]
        if not columns or used + n > len(next(iter(columns.values()))):  # grow by doubling: appends stay O(n)
            room = max(2 * (used + n), 2 * self.block_rows)
            grown = {name: np.empty((room, *shape), dtype) for name, (shape, dtype) in self.layout.items()}
            for name, column in columns.items():
                grown[name][:used] = column[:used]
            columns = grown
        for name, column in new.items():
            columns[name][used:used + n] = column  # past `used`: no reader looks there yet
        self.tail = (first if used else self.total_written, columns, used + n)

    def _block_data(self, start: int, end: int) -> dict[str, np.ndarray]:
        """Rows ``start .. end - 1`` (row numbers, not yet committed) of every key."""
        if self.ram is not None:
            assert self.ram.data is not None
            slots = torch.arange(start, end) % self.capacity
            return {name: column.index_select(0, slots).numpy() for name, column in _columns(self.ram.data).items()}
        first, columns, _ = self.tail
        return {name: rows[start - first:end - first] for name, rows in columns.items()}

    def flush_due(self) -> bool:
        """Whether a flush has work worth a thread hop: a whole block pending, or :meth:`commit_due`."""
        return self.pending_rows >= self.block_rows or self.commit_due()

    def commit_due(self) -> bool:
        """Whether the oldest pending row has waited ``commit_every_s``: time for ``flush(partial=True)``."""
        return self.seconds_to_commit() == 0.0

    def seconds_to_commit(self) -> float:
        """Seconds until pending rows are due for a commit (``commit_every_s`` when none is pending): the clock
        starts when the oldest row not yet committed came, also when a whole-block flush committed older ones."""
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] <= self.committed_rows:
            arrivals.popleft()
        if not arrivals or not self.pending_rows:
            return self.commit_every_s
        return max(0.0, arrivals[0][1] + self.commit_every_s - time.monotonic())

    def flush(self, *, partial: bool = False) -> int:
        """Write every whole pending block (with ``partial``, the last incomplete one too), committing after each.

        Blocking file I/O: the writer stage calls it from a thread. Returns the committed row count. A failed write
        raises :class:`StoreError` (``"disk full writing ..."`` for ``ENOSPC``); the committed rows stay intact.
        """
        if self.group is None:
            return self.committed_rows
        end = self.total_written if partial else self.total_written - self.total_written % self.block_rows
        try:
            while self.committed_rows < end:
                self._commit_block(self.committed_rows,
                                   min(end, (self.committed_rows // self.block_rows + 1) * self.block_rows))
        except OSError as exc:
            self.write_error = self._write_failed(exc)
            raise self.write_error from exc
        self.write_error = None
        return self.committed_rows

    def _commit_block(self, start: int, stop: int) -> None:
        """Write rows ``start .. stop - 1`` (one block, or the rest of one), then commit them."""
        data = self._write_block(start, stop)
        if self.fsync:
            self._fsync_block(start)
        fresh = start % self.block_rows == 0 or start == self.first_row  # the checksum covers this block's rows
        crc32 = {name: crc32_of(column, 0 if fresh else self.crc32.get(name, 0)) for name, column in data.items()}
        self.group.attrs["committed"] = self._commit_record(stop, crc32)
        self.committed_rows, self.crc32 = stop, crc32
        if self.fsync:  # the commit record too, or a power loss could take the newest commit back
            assert self.path is not None
            _fsync(self.path / "zarr.json")
            _fsync(self.path)
        if self.ram is None:
            first, columns, used = self.tail
            self.tail = (stop, {name: rows[stop - first:used].copy() for name, rows in columns.items()},
                         used - (stop - first))

    def _write_failed(self, exc: OSError) -> StoreError:
        pending = self.pending_rows
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            assert self.path is not None
            return StoreDiskFull(self.path, f"{pending} rows not committed; the store keeps its {self.committed_rows} "
                                            "committed rows intact. Free space and resume the run")
        return StoreError(f"writing {self.path} failed ({exc}): {pending} rows not committed; the store keeps its "
                          f"{self.committed_rows} committed rows intact. Fix the cause and resume the run")

    def _write_block(self, start: int, stop: int) -> dict[str, np.ndarray]:
        data = self._block_data(start, stop)
        disk = start % self.disk_rows
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(8, len(self.arrays)), thread_name_prefix="zarr-flush")

        def write(name: str) -> None:
            self.arrays[name][disk:disk + stop - start] = data[name]

        chunk = disk // self.block_rows
        self._rewrites[chunk] = self._rewrites.get(chunk, 0) + 1  # odd: its files are being replaced
        futures = [self._pool.submit(write, name) for name in self.arrays]  # all keys at once
        for future in futures:  # every write ends before a failure is raised: none is left writing
            future.exception()
        self._maps.pop(chunk, None)  # its chunk files were replaced: remap on the next read
        self._rewrites[chunk] += 1
        for future in futures:
            future.result()
        return data

    def _chunk_file(self, name: str, chunk: int) -> Path:
        assert self.path is not None
        return chunk_file(self.path, name, chunk, len(self.layout[name][0]))

    def _fsync_block(self, start: int) -> None:
        chunk = start % self.disk_rows // self.block_rows

        def sync(name: str) -> None:
            _fsync(self._chunk_file(name, chunk))
            _fsync(self._chunk_file(name, chunk).parent)  # the rename that put it there

        assert self._pool is not None  # _write_block made it
        # all keys at once: the file system commits concurrent syncs together, far faster than one by one
        for future in [self._pool.submit(sync, name) for name in self.arrays]:
            future.result()

    def close(self) -> None:
        """Flush what is left (a partial block too) and commit; after a failed flush, only release the threads
        (the failure was raised already, naming the rows not committed). A store used on its own, without a
        pipeline's writer stage, is closed with ``with ZarrStorage(...) as store:``, or by hand; one still open
        when the interpreter exits is flushed and committed then (see :func:`_flush_open_stores`)."""
        _OPEN_STORES.discard(self)
        if self.write_error is None:
            self.flush(partial=True)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # -- reading -----------------------------------------------------------------------------------------------
    def get(self, index: torch.Tensor) -> TensorDict:
        """Rows at ring slots ``index`` (from :meth:`extend`, a sampler or :meth:`slots_in_order`)."""
        if self.ram is not None:
            return self.ram.get(index)
        if self.total_written == 0:
            raise StoreError("the storage is empty: extend it before sampling")
        first, tail, _ = self.tail  # rows from `first` on are in RAM, older ones on disk
        slots = index.to(torch.long).numpy()
        rows = self._row_numbers(slots)
        on_disk = rows < first
        out = {name: np.empty((len(slots), *shape), dtype) for name, (shape, dtype) in self.layout.items()}
        if not on_disk.all():
            for name in out:
                out[name][~on_disk] = tail[name][rows[~on_disk] - first]
        disk = rows[on_disk] % self.disk_rows
        chunks, within = np.divmod(disk, self.block_rows)
        where = np.flatnonzero(on_disk)
        order = np.argsort(chunks, kind="stable")
        bounds = np.flatnonzero(np.diff(chunks[order])) + 1
        for group in np.split(order, bounds) if len(order) else []:
            maps = self._chunk_maps(int(chunks[group[0]]))
            dst, src = where[group], within[group]
            for name, column in out.items():
                column[dst] = maps[name][src]
        return _tensordict(out, len(slots))

    def _chunk_maps(self, chunk: int) -> dict[str, np.ndarray]:
        maps = self._maps.get(chunk)
        if maps is None:
            rewrites = self._rewrites.get(chunk, 0)
            # plain ndarray views of the maps: indexing a np.memmap costs ~5 us more per call
            maps = {name: np.asarray(np.memmap(self._chunk_file(name, chunk), dtype=dtype, mode="r",
                                               shape=(self.block_rows, *shape)))
                    for name, (shape, dtype) in self.layout.items()}
            # a flush thread replacing this chunk's files meanwhile may have left maps of the old files: use them
            # for this read (they hold every row committed before), but never keep them
            if rewrites % 2 == 0 and self._rewrites.get(chunk, 0) == rewrites:
                self._maps[chunk] = maps
        return maps

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the rows are: a checkpoint holds the path and counts, the store holds the data.

        The path is relative to the run directory when the store lies inside it (absolute otherwise), so a run
        directory resumes into its own store wherever it was moved or copied to.
        """
        return {"path": self._recorded_path(), "committed_rows": self.committed_rows,
                "total_written": self.total_written}

    def _recorded_path(self) -> str | None:
        if self.path is None:
            return None
        path = Path(os.path.abspath(self.path))
        if self.run_dir is not None and path.is_relative_to(os.path.abspath(self.run_dir)):
            return path.relative_to(os.path.abspath(self.run_dir)).as_posix()
        return str(path)

    def needs_run_dir(self, state: dict[str, Any]) -> bool:
        """Whether loading ``state`` waits for :meth:`attach`: its path is relative (or missing) and no run
        directory is attached yet."""
        path = state.get("path")
        return self.run_dir is None and not (path is not None and Path(path).is_absolute())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Reopen the store the state names, with every row committed there (rows stored after the checkpoint
        too: they are whole transitions). A relative path is resolved against the run directory (:meth:`attach`
        first; the writer stage's buffer does). The store may hold fewer rows than the state counts (damaged and
        repaired): ``total_written`` then tells, and :class:`~streamrl.replay.buffer.ReplayBuffer` reconciles."""
        recorded = state.get("path")
        path = Path(recorded) if recorded is not None else self.path
        if path is None:
            raise StoreError("the state names no store and this ZarrStorage has no path: pass path=")
        if not path.is_absolute():
            if self.run_dir is None:
                raise StoreError(f"the store path {recorded!r} is relative to the run directory: call "
                                 "attach(run_dir) before load_state_dict (a pipeline's writer stage does)")
            path = self.run_dir / path
        if not (path / "zarr.json").exists():
            if state["total_written"] == 0:  # the checkpoint came before the first row: nothing to reopen
                self.path = path
                return
            raise StoreError(f"no replay store at {str(path)!r}, where the checkpoint counts "
                             f"{state['total_written']} rows: put the run directory's replay.zarr back, or start a "
                             "new run")
        store = ZarrStorage.open(path, in_ram=self.in_ram)
        if store.capacity != self.capacity:
            raise StoreError(f"the store at {str(path)!r} holds {store.capacity} rows but this storage was "
                             f"built for {self.capacity}; resume with the capacity the run started with")
        store.fsync, store.commit_every_s, store.run_dir = self.fsync, self.commit_every_s, self.run_dir
        self.__dict__.update(store.__dict__)

    @classmethod
    def open(cls, path: str | Path, *, in_ram: bool = True, writable: bool = True) -> ZarrStorage:
        """Reopen a store after a clean exit or a crash: its committed rows, writing resumes after them.

        With ``writable`` (what a resume uses), the structural checks run first
        (:func:`~streamrl.replay.store_integrity.check_structure`: metadata, cursor, chunk files, the newest
        block's checksum) and a damaged store is refused with the problem named; leftovers of an interrupted
        write (``*.partial`` files) are removed.
        """
        import zarr

        path = Path(path)
        if not (path / "zarr.json").exists():
            raise StoreError(f"no replay store at {str(path)!r} (no zarr.json)")
        crc32: dict[str, int] = {}
        if writable:
            found = check_structure(path)
            if found.errors:
                more = f" (and {len(found.errors) - 1} more)" if len(found.errors) > 1 else ""
                repair = (f"`streamrl store repair {path}` moves the committed cursor back to the last intact block "
                          "(the rows after it are lost); " if found.repairable else "")
                raise StoreError(f"the replay store at {str(path)!r} is damaged: {found.errors[0]}{more}. "
                                 f"{repair}`streamrl store check {path}` lists every problem")
            crc32 = found.crc32
        group = zarr.open_group(str(path), mode="r+" if writable else "r")
        attrs: dict[str, Any] = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{str(path)!r} is not a streamrl replay store of format {FORMAT!r} (format="
                             f"{attrs.get('format')!r}); a store whose creation was interrupted has none")
        if writable:
            for leftover in path.rglob("*.partial"):
                leftover.unlink()
        store = cls(attrs["capacity"], path=path, block_rows=attrs["block_rows"], in_ram=in_ram)
        store.group = group
        for name in attrs["keys"]:
            array: Any = group[name]
            store.arrays[name] = array.with_config({"write_empty_chunks": True}) if writable else array
            store.layout[name] = (tuple(array.shape[1:]), array.dtype)
        committed = attrs["committed"]
        store.committed_rows = store.total_written = committed["rows"]
        store.first_row = committed["rows"] - committed["size"]
        store.crc32 = crc32
        store.tail = (store.committed_rows, {}, 0)
        if store.ram is not None and len(store):
            store._load_ram()
        return store

    def _load_ram(self) -> None:
        assert self.ram is not None
        rows = np.arange(self.total_written - len(self), self.total_written)
        disk = rows % self.disk_rows
        data = {name: np.asarray(array[:])[disk] for name, array in self.arrays.items()}
        ordered = _tensordict(data, len(rows))
        self.ram.cursor = int(rows[0]) % self.capacity  # so that every row lands on its slot
        self.ram.extend(ordered)
        self.ram.total_written = self.total_written


_OPEN_STORES: weakref.WeakSet[ZarrStorage] = weakref.WeakSet()  # extended and not closed: flushed at exit
_exit_hook = threading.Lock()  # taken by the first store that registers the hook (a set flag after that)


def _flush_at_exit(store: ZarrStorage) -> None:
    """Have ``store`` flushed and committed when the interpreter exits, unless it is closed (or collected) first.

    The hook is registered as a *threading* exit hook, the way ``concurrent.futures`` registers its own: those run
    when the interpreter starts to shut down, before thread pools refuse new work and before zarr stops its I/O
    loop (plain ``atexit`` hooks run after both, when a flush can no longer write). It is registered on the first
    extend, after ``concurrent.futures`` and zarr registered theirs, so it runs first (the hooks run newest first).
    """
    _OPEN_STORES.add(store)
    if _exit_hook.acquire(blocking=False):
        threading._register_atexit(_flush_open_stores)  # type: ignore[attr-defined]


def _flush_open_stores() -> None:
    """Flush and commit the stores still open at exit; a failure is one line on stderr (the exit goes on)."""
    for store in list(_OPEN_STORES):
        if not store.pending_rows or store.write_error is not None:
            continue
        try:
            store._pool = _Inline()  # the pool's threads may not start now: write in this thread
            store.close()
        except Exception as exc:
            print(f"streamrl: the replay store {store.path} was not closed and its flush at exit failed: {exc}",
                  file=sys.stderr)


class _Inline(Executor):
    """An executor that runs each call at once in the calling thread (for the flush at exit)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def _columns(td: TensorDictBase) -> dict[str, torch.Tensor]:
    """Leaves by key path: ``("next", "reward")`` is ``"next/reward"``."""
    return {(key if isinstance(key, str) else "/".join(key)): leaf  # type: ignore[misc]
            for key, leaf in td.items(include_nested=True, leaves_only=True)}


def _tensordict(columns: dict[str, np.ndarray], n: int) -> TensorDict:
    td = TensorDict({}, batch_size=[n])
    for name, column in columns.items():
        td.set(tuple(name.split("/")), torch.from_numpy(column))
    return td


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
