"""``streamrl top RUN_DIR``: watch a running pipeline, stage by stage and stream by stream.

The runtime rewrites ``<run_dir>/status.json`` about once a second (:mod:`streamrl.execution.status`); this
module draws it in the terminal with `rich <https://rich.readthedocs.io>`_, refreshed as it changes::

    $ streamrl run pipelines/dqn_cartpole.py --run-dir runs/dqn &
    $ streamrl top runs/dqn
    streamrl top runs/dqn · dqn_cartpole · running · 12.3 s
    frames 24,576 · 2,010 frames/s (1,998 overall) · updates/s 251.0 · policy lag 0.4 · eval return 187.5 ·
    bottleneck learner
     stage     process   busy                          frames/s
     env       collector ██████░░░░░░░░░░░░░░  31 %     2,010
     learner   main      ███████████████████░  96 %
     stream          depth                       items/s
     learner.batch   ████████████████████  4/4      251.0  [backpressure]

Read it like this: the busiest stage is the bottleneck; a full stream (``[backpressure]``) means its consumer
cannot keep up and its producer waits; an empty stream in front of a busy stage means that stage is starved by
what comes before. The view ends by itself once the run has ended (after drawing the final state), or at Ctrl-C.
A finished run's directory shows its final state: ``streamrl top runs/dqn --once`` prints one screen and returns.

From Python (a captured console for tests or notebooks)::

    from rich.console import Console
    from streamrl.top import top
    top("runs/dqn", once=True, console=Console(record=True, width=120))

``rich`` is imported inside the functions, so that ``import streamrl.cli`` stays cheap.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

STATUS_FILE = "status.json"  # the same name as streamrl.execution.status.STATUS_FILE (not imported: it pulls anyio)
STALE_AFTER_S = 10.0  # a running run's status this old: the run may have died (kill -9) or its loop is blocked
BAR_WIDTH = 20


class StatusMissing(FileNotFoundError):
    """``RUN_DIR`` holds no ``status.json``: not a run directory, or a run of a streamrl without ``streamrl top``."""


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """Load ``<run_dir>/status.json``; :class:`StatusMissing` when there is none, saying what to do."""
    path = Path(run_dir) / STATUS_FILE
    try:
        status: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        where = "" if Path(run_dir).is_dir() else " (no such directory)"
        raise StatusMissing(
            f"no {STATUS_FILE} in {str(run_dir)!r}{where}: is it a run directory of streamrl >= 0.1.0, started with "
            "streamrl run? Pass the --run-dir of a run that is going on or has ended (start the run first)"
        ) from None
    return status


def _number(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"


def _bar(fraction: float | None, style: str) -> Any:
    from rich.text import Text

    if fraction is None:
        return Text("·" * BAR_WIDTH, style="dim")
    filled = round(max(0.0, min(1.0, fraction)) * BAR_WIDTH)
    bar = Text("█" * filled, style=style)
    bar.append("░" * (BAR_WIDTH - filled), style="dim")
    return bar


def _header(status: dict[str, Any], run_dir: str | Path) -> Any:
    from rich.text import Text

    state = status.get("state", "?")
    live = state == "running"
    title = Text(f"streamrl top {run_dir} · {status.get('pipeline', '?')} · ", style="bold")
    phase = status.get("phase", state) if live else state
    title.append(str(phase), style="green" if live else "red" if state == "failed" else "cyan")
    if not live and status.get("stop_reason"):
        title.append(f" ({status['stop_reason']})")
    title.append(f" · {_number(status.get('wall_s'))} s")
    age = time.time() - float(status.get("updated_at") or time.time())
    if live and age > STALE_AFTER_S:
        title.append(f"\n[no update for {age:.0f} s: the run may have died or its event loop is blocked]",
                     style="bold red")
    lag = status.get("policy_lag") or {}
    lag_now = lag.get("recent") if lag.get("recent") is not None else lag.get("mean")
    figures = [
        f"frames {status.get('frames', 0):,}",
        f"{_number(status.get('frames_per_s'))} frames/s ({_number(status.get('frames_per_s_overall'))} overall)",
        f"updates/s {_number(status.get('updates_per_s'))}",
        f"policy lag {_number(lag_now, 2)}",
        f"eval return {_number(status.get('eval_return_last'))}",
        f"bottleneck {status.get('bottleneck') or '-'}",
    ]
    line = Text("\n" + " · ".join(figures[:3]) + "\n" + " · ".join(figures[3:]))
    if status.get("error"):
        line.append(f"\nerror: {status['error']}", style="red")
    return title + line


def _stages(status: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column, justify in (("stage", "left"), ("process", "left"), ("busy", "left"), ("", "right"),
                            ("frames/s", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    bottleneck = status.get("bottleneck")
    for name, stage in status.get("stages", {}).items():
        busy = stage.get("busy")
        label = f"{name} ◀" if name == bottleneck else name
        style = "yellow" if name == bottleneck else "green"
        shown = "-" if busy is None else f"{100 * busy:3.0f} %"
        if stage.get("ended") and status.get("state") == "running":
            shown += " done"
        table.add_row(label, stage.get("process", "-"), _bar(busy, style), shown,
                      _number(stage.get("frames_per_s")) if "frames_per_s" in stage else "")
    return table


def _streams(status: dict[str, Any]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column, justify in (("stream", "left"), ("depth", "left"), ("", "right"), ("items/s", "right"),
                            ("producer waits", "right"), ("", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for name, stream in status.get("streams", {}).items():
        depth, capacity = stream.get("depth", 0), stream.get("capacity", 0)
        waits = stream.get("producer_wait")
        pressed = bool(stream.get("backpressure"))
        fraction = depth / capacity if capacity else (waits or 0.0)  # a rendezvous: how long its producer waits
        mark = Text("[backpressure]", style="bold red") if pressed else Text(
            "lossy" if stream.get("lossy") else "", style="dim")
        table.add_row(name, _bar(fraction, "red" if pressed else "blue"), f"{depth}/{capacity}",
                      _number(stream.get("items_per_s")), "-" if waits is None else f"{100 * waits:.0f} %", mark)
    return table


def _replicas(status: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("replica", "frames", "frames/s", "policy lag"):
        table.add_column(column, justify="left" if column == "replica" else "right")
    for name, replica in status.get("replicas", {}).items():
        lag = replica.get("policy_lag") or {}
        table.add_row(name, f"{replica.get('frames', 0):,}", _number(replica.get("frames_per_s")),
                      _number(lag.get("mean"), 2))
    return table


def render(status: dict[str, Any], run_dir: str | Path = "") -> RenderableType:
    """One screen of ``status`` (a loaded ``status.json``): the header, the stages, the streams, the replicas."""
    from rich.console import Group

    parts: list[Any] = [_header(status, run_dir), "", _stages(status)]
    if status.get("streams"):
        parts += ["", _streams(status)]
    if status.get("replicas"):
        parts += ["", _replicas(status)]
    return Group(*parts)


def top(run_dir: str | Path, *, once: bool = False, console: Console | None = None,
        interval: float = 1.0) -> dict[str, Any]:
    """Show ``<run_dir>/status.json`` until the run ends (its ``state`` is no longer ``"running"``) or Ctrl-C.

    ``once``: print one screen and return (a finished run, a test). Returns the last status shown. Raises
    :class:`StatusMissing` when the directory holds no status.
    """
    from rich.console import Console
    from rich.live import Live

    console = console or Console()
    status = read_status(run_dir)
    if once or status.get("state") != "running":
        console.print(render(status, run_dir))
        return status
    try:
        with Live(render(status, run_dir), console=console, refresh_per_second=4, auto_refresh=False) as live:
            while status.get("state") == "running":
                time.sleep(interval)
                try:
                    status = read_status(run_dir)
                except (OSError, ValueError):  # replaced under us, or removed: keep the last screen
                    pass
                live.update(render(status, run_dir), refresh=True)
    except KeyboardInterrupt:
        pass
    return status


def main(args: list[str] | None = None) -> int:
    """``streamrl top RUN_DIR [--once] [--interval S]``: 0 when shown, 2 when there is no status to show."""
    parser = argparse.ArgumentParser(
        prog="streamrl top",
        description="Watch a run: each stage's busy fraction and frames/s, each stream's depth against its "
                    "capacity (full: [backpressure]), policy lag, updates/s, evaluation returns, the bottleneck. "
                    "Reads RUN_DIR/status.json, which streamrl run refreshes about once a second.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (streamrl run --run-dir)")
    parser.add_argument("--once", action="store_true", help="print one screen and exit")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between screens (default 1)")
    options = parser.parse_args(args)
    try:
        top(options.run_dir, once=options.once, interval=options.interval)
    except StatusMissing as exc:
        print(f"streamrl top: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
