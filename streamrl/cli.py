"""The command line: ``streamrl run FILE[:build] [--set key=value ...] [--out DIR] [--seed N] [--device D]``
and ``streamrl run FILE --resume RUN_DIR`` (continue a stopped or killed run from its checkpoint).

A pipeline file defines a config dataclass and ``build(cfg) -> Pipeline``::

    streamrl run pipelines/dqn_cartpole.py --seed 1 --set total_frames=50_000
    streamrl run pipelines/dqn_cartpole.py --help-config      # the fields, their defaults and docstrings
    streamrl graph pipelines/dqn_cartpole.py                  # the stages, streams and hooks
    streamrl plot runs/dqn_cartpole                           # learning curves -> runs/dqn_cartpole/curves.png
    streamrl store inspect runs/dqn_cartpole/replay.zarr      # a replay store: also check, sample, export, import, plot
    streamrl run pipelines/dqn_cartpole.py --resume runs/dqn_cartpole/20261122-101500-seed0   # after a crash

Exit codes: 0 when the run completed (or stopped because it solved its task), 130 after Ctrl-C (SIGINT), 143
after SIGTERM, 1 when a stage failed (or ``store check`` found a problem), 2 for a usage error (or a path that is
not a replay store).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import inspect
import json
import platform
import sys
import typing
from pathlib import Path
from typing import Any

from streamrl.config import apply_overrides, check_required, config_from_record, field_docs
from streamrl.errors import ConfigError, PipelineError, StoreError, StreamRLError
from streamrl.forkserver import warm_up
from streamrl.loader import load_module
from streamrl.resume import load_checkpoint, restore


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
    hints = typing.get_type_hints(build)
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
    warm_up()  # worker processes import torch & co. now, while this process does the same
    import streamrl.runtime as runtime

    build, config_cls, module_name, path = _load(args.target)
    if args.help_config:
        print(_config_help(config_cls))
        return 0
    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    started = {"argv": sys.argv, "python": platform.python_version(), "started": dt.datetime.now().isoformat()}
    checkpoint = None
    if args.resume:
        if args.out:
            raise ConfigError("--resume RUN_DIR continues in RUN_DIR: drop --out")
        run_dir = Path(args.resume)
        record = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else None
        if record is None:
            raise ConfigError(f"cannot resume {str(run_dir)!r}: it has no config.json (is it a run directory?)")
        checkpoint = load_checkpoint(run_dir)
        cfg = apply_overrides(config_from_record(config_cls, record["config"]), overrides)
        record["config"] = dataclasses.asdict(cfg)
        record.setdefault("resumes", []).append({**started, "overrides": overrides, "frames": checkpoint["frames"]})
    else:
        cfg = apply_overrides(config_cls(), overrides)
        run_dir = _run_dir(args.out, path, cfg.seed)
        record = {"pipeline": str(path), "build": args.target, "config": dataclasses.asdict(cfg),
                  "overrides": overrides, **started}
    check_required(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    pipeline = build(cfg)
    if checkpoint is not None:
        restore(pipeline, checkpoint)
        print(f"streamrl: resuming {run_dir} at frame {checkpoint['frames']}", file=sys.stderr)
    print(f"streamrl: running {path} -> {run_dir}", file=sys.stderr)
    try:
        result = runtime.run(pipeline, run_dir, seed=cfg.seed, device=cfg.device,
                             preload=[(module_name, str(path.resolve()))], resume=checkpoint)
    except StreamRLError as exc:
        print(f"streamrl: error: {exc}", file=sys.stderr)
        print(f"streamrl: summary in {run_dir / 'summary.json'}", file=sys.stderr)
        return 1
    s = result.summary
    print(
        f"streamrl: {result.exit_reason} ({s['stop_reason'] or 'budget'}): frames={s['frames']} wall_s={s['wall_s']} "
        f"frames_per_s={s['frames_per_s']} eval_return_last={s['eval_return_last']} solved={s['solved']} "
        f"bottleneck={s['stages']['bottleneck']}",
        file=sys.stderr,
    )
    return result.exit_code


def cmd_graph(args: argparse.Namespace) -> int:
    build, config_cls, _module, _path = _load(args.target)
    cfg = apply_overrides(config_cls(), list(args.set or []))
    pipeline = build(cfg)
    pipeline.validate()
    print(pipeline.describe())
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from streamrl.plots import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


STORE_HELP = """Look into a replay store (a zarr group written by ZarrStorage); none of these modifies a store.

    streamrl store inspect runs/dqn/replay.zarr              # keys, shapes, codecs, sizes, rows, episode statistics
    streamrl store check runs/dqn/replay.zarr                # each problem with its key and rows; exit 1 if any
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
    from streamrl.replay.store_tools import check_store

    problems = check_store(args.path)
    for problem in problems:
        print(problem)
    errors = sum(not p.warning for p in problems)
    print(f"{args.path}: {errors} error(s), {len(problems) - errors} warning(s)" if problems
          else f"{args.path}: ok")
    return 1 if errors else 0


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
    store = sub.add_parser("store", help="inspect, check, sample, export, import or plot a replay store",
                           description=STORE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = store.add_subparsers(dest="store_command", required=True)
    inspect_ = commands.add_parser("inspect", help="keys, shapes, dtypes, chunks, codecs, sizes, rows, episodes")
    inspect_.add_argument("path", help="the store directory (e.g. runs/<run>/replay.zarr)")
    inspect_.set_defaults(func=cmd_store_inspect)
    check = commands.add_parser("check", help="committed cursor vs data, NaN/inf, episode structure; exit 1 on "
                                              "a problem")
    check.add_argument("path")
    check.set_defaults(func=cmd_store_check)
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
    run.add_argument("--help-config", action="store_true", help="list the config fields and exit")
    run.set_defaults(func=cmd_run)
    graph = sub.add_parser("graph", help="print a pipeline's stages, streams and hooks")
    graph.add_argument("target")
    graph.add_argument("--set", action="append", metavar="KEY=VALUE")
    graph.set_defaults(func=cmd_graph)
    plot = sub.add_parser("plot", help="draw a run's learning curves (metrics.csv) into a PNG")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="PNG path (default <run_dir>/curves.png)")
    plot.set_defaults(func=cmd_plot)
    _add_store_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except (ConfigError, PipelineError, StoreError) as exc:
        print(f"streamrl: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
