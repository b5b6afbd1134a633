"""The command line: ``streamrl run FILE[:build] [--set key=value ...] [--out DIR] [--seed N] [--device D]``
and ``streamrl run FILE --resume RUN_DIR`` (continue a stopped or killed run from its checkpoint).

A pipeline file defines a config dataclass and ``build(cfg) -> Pipeline``::

    streamrl run pipelines/dqn_cartpole.py --seed 1 --set total_frames=50_000
    streamrl run pipelines/dqn_cartpole.py --help-config      # the fields, their defaults and docstrings
    streamrl graph pipelines/dqn_cartpole.py                  # the stages, streams and hooks
    streamrl plot runs/dqn_cartpole                           # learning curves -> runs/dqn_cartpole/curves.png
    streamrl store inspect runs/dqn_cartpole/replay.zarr      # a replay store: also check, sample, export, import, plot
    streamrl run pipelines/dqn_cartpole.py --resume runs/dqn_cartpole/20261122-101500-seed0   # after a crash
    streamrl run pipelines/dqn_cartpole.py --out runs/x --overwrite   # start runs/x afresh: its old run is removed
    streamrl run pipelines/dqn_cartpole.py --set placement=ray_actor --set replicas=8 --ray-address HOST:6379

A run directory has one owner: ``streamrl run`` locks it (``<run dir>/.lock``, which holds the pid; the kernel
releases the lock when the process ends, ``kill -9`` included) for the whole run, and a second run on the same
directory exits with 2 naming the first one's pid. A directory that already holds a run (a config.json,
checkpoint, metrics or replay store) is never overwritten: continue it with ``--resume DIR``, give a new ``--out``,
or pass ``--overwrite``, which removes the old run's files (its store included) once the new pipeline is built.
``--resume`` of a run killed before its first checkpoint starts it over: the old store is removed, metrics and
events go on appending.

Bad input stops before anything runs, with exit 2 and a message naming the field and value and what is allowed,
or the pipeline file and line that failed (to import, or in ``build()``); ``--debug`` adds the traceback.

Exit codes: 0 when the run completed (or stopped because it solved its task); 1 when a stage failed, the disk of
the run directory filled up (``disk full writing PATH``), or ``store check`` found a problem; 2 for a usage or
config error (a bad value, also one a stage finds as it starts; a pipeline file that fails to import or build; a
run directory in use or already holding a run; a path that is not a replay store); 130 after Ctrl-C (SIGINT),
during start-up too; 143 after SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import inspect
import json
import os
import platform
import select
import signal
import sys
import threading
import traceback
import typing
from pathlib import Path
from types import FrameType
from typing import Any

from streamrl.config import apply_overrides, config_from_record, field_docs, make_config, validate_config
from streamrl.errors import (
    ConfigError,
    DiskFull,
    PipelineError,
    RunDirError,
    StageFailed,
    StoreError,
    StreamRLError,
)
from streamrl.forkserver import warm_up
from streamrl.loader import call_build, check_file, load_module
from streamrl.rundir import RunDirLock, has_checkpoint, remove_run_files, resume_advice, run_files

# Only light modules above (no torch, numpy or tensordict): a usage error or ``--help`` answers at once, and a Ctrl-C
# while torch loads (in cmd_run) reaches main()'s handler instead of printing a traceback from an import.


def _load(target: str) -> tuple[Any, type, str, Path]:
    path_text, _, func_name = target.partition(":")
    func_name = func_name or "build"
    path = Path(path_text)
    module = load_module(path)
    build = getattr(module, func_name, None)
    if build is None or not callable(build):
        raise ConfigError(f"{path_text} has no function {func_name!r}; define "
                          f"`def {func_name}(cfg: Config) -> Pipeline`"
                          f" or name the function with {path_text}:<function>")
    params = list(inspect.signature(build).parameters)
    try:
        hints = typing.get_type_hints(build)
    except Exception as exc:
        raise ConfigError(f"{path_text}:{func_name}: its annotations cannot be resolved ({type(exc).__name__}: "
                          f"{exc}); annotate the config argument with a dataclass defined or imported there") from exc
    if not params or params[0] not in hints or not dataclasses.is_dataclass(hints[params[0]]):
        raise ConfigError(f"{path_text}:{func_name} must take one argument annotated with a config dataclass, "
                          f"e.g. `def {func_name}(cfg: Config) -> Pipeline`")
    return build, hints[params[0]], module.__name__, path


def _config_help(config_cls: type) -> str:
    docs = field_docs(config_cls)
    lines = [f"{config_cls.__name__} fields (set with --set key=value):"]
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "<required>")
        lines.append(f"  {f.name} = {default!r}")
        if f.name in docs:
            lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)


def _run_dir(out: str | None, path: Path, seed: int) -> Path:
    if out:
        return Path(out)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / path.stem / f"{stamp}-seed{seed}"


def cmd_run(args: argparse.Namespace) -> int:
    check_file(args.target.partition(":")[0])  # a mistyped path is refused before anything heavy is imported
    if args.help_config:  # no fork server, no runtime: only the pipeline file's own imports
        print(_config_help(_load(args.target)[1]))
        return 0
    # The fork server starts before the run-directory lock is taken, so the workers it forks never hold the lock.
    # It starts with SIGINT ignored, which it keeps across exec: a Ctrl-C at the terminal reaches the whole process
    # group, and would print a traceback from the middle of its imports (it ignores SIGINT once they are done, and
    # its workers do: the main process decides how to stop). A Ctrl-C in these few milliseconds is lost.
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if _on_main_thread() else None
    try:
        warm_up()
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
    import streamrl.execution.main as runtime
    from streamrl.resume import restore
    from streamrl.summary import write_json

    build, config_cls, module_name, path = _load(args.target)
    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    started = {"argv": sys.argv, "python": platform.python_version(), "started": dt.datetime.now().isoformat()}
    if args.resume:
        if args.out or args.overwrite:
            extra = "--out" if args.out else "--overwrite"
            raise ConfigError(f"--resume RUN_DIR continues the run in RUN_DIR: drop {extra}")
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file():
            raise RunDirError(f"cannot resume {str(run_dir)!r}: it has no config.json (is it a run directory?)")
    else:
        cfg = make_config(config_cls, overrides)
        validate_config(cfg)
        run_dir = _run_dir(args.out, path, cfg.seed)
    with RunDirLock(run_dir):
        checkpoint = None
        if args.resume:
            cfg, record, checkpoint = _resume_record(run_dir, config_cls, overrides, started)
        else:
            _refuse_to_overwrite(run_dir, args.overwrite)
            record = {"pipeline": str(path), "build": args.target, "config": dataclasses.asdict(cfg),
                      "overrides": overrides, **started}
        pipeline = call_build(build, cfg, path)
        pipeline.validate()
        if checkpoint is not None:
            restore(pipeline, checkpoint)
            print(f"streamrl: resuming {run_dir} at frame {checkpoint['frames']}", file=sys.stderr)
            if checkpoint["fallback"]:
                print(f"streamrl: warning: resuming from {checkpoint['loaded_from']}, the previous checkpoint: "
                      f"{checkpoint['fallback']}", file=sys.stderr)
        elif args.resume:
            remove_run_files(run_dir, keep=("config.json", "metrics.csv", "events.jsonl"))
            print(f"streamrl: no checkpoint yet in {run_dir}: starting the run over (its replay store removed; "
                  "metrics and events go on appending)", file=sys.stderr)
        elif args.overwrite and (removed := remove_run_files(run_dir)):
            print(f"streamrl: --overwrite: removed {', '.join(p.name for p in removed)} from {run_dir}",
                  file=sys.stderr)
        write_json(run_dir / "config.json", record,
                   advice=resume_advice(run_dir) if args.resume else "free space and run again")
        print(f"streamrl: running {path} -> {run_dir}", file=sys.stderr)
        try:
            result = runtime.run(pipeline, run_dir, seed=cfg.seed, device=cfg.device,
                                 preload=[(module_name, str(path.resolve()))], resume=checkpoint,
                                 exit_after_second_signal=runtime.EXIT_AFTER_SECOND_SIGNAL_S,
                                 deterministic=args.deterministic, ray_address=args.ray_address)
        except StreamRLError as exc:
            _report(exc, args.debug)
            if (run_dir / "summary.json").exists():
                print(f"streamrl: summary in {run_dir / 'summary.json'}", file=sys.stderr)
            return 2 if isinstance(exc, StageFailed) and isinstance(exc.error, ConfigError) else 1
    s = result.summary
    print(
        f"streamrl: {result.exit_reason} ({s['stop_reason'] or 'budget'}): frames={s['frames']} wall_s={s['wall_s']} "
        f"frames_per_s={s['frames_per_s']} eval_return_last={s['eval_return_last']} solved={s['solved']} "
        f"bottleneck={s['stages']['bottleneck']}",
        file=sys.stderr,
    )
    return result.exit_code


def _resume_record(run_dir: Path, config_cls: type, overrides: list[str],
                   started: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """The config, the updated config.json record and the checkpoint (None: killed before its first one)."""
    try:
        record = json.loads((run_dir / "config.json").read_text())
        values = record["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"cannot resume {str(run_dir)!r}: its config.json is damaged ({type(exc).__name__}: "
                          f"{exc}); restore it from a copy, or start a new run with --out") from None
    cfg = apply_overrides(config_from_record(config_cls, values), overrides)
    validate_config(cfg)
    record["config"] = dataclasses.asdict(cfg)
    if not has_checkpoint(run_dir):
        record.setdefault("restarts", []).append({**started, "overrides": overrides})
        return cfg, record, None
    from streamrl.resume import load_checkpoint

    checkpoint = load_checkpoint(run_dir)
    record.setdefault("resumes", []).append({**started, "overrides": overrides, "frames": checkpoint["frames"]})
    return cfg, record, checkpoint


def _refuse_to_overwrite(run_dir: Path, overwrite: bool) -> None:
    """A fresh run never writes over another run's files unless ``--overwrite`` says so."""
    existing = run_files(run_dir)
    if existing and not overwrite:
        raise RunDirError(
            f"{str(run_dir)!r} already holds a run ({', '.join(p.name for p in existing)}); use --resume "
            f"{run_dir} to continue it, or a new --out, or --overwrite to remove it and start afresh"
        )


