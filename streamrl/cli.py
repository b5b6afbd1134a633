"""The command line: ``streamrl run FILE[:build] [--set key=value ...] [--out DIR] [--seed N] [--device D]``.

A pipeline file defines a config dataclass and ``build(cfg) -> Pipeline``::

    streamrl run pipelines/dqn_cartpole.py --seed 1 --set total_frames=50_000
    streamrl run pipelines/dqn_cartpole.py --help-config      # the fields, their defaults and docstrings
    streamrl graph pipelines/dqn_cartpole.py                  # the stages, streams and hooks
    streamrl plot runs/dqn_cartpole                           # learning curves -> runs/dqn_cartpole/curves.png

Exit codes: 0 when the run completed (or stopped because it solved its task), 130 after Ctrl-C (SIGINT), 143
after SIGTERM, 1 when a stage failed, 2 for a usage error.
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

from streamrl.config import apply_overrides, check_required, field_docs
from streamrl.errors import ConfigError, PipelineError, StreamRLError
from streamrl.forkserver import warm_up
from streamrl.loader import load_module


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
    cfg = config_cls()
    check_required(cfg)
    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    cfg = apply_overrides(cfg, overrides)
    run_dir = _run_dir(args.out, path, cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "pipeline": str(path), "build": args.target, "config": dataclasses.asdict(cfg), "overrides": overrides,
        "argv": sys.argv, "python": platform.python_version(), "started": dt.datetime.now().isoformat(),
    }
    (run_dir / "config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    pipeline = build(cfg)
    print(f"streamrl: running {path} -> {run_dir}", file=sys.stderr)
    try:
        result = runtime.run(pipeline, run_dir, seed=cfg.seed, device=cfg.device,
                             preload=[(module_name, str(path.resolve()))])
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
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except (ConfigError, PipelineError) as exc:
        print(f"streamrl: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
