"""A study on a simulated two-node Ray cluster (``ray.cluster_utils.Cluster``: a head and one
worker node, one CPU each). Trials land on both nodes (each trial reports its node id), and
their outputs come back to the driver through the shared ``storage_path``. The cluster outlives
the study, as a user's would: the study must leave no placement group or CPU held on it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.ray

TINY = {"epochs": 1, "C": 4, "layers": 2, "batch_size": 64}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def test_study_spreads_over_two_nodes(cluster, tmp_path):
    import ray

    from nestune import Study

    shared = tmp_path / "shared"  # stands for NFS or a bucket every node sees
    study = Study("cluster", strategies=["random"], budget=4, ensemble_size=2, train=TINY,
                  data_options={"subset": 300}, output_dir=tmp_path / "driver",
                  storage_path=shared, ray_address=cluster.address, verbose=False)
    result = study.run()
    assert ray.is_initialized() is False  # the study attached, and detached at the end

    members = result.members
    assert len(members) == 4 and list(result.table().members) == [4]
    alive = {n.node_id for n in cluster.list_all_nodes()}
    assert set(members.node_id) == alive and len(alive) == 2
    for path in members.path:
        assert Path(path).is_relative_to(shared / "cluster")
        assert np.load(Path(path) / "val_probs.npy").dtype == np.float16

    # A placement group Tune left behind would hold a CPU of the user's cluster for good.
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        deadline = time.monotonic() + 30
        while True:
            groups = ray.util.placement_group_table()
            held = {g["placement_group_id"]: g["state"] for g in groups.values()
                    if g["state"] != "REMOVED"}
            free = ray.available_resources().get("CPU", 0.0)
            if (not held and free == 2.0) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not held, f"placement groups left on the cluster: {held}"
        assert free == 2.0, ray.available_resources()
    finally:
        ray.shutdown()