def _report(exc: BaseException, debug: bool) -> None:
    """One line on stderr; the traceback (with its causes) only with ``--debug``."""
    if debug:
        traceback.print_exception(exc)
    hint = "" if debug or exc.__cause__ is None else " (--debug shows the traceback)"
    print(f"streamrl: error: {exc}{hint}", file=sys.stderr)


def cmd_graph(args: argparse.Namespace) -> int:
    build, config_cls, _module, path = _load(args.target)
    cfg = make_config(config_cls, list(args.set or []))
    validate_config(cfg)
    pipeline = call_build(build, cfg, path)
    pipeline.validate()
    print(pipeline.describe())
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from streamrl.plots import plot_run, plot_runs

    if len(args.run_dirs) == 1 and not args.scalar:
        print(plot_run(args.run_dirs[0], args.out))
    else:  # several runs (seeds of one pipeline: mean and spread), or scalars by name
        print(plot_runs(args.run_dirs, scalars=tuple(args.scalar or ("eval/return",)), out=args.out))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from streamrl.top import main as top

    return top([args.run_dir, *(["--once"] if args.once else [])])


STORE_HELP = """Look into a replay store (a zarr group written by ZarrStorage); only repair modifies a store.

    streamrl store inspect runs/dqn/replay.zarr              # keys, shapes, codecs, sizes, rows, episode statistics
    streamrl store check runs/dqn/replay.zarr                # each problem with its key and rows; exit 1 if any
    streamrl store repair runs/dqn/replay.zarr               # committed cursor back to the last intact block
    streamrl store sample runs/dqn/replay.zarr -n 5 --seed 0 # random committed rows
    streamrl store export runs/dqn/replay.zarr --to rows.npz # committed rows oldest -> newest, plus the attrs
    streamrl store import rows.npz --to copy.zarr [--capacity N] [--block-rows B]
    streamrl store plot runs/dqn/replay.zarr [--out store.png]  # returns, lengths, reward over time
"""


