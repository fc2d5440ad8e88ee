"""MLflow tracking against a real ``mlflow server`` (127.0.0.1, SQLite backend, a free port,
its own process group, stopped as a group): a tiny study logs to it through
MLFLOW_TRACKING_URI and the runs are read back with ``mlflow.search_runs``."""

from __future__ import annotations

import json
import os

import pytest

from nestune.platform.tracking import MlflowServer, Tracker, default_tracking_uri, flatten_params

TINY = {"epochs": 1, "C": 4, "layers": 2, "batch_size": 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    srv = MlflowServer(f"sqlite:///{root / 'server.db'}", artifacts_destination=root / "artifacts")
    try:
        srv.wait_ready(timeout=180)
        yield srv
    finally:
        srv.stop()
        assert not srv.alive(), "mlflow server's process group survived stop()"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_flatten_params_and_default_uri(tmp_path, monkeypatch):
    flat = flatten_params({"a": {"b": 1, "c": [1, 2]}, "s": "x" * 7000, "e": {}})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "s": "x" * 6000, "e": "{}"}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert default_tracking_uri(tmp_path) == "http://example:5000"


@pytest.mark.ray
def test_study_logs_to_a_real_mlflow_server(server, ray_local, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from nestune import Study

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    result = Study("served", strategies=["random"], budget=2, ensemble_size=2, train=TINY,
                   data_options={"subset": 300}, output_dir=tmp_path / "served",
                   verbose=False).run()
    assert result.tracking_uri == server.url
    assert not (tmp_path / "served" / "mlflow.db").exists()  # nothing written locally

    mlflow.set_tracking_uri(server.url)
    try:
        runs = mlflow.search_runs(experiment_names=["served"])
    finally:
        mlflow.set_tracking_uri(None)
    parents = runs[runs["tags.nestune.role"] == "parent"]
    children = runs[runs["tags.nestune.role"] == "trial"]
    assert len(parents) == 1 and len(children) == 2
    assert (children["tags.mlflow.parentRunId"] == parents.run_id.iloc[0]).all()
    assert parents["params.strategy"].iloc[0] == "random"
    assert parents["params.budget.members"].iloc[0] == "2"
    assert (children["metrics.device_seconds"] > 0).all()

    client = MlflowClient(server.url)
    parent = parents.run_id.iloc[0]
    assert sorted(m.step for m in client.get_metric_history(parent, "nll")) == [1, 2]
    # Artifacts went through the server (proxied artifact storage), and read back the same.
    child = children.run_id.iloc[0]
    assert client.get_run(child).info.artifact_uri.startswith("mlflow-artifacts:")
    path = client.download_artifacts(child, "genotype.json", str(tmp_path))
    genotype = json.loads(open(path).read())
    assert genotype["normal"] and json.loads(children["params.genotype"].iloc[0]) == genotype
    ens = json.loads(open(client.download_artifacts(parent, "ensemble.json", str(tmp_path))).read())
    assert len(ens["members"]) == 2


def test_tracker_failed_trial_and_resumed_parent(server):
    t = Tracker(server.url, "tracker-unit")
    parent = t.start_parent("s", 0, {"hp": {"x": 1}})
    assert Tracker(server.url, "tracker-unit").start_parent("s", 0, {"hp": {"x": 2}}) == parent
    entry = {"job": {"kind": "member", "genotype": "not json", "seed": 1}, "kind": "member",
             "trial_id": "abc", "ok": False, "error": "Traceback...\nValueError: bad op",
             "metrics": {}, "device_seconds": 0.5}
    child = t.log_trial(parent, entry, label="s", seed=0)
    run = t.client.get_run(child)
    assert run.info.status == "FAILED" and run.data.tags["nestune.error"] == "ValueError: bad op"
    assert run.data.params["genotype"] == "not json" and run.data.metrics["device_seconds"] == 0.5
    t.end_run(parent)
    assert t.client.get_run(parent).info.status == "FINISHED"
