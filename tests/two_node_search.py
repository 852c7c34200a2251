"""Run by tests/test_multinode.py in its own process: a 2-node Ray cluster on this machine (a head and a
second node, separate raylets, ``ray.cluster_utils.Cluster``), a search submitted to it through
``e2e-search run --address``, then the nodes the trials' Train workers ran on (Ray's state API).

    python tests/two_node_search.py SEARCH.yaml OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def main(yml: str, out: str) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Head: 2 CPUs (one trial worker + the trial drivers' slivers); second node: 1 CPU (one trial worker).
    import socket

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    with socket.socket() as sock:  # a free port for this cluster's dashboard (the state API goes through it)
        sock.bind(("127.0.0.1", 0))
        dash = sock.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1", "dashboard_port": dash})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        repo = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": str(repo)}
        proc = subprocess.run([sys.executable, "-m", "e2e_search.cli", "run", yml, "--address", cluster.address],
                              env=env, capture_output=True, text=True, timeout=900)
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        workers = list_actors(address=f"http://127.0.0.1:{dash}", filters=[("class_name", "=", "RayTrainWorker")],
                              detail=True, limit=1000)
        Path(out).write_text(json.dumps({
            "rc": proc.returncode, "output": proc.stdout[-4000:] + proc.stderr[-4000:], "nodes": nodes,
            "worker_nodes": sorted({a.node_id for a in workers}), "workers": len(workers)}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
