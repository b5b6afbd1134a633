"""Collection throughput of collector replicas as worker processes and as Ray actors, in one run.

    python tools/bench_ray.py [--replicas 1 2 4] [--seconds 6] [--chunk 4096 64] [--nodes 2]
    python tools/bench_ray.py --remove-node         # DQN CartPole on a 3-node cluster; a node removed mid-run

For each chunk size and replica count it runs the same collector twice, once placed on ``worker_process`` and once
on ``ray_actor`` (a local Ray instance), and prints both rates and their ratio; then, with ``--nodes N``, the Ray
replicas again on a local multi-node cluster (``ray.cluster_utils.Cluster``: a head without CPUs and N worker
nodes, each with its share of the cores), the replicas spread over the nodes. The collector is
:func:`bench_scale.cartpole_collector`'s (64 native-vector CartPole-v1 envs, a 64-unit MLP greedy policy, one torch
thread per replica): with ``--chunk 64`` a chunk is one step of the 64 envs, the per-chunk cost of a placement
(a round trip per chunk) shows; with 4,096 it is amortized.

Frames/s is measured in the steady state, from the meter's first chunk to the end of the budget (``--seconds`` of
collection at the one-replica worker-process rate, times the replica count), so start-up (Ray's included) is not
counted. The figure depends on the machine: it is printed with ``os.cpu_count()``; run it alone. The last line is
JSON: ``{"cpus": n, "chunk_4096": {"1": {"worker_process": fps, "ray_actor": fps, "ratio": r, "cluster": fps}}}``.

``--remove-node`` runs ``pipelines/dqn_cartpole.py`` with two ``ray_actor`` replicas on a local cluster of three
one-CPU nodes, removes the node of one replica once the learner steps, and reports how long the restart took, the
longest pause of the learner's optimizer steps (``optim_step`` events, every ``report_every`` updates) around it
against their usual interval, and the rows in the store against the frames collected.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale  # noqa: E402 - after the path: bench_scale is a sibling file
import ray  # noqa: E402

from streamrl import run  # noqa: E402


def measure(placement: str, replicas: int, frames: int, chunk: int) -> float:
    return bench_scale.measure(bench_scale.cartpole_collector, replicas, frames, placement, chunk)


def local_cluster(nodes: int, replicas: int) -> Any:
    """A head without CPUs and ``nodes`` worker nodes sharing the cores, with room for ``replicas`` actors."""
    from ray.cluster_utils import Cluster

    cpus = max(-(-(os.cpu_count() or 1) // nodes), -(-replicas // nodes))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus)
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    cluster.wait_for_nodes()
    return cluster


def remove_node(total_frames: int) -> dict[str, Any]:
    import threading
    import time

    import torch
    from ray.cluster_utils import Cluster

    from streamrl.loader import load_module
    from streamrl.replay import ZarrStorage

    path = Path(__file__).resolve().parent.parent / "pipelines" / "dqn_cartpole.py"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    cluster.wait_for_nodes()
    module = load_module(path)
    p = module.build(module.Config(placement="ray_actor", replicas=2, total_frames=total_frames, eval_every=10**9))
    nodes = {n.node_id: n for n in cluster.list_all_nodes()}
    events: dict[str, list[tuple[float, Any]]] = {"worker_started": [], "replica_restarted": [], "optim_step": []}

    async def on_event(event: Any) -> None:
        events[event.kind].append((time.perf_counter(), event.data))
        if (event.kind == "optim_step" and len(events["optim_step"]) == 20 and not events["replica_restarted"]):
            victim = events["worker_started"][0][1]["node_id"]
            events["removed_at"] = [(time.perf_counter(), victim)]  # removed beside the run: the learner goes on
            threading.Thread(target=cluster.remove_node, args=(nodes[victim],), daemon=True).start()

    p.on(("worker_started", "replica_restarted", "optim_step"), on_event)
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            result = run(p, run_dir, handle_signals=False, preload=[(module.__name__, str(path))])
            store = ZarrStorage.open(Path(run_dir) / "replay.zarr")
            rows = len(store)
            ids = store.get(torch.arange(rows))["traj_id"] >> 32 & 0xFF
    finally:
        ray.shutdown()
        cluster.shutdown()
    if "removed_at" not in events:
        raise SystemExit(f"the run made {len(events['optim_step'])} optimizer reports, fewer than 20: raise --frames")
    steps = [t for t, _ in events["optim_step"]]
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    removed_at = events["removed_at"][0][0]
    back_at = events["worker_started"][-1][0]
    around = [b - a for a, b in zip(steps, steps[1:], strict=False) if b >= removed_at and a <= back_at + 1]
    summary = result.summary
    figures = {
        "exit_reason": result.exit_reason, "frames": summary["frames"], "rows_in_store": rows,
        "rows_by_replica_id": {int(i): int((ids == i).sum()) for i in ids.unique()},
        "restarts": {k: v["restarts"] for k, v in summary["replicas"].items()},
        "restart_s": round(back_at - removed_at, 3),
        "restart_gaps_s": {k: v["restart_gaps_s"] for k, v in summary["replicas"].items()},
        "optim_step_interval_median_s": round(sorted(gaps)[len(gaps) // 2], 3),
        "optim_step_longest_pause_during_restart_s": round(max(around, default=0.0), 3),
        "optim_steps": summary.get("optim_steps"),
    }
    print(f"node removed: run {figures['exit_reason']}, restart {figures['restart_s']} s, learner's longest pause "
          f"around it {figures['optim_step_longest_pause_during_restart_s']} s (usual interval "
          f"{figures['optim_step_interval_median_s']} s between reports), {rows} rows in the store for "
          f"{summary['frames']} frames collected", file=sys.stderr)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds of collection at the one-replica rate")
    parser.add_argument("--chunk", type=int, nargs="+", default=[4096, 64], help="frames per chunk (64 envs)")
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes of the local cluster (0: none)")
    parser.add_argument("--remove-node", action="store_true", help="only the node-removal run (see above)")
    parser.add_argument("--frames", type=int, default=20_000, help="--remove-node: the DQN run's frame budget")
    args = parser.parse_args()
    if args.remove_node:
        print(json.dumps(remove_node(args.frames)))
        return
    cpus = os.cpu_count() or 1
    results: dict[str, Any] = {"cpus": cpus}
    print(f"machine: {cpus} CPUs; one torch thread per replica; 64 CartPole envs per replica", file=sys.stderr)
    ray.init(num_cpus=max(cpus, max(args.replicas)), include_dashboard=False, logging_level=logging.WARNING)
    budgets: dict[int, int] = {}
    singles: dict[int, float] = {}
    for chunk in args.chunk:
        one = measure("worker_process", 1, 20 * chunk, chunk)  # a short probe sizes the budgets
        budgets[chunk] = max(20 * chunk, int(one * args.seconds))
        singles[chunk] = measure("worker_process", 1, budgets[chunk], chunk)  # linear: n x this
        rows: dict[str, Any] = {}
        for n in args.replicas:
            fps = {placement: measure(placement, n, budgets[chunk] * n, chunk)
                   for placement in ("worker_process", "ray_actor")}
            ratio = fps["ray_actor"] / fps["worker_process"]
            rows[str(n)] = {**{k: round(v, 1) for k, v in fps.items()}, "ratio": round(ratio, 3)}
            print(f"chunk {chunk:5d}  {n:2d} replicas: worker_process {fps['worker_process']:10,.0f} frames/s   "
                  f"ray_actor {fps['ray_actor']:10,.0f} frames/s   ratio {ratio:.3f}", file=sys.stderr)
        results[f"chunk_{chunk}"] = rows
    ray.shutdown()
    if args.nodes:
        cluster = local_cluster(args.nodes, max(args.replicas))
        try:
            for chunk in args.chunk:
                rows = results[f"chunk_{chunk}"]
                for n in args.replicas:
                    rate = measure("ray_actor", n, budgets[chunk] * n, chunk)
                    one = singles[chunk]
                    rows[str(n)]["cluster"] = round(rate, 1)
                    rows[str(n)]["cluster_efficiency"] = round(rate / (n * one), 3)
                    print(f"chunk {chunk:5d}  {n:2d} replicas on a {args.nodes}-node local cluster: {rate:10,.0f} "
                          f"frames/s   {rate / (n * one):.3f} x linear (one worker process)", file=sys.stderr)
        finally:
            ray.shutdown()
            cluster.shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
