"""Collection throughput of collector replicas as worker processes and as Ray actors, in one run.

    python tools/bench_ray.py [--replicas 1 2 4] [--seconds 6] [--chunk 4096 64] [--nodes 2]

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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray  # noqa: E402 - after the path: bench_scale is a sibling file
from bench_scale import Meter, cartpole_collector  # noqa: E402

from streamrl import Pipeline, run  # noqa: E402


def measure(placement: str, replicas: int, frames: int, chunk: int) -> float:
    env, policy, _ = cartpole_collector()
    p = Pipeline("bench_ray")
    c = p.add_collector("collect", env, policy, frames_per_chunk=chunk, replicas=replicas, weights_from=None,
                        placement=placement)  # type: ignore[arg-type]
    meter = Meter("meter", frames)
    p.add(meter)
    p.connect(c.chunks, "meter.chunks", capacity=2 * replicas)
    with tempfile.TemporaryDirectory() as run_dir:
        run(p, run_dir, handle_signals=False, drain_timeout=2.0)
    return meter.fps()


def local_cluster(nodes: int) -> Any:
    from ray.cluster_utils import Cluster

    cpus = max(1, (os.cpu_count() or 1) // nodes)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus)
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds of collection at the one-replica rate")
    parser.add_argument("--chunk", type=int, nargs="+", default=[4096, 64], help="frames per chunk (64 envs)")
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes of the local cluster (0: none)")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    results: dict[str, Any] = {"cpus": cpus}
    print(f"machine: {cpus} CPUs; one torch thread per replica; 64 CartPole envs per replica", file=sys.stderr)
    ray.init(num_cpus=max(cpus, max(args.replicas)), include_dashboard=False, logging_level="WARNING")
    budgets = {}
    for chunk in args.chunk:
        one = measure("worker_process", 1, 20 * chunk, chunk)  # a short probe sizes the budgets
        budgets[chunk] = max(20 * chunk, int(one * args.seconds))
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
        cluster = local_cluster(args.nodes)
        try:
            for chunk in args.chunk:
                rows = results[f"chunk_{chunk}"]
                for n in args.replicas:
                    fps = measure("ray_actor", n, budgets[chunk] * n, chunk)
                    one = rows["1"]["worker_process"]
                    rows[str(n)]["cluster"] = round(fps, 1)
                    rows[str(n)]["cluster_efficiency"] = round(fps / (n * one), 3)
                    print(f"chunk {chunk:5d}  {n:2d} replicas on a {args.nodes}-node local cluster: {fps:10,.0f} "
                          f"frames/s   {fps / (n * one):.3f} x linear (one worker process)", file=sys.stderr)
        finally:
            ray.shutdown()
            cluster.shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