def _size(n: int) -> str:
    """Bytes in binary units: ``_size(123456) == "120.6 KiB"``."""
    exponent = min(max(0, (n.bit_length() - 1) // 10), 4)
    return f"{n} B" if exponent == 0 else f"{n / 1024 ** exponent:.1f} {('KiB', 'MiB', 'GiB', 'TiB')[exponent - 1]}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _statistics(stats: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.4g}" for name, value in stats.items()) or "-"


def cmd_store_inspect(args: argparse.Namespace) -> int:
    from streamrl.replay.store_tools import inspect_store

    info = inspect_store(args.path)
    lines = [
        f"store      {info['path']}  ({info['format']})",
        f"capacity   {info['capacity']} rows in blocks of {info['block_rows']} ({info['disk_rows']} disk slots)",
        f"committed  {info['rows_written']} rows written, {info['rows_held']} held"
        + (f" (rows {info['oldest_row']}..{info['rows_written'] - 1})" if info["rows_held"] else ""),
        f"on disk    {_size(info['bytes_on_disk'])}",
        "",
        _table([["key", "shape", "dtype", "chunks", "codec", "on disk"]]
               + [[k["key"], str(tuple(k["shape"])), k["dtype"], str(tuple(k["chunks"])), k["codec"],
                   _size(k["bytes_on_disk"])] for k in info["keys"]]),
        "",
    ]
    episodes = info["episodes"]
    if episodes is None:
        lines.append("episodes   - (needs keys traj_id, step_count, next/done, next/reward)")
    else:
        lines += [f"episodes   {episodes['complete']} complete, {episodes['incomplete']} incomplete "
                  "(cut by the ring or still running)",
                  f"return     {_statistics(episodes['return'])}",
                  f"length     {_statistics(episodes['length'])}"]
    print("\n".join(lines))
    return 0


def cmd_store_check(args: argparse.Namespace) -> int:
    from streamrl.replay.store_tools import check_store, check_structure

    problems = check_store(args.path)
    for problem in problems:
        print(problem)
    errors = sum(not p.warning for p in problems)
    print(f"{args.path}: {errors} error(s), {len(problems) - errors} warning(s)" if problems
          else f"{args.path}: ok")
    structure = check_structure(args.path)
    if structure.errors and structure.repairable:  # damage that moving the committed cursor back undoes
        print(f"`streamrl store repair {args.path}` moves the committed cursor back to the last intact block")
    return 1 if errors else 0


def cmd_store_repair(args: argparse.Namespace) -> int:
    from streamrl.replay.store_tools import repair_store

    print(repair_store(args.path))
    return 0


def cmd_store_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from streamrl.replay.store_tools import sample_store

    rows, columns = sample_store(args.path, args.n, seed=args.seed)
    width = max(map(len, columns))
    for i, row in enumerate(rows):
        print(f"row {row}")
        for key, column in columns.items():
            text = np.array2string(column[i], precision=4, threshold=16, edgeitems=3, max_line_width=100)
            print(f"  {key.ljust(width)}  {text.replace(chr(10), chr(10) + ' ' * (width + 4))}")
    return 0


def cmd_store_export(args: argparse.Namespace) -> int:
    from streamrl.replay.store_tools import export_store

    print(export_store(args.path, args.to))
    return 0


def cmd_store_import(args: argparse.Namespace) -> int:
    from streamrl.replay.store_tools import import_store

    storage = import_store(args.npz, args.to, capacity=args.capacity, block_rows=args.block_rows)
    print(f"{storage.path}: {storage.total_written} rows written, {len(storage)} held "
          f"(capacity {storage.capacity}, blocks of {storage.block_rows})")
    return 0


def cmd_store_plot(args: argparse.Namespace) -> int:
    from streamrl.replay.store_tools import plot_store

    print(plot_store(args.path, args.out))
    return 0


def _add_store_parser(sub: Any) -> None:
    store = sub.add_parser("store", help="inspect, check, repair, sample, export, import or plot a replay store",
                           description=STORE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = store.add_subparsers(dest="store_command", required=True)
    inspect_ = commands.add_parser("inspect", help="keys, shapes, dtypes, chunks, codecs, sizes, rows, episodes")
    inspect_.add_argument("path", help="the store directory (e.g. runs/<run>/replay.zarr)")
    inspect_.set_defaults(func=cmd_store_inspect)
    check = commands.add_parser("check", help="committed cursor vs data, NaN/inf, episode structure; exit 1 on "
                                              "a problem")
    check.add_argument("path")
    check.set_defaults(func=cmd_store_check)
    repair = commands.add_parser("repair", help="move the committed cursor back to the last intact block (rows "
                                                "after it are dropped); an intact store is left as it is")
    repair.add_argument("path")
    repair.set_defaults(func=cmd_store_repair)
    sample = commands.add_parser("sample", help="print random committed rows")
    sample.add_argument("path")
    sample.add_argument("-n", type=int, default=5, help="rows to print (default 5)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sample.set_defaults(func=cmd_store_sample)
    export = commands.add_parser("export", help="committed rows (oldest first) and attrs into an .npz")
    export.add_argument("path")
    export.add_argument("--to", required=True, help="the .npz file to write")
    export.set_defaults(func=cmd_store_export)
    import_ = commands.add_parser("import", help="an .npz (from export) into a new store")
    import_.add_argument("npz")
    import_.add_argument("--to", required=True, help="the new store's directory (must not exist)")
    import_.add_argument("--capacity", type=int, help="rows the new store holds (default: the exported store's)")
    import_.add_argument("--block-rows", type=int, help="rows per chunk file (default: the exported store's)")
    import_.set_defaults(func=cmd_store_import)
    plot = commands.add_parser("plot", help="episode return and length histograms, reward over time, as a PNG")
    plot.add_argument("path")
    plot.add_argument("--out", help="PNG path (default: next to the store, replay.zarr -> replay.png)")
    plot.set_defaults(func=cmd_store_plot)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrl", description="Reinforcement learning as a streaming dataflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline file", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("target", help="pipeline file, optionally :function (default :build)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    run.add_argument("--out", help="run directory (default runs/<pipeline>/<time>-seed<seed>)")
    run.add_argument("--seed", type=int, help="shorthand for --set seed=N")
    run.add_argument("--device", help="shorthand for --set device=D (cpu, cuda, auto)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    run.add_argument("--overwrite", action="store_true",
                     help="the --out directory may hold an old run: remove its files (replay store included) first")
    run.add_argument("--debug", action="store_true", help="print the traceback of an error")
    run.add_argument("--help-config", action="store_true", help="list the config fields and exit")
    run.add_argument("--deterministic", action="store_true",
                     help="one process, a fixed schedule, fixed seeds: two runs write the same metrics.csv (CPU)")
    run.add_argument("--ray-address", metavar="ADDR",
                     help="the Ray cluster that placement=ray_actor groups join (default: RAY_ADDRESS, else a local "
                          "Ray instance started for the run)")
    run.set_defaults(func=cmd_run)
    graph = sub.add_parser("graph", help="print a pipeline's stages, streams and hooks")
    graph.add_argument("target")
    graph.add_argument("--set", action="append", metavar="KEY=VALUE")
    graph.add_argument("--debug", action="store_true", help="print the traceback of an error")
    graph.set_defaults(func=cmd_graph)
    plot = sub.add_parser("plot", help="draw learning curves into a PNG: one run's, or several runs' (seeds of one "
                          "pipeline as mean and spread) for any scalar by name")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--scalar", action="append", metavar="NAME",
                      help="a scalar of scalars.csv (e.g. eval/return, train/loss; repeatable)")
    plot.add_argument("--out", help="PNG path (default <run_dir>/curves.png)")
    plot.set_defaults(func=cmd_plot)
    top = sub.add_parser("top", help="a live view of a run: stages, streams, backpressure, lag, updates/s")
    top.add_argument("run_dir")
    top.add_argument("--once", action="store_true", help="print one screen and exit")
    top.set_defaults(func=cmd_top)
    _add_store_parser(sub)
    return parser


def shadowing_folder() -> str | None:
    """The folder that hides the streamrl package, if ``streamrl`` was imported as a bare folder instead.

    ``python -m streamrl.cli`` puts the current folder first on ``sys.path``; with an editable install, a folder
    named ``streamrl`` there (a clone's parent holds one) becomes a namespace package that hides the real one,
    and ``from streamrl import MLP`` fails with "unknown location". The ``streamrl`` command is not affected.
    """
    package = sys.modules.get("streamrl")
    if package is None or getattr(package, "__file__", None) is not None:
        return None
    return ", ".join(getattr(package, "__path__", [])) or "?"


INTERRUPTED = "streamrl: interrupted (Ctrl-C)\n"


def main(argv: list[str] | None = None) -> None:
    """The ``streamrl`` command: exit 0 done, 1 failed, 2 usage or config error, 130 Ctrl-C, 141 closed pipe.

    Output piped into a reader that stops early (``streamrl run FILE --help-config | head``) ends the command
    quietly, as ``cat`` does when it gets SIGPIPE: no traceback, exit 141 (128 + SIGPIPE).
    """
    previous = _handle_start_up_interrupts()
    try:
        try:
            code = _main(argv)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            sys.stdout.flush()  # here rather than at exit, so that a closed pipe is caught below
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe (a worker's, say): not ours to silence
        # Interpreter shutdown flushes stdout again: point it at devnull so that flush has nowhere to fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        code = 128 + signal.SIGPIPE
    sys.exit(code)


def _handle_start_up_interrupts() -> Any:
    """Install :func:`_interrupted` for SIGINT (the run installs its own while it runs); return the handler it
    replaces, or None where it leaves things alone: off the main thread, or a handler other than Python's default
    (SIGINT ignored, as in a background job, or an embedding program's own)."""
    if not _on_main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return None
    signal.signal(signal.SIGINT, _interrupted)
    return previous


def _on_main_thread() -> bool:
    """Signal handlers can be set there only."""
    return threading.current_thread() is threading.main_thread()


def _interrupted(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C before the run's own signal handling: a KeyboardInterrupt (main() reports it), but inside an import,
    the end of the process at once, with the same line and exit 130.

    A KeyboardInterrupt raised while torch or numpy is being imported leaves half-initialised modules behind, and
    what follows cannot be relied on: an ImportError or a RecursionError in its place, the interrupt swallowed
    (the process goes on), or a crash at exit. Nothing of the run exists yet, so there is nothing to clean up.
    """
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            os.write(2, INTERRUPTED.encode())
            os._exit(130)
        frame = frame.f_back
    raise KeyboardInterrupt


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _fd, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() on this platform, or stdout has no descriptor
        return True


def _main(argv: list[str] | None) -> int:
    if folder := shadowing_folder():
        print(f"streamrl: error: the folder {folder} hides the streamrl package (python -m puts the current folder "
              "first on the import path); run the `streamrl` command instead, or run python -m from another folder",
              file=sys.stderr)
        return 2
    parser = make_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        code: int = args.func(args)
    except (ConfigError, PipelineError, StoreError) as exc:
        _report(exc, debug)
        code = 2
    except DiskFull as exc:
        _report(exc, debug)
        code = 1
    except KeyboardInterrupt:  # Ctrl-C before the run's own signal handling started (torch loading, imports, build())
        print(INTERRUPTED, end="", file=sys.stderr)
        code = 130
    return code


if __name__ == "__main__":
    main()
