"""An EdgeNES run through a real (tiny) study, read back from MLflow as a user would: the
shared-edges-vs-λ plot among the parent run's artifacts, each member's λ, shared edges and
disagreement with the others, the cost split into DARTS search, hypernetwork search and
members, and an ensemble selected on the validation split."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nestune.edgenes.strategy import exhaustive_select, member_disagreement
from nestune.search_spaces.darts import DartsSpace
from nestune.search_spaces.genotype import Genotype

pytestmark = pytest.mark.ray

SPACE = DartsSpace()
TINY_SEARCH = {"darts_epochs": 1, "darts_C": 4, "darts_layers": 3, "darts_batch_size": 32,
               "search_epochs": 1, "search_C": 4, "search_layers": 3, "search_batch_size": 32,
               "num_samples": 6, "search_options": {"grid_points": 9}}


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    import ray

    from nestune import Study

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path_factory.mktemp("study") / "edgenes"
        result = Study("tiny_edgenes", data="digits", data_options={"subset": 400},
                       strategies=[("edgenes", TINY_SEARCH)], seeds=[0], budget=3, ensemble_size=2,
                       train={"epochs": 1, "C": 4, "layers": 2, "batch_size": 64},
                       output_dir=out, verbose=False).run()
    finally:
        ray.shutdown()
    return out, result


def _runs(out: Path) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    try:
        return mlflow.search_runs(experiment_names=["tiny_edgenes"])
    finally:
        mlflow.set_tracking_uri(None)


def test_mlflow_shows_the_plot_members_lambda_diversity_and_cost_split(study_run) -> None:
    from mlflow.tracking import MlflowClient

    out, result = study_run
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = _runs(out)
    parent = runs[runs["tags.nestune.role"] == "parent"].iloc[0]
    children = runs[runs["tags.nestune.role"] == "trial"]
    members = children[children["tags.nestune.kind"] == "member"]
    assert len(members) == 3 and (members.status == "FINISHED").all()

    # The plot, in the parent run's artifacts.
    arts = {a.path for a in client.list_artifacts(parent.run_id)}
    assert {"shared_edges_vs_lambda.png", "members.csv"} <= arts
    png = Path(client.download_artifacts(parent.run_id, "shared_edges_vs_lambda.png", str(out)))
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # Each member: λ and shared edges (params), disagreement with the others (metrics).
    lam = members["params.lambda"].astype(float)
    shared = members["params.shared_edges"].astype(int)
    assert ((lam >= 0) & (lam <= SPACE.arch_edges)).all()
    searches = children[children["tags.nestune.kind"] == "search"]
    darts = searches[searches["params.method"] == "darts"].iloc[0]
    alpha_star = Genotype.from_json(darts["params.derived_genotype"])
    for genotype, edges in zip(members["params.genotype"], shared, strict=True):
        assert SPACE.common_edges(alpha_star, Genotype.from_json(genotype)) == edges
    assert members["metrics.test_disagreement"].between(0, 1).all()
    assert members["metrics.val_disagreement"].between(0, 1).all()
    assert members["metrics.in_ensemble"].sum() == 2
    # The logged disagreement is the member's mean disagreement with the other members.
    pool = result.members[result.members.kind == "member"].set_index("trial_id")
    order = list(members["tags.nestune.trial_id"])
    test = np.stack([np.load(Path(pool.loc[t, "path"]) / "test_probs.npy") for t in order])
    assert np.allclose(members["metrics.test_disagreement"], member_disagreement(test))
    # The same table, one row per member, in members.csv.
    table = pd.read_csv(io.StringIO(Path(client.download_artifacts(
        parent.run_id, "members.csv", str(out))).read_text()))
    assert set(table.trial_id) == set(order)
    by_trial = table.set_index("trial_id").loc[order]
    assert np.allclose(by_trial["lambda"], lam) and (by_trial["shared_edges"].values == shared.values).all()

    # The cost split: DARTS search, hypernetwork (EdgeNES) search, members; it adds up.
    parts = {k: parent[f"metrics.cost_{k}_seconds"] for k in ("search_darts", "search_edgenes", "members")}
    assert all(v > 0 for v in parts.values()), parts
    assert sum(parts.values()) == pytest.approx(parent["metrics.final_device_hours"] * 3600, rel=1e-6)
    assert sorted(searches["params.method"]) == ["darts", "edgenes"]
    for method in ("darts", "edgenes"):
        row = searches[searches["params.method"] == method].iloc[0]
        assert row["metrics.device_seconds"] == pytest.approx(parts[f"search_{method}"])


def test_the_ensemble_was_selected_on_validation(study_run) -> None:
    out, result = study_run
    runs = _runs(out)
    members = runs[(runs["tags.nestune.role"] == "trial") & (runs["tags.nestune.kind"] == "member")]
    order = list(members["tags.nestune.trial_id"])
    pool = result.members.set_index("trial_id")
    val = np.stack([np.load(Path(pool.loc[t, "path"]) / "val_probs.npy") for t in order]).astype(np.float32)
    best = exhaustive_select(val, result.labels("val"), 2)
    chosen = [t for t, flag in zip(order, members["metrics.in_ensemble"], strict=True) if flag == 1]
    assert sorted(chosen) == sorted(order[i] for i in best)
