"""A full tiny study through real Ray Tune and MLflow: 2 strategies (one of them defined and
registered right here, as a user would) x 1 seed x 4 members on digits; then the same study
resumed with a larger budget (nothing finished is trained again), and a study whose strategy
asks for a job that crashes its trial."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from nestune.platform.strategy import FINISHED, Strategy, register
from nestune.search_spaces.darts import DARTS_V2
from nestune.search_spaces.genotype import Genotype

pytestmark = pytest.mark.ray

TINY = {"epochs": 1, "C": 4, "layers": 2, "batch_size": 64}
DATA = {"subset": 400}
# Two corruptions at two severities on 100 test (and validation) images: enough to check the
# shift path end to end for the price of a few extra forward passes per member.
SHIFT = {"corruptions": ["gaussian_noise", "jpeg"], "severities": [1, 5], "subset": 100}


@register("test_study_mutants")
@dataclass
class Mutants(Strategy):
    """A user's own strategy: DARTS_V2 first, then mutants of the best member so far."""

    keep_best: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.best: tuple[float, str] | None = None
        self.asked = 0

    def ask(self):
        parent = Genotype.from_json(self.best[1]) if self.best else DARTS_V2
        g = self.space.mutate(parent, self.rng) if self.asked else parent
        self.asked += 1
        return {"kind": "member", "genotype": g.to_json(), "seed": self.asked}

    def tell(self, job, result):
        if not result.get("error"):
            nll = result["metrics"]["val_nll"]
            if self.best is None or nll < self.best[0]:
                self.best = (nll, result["genotype"])

    def state_dict(self):
        return {**super().state_dict(), "best": self.best, "asked": self.asked}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.best, self.asked = state["best"], state["asked"]


@register("test_study_flaky")
@dataclass
class Flaky(Strategy):
    """Its first job names an op that does not exist, so that trial raises; then DARTS_V2."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.asked = 0

    def ask(self):
        self.asked += 1
        if self.asked > 3:
            return FINISHED
        g = DARTS_V2.to_json()
        if self.asked == 1:
            g = g.replace("sep_conv_3x3", "conv_99x99")
        return {"kind": "member", "genotype": g, "seed": self.asked}

    def tell(self, job, result):
        pass


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _study(out: Path, budget: int, **kw):
    from nestune import Study

    kw.setdefault("strategies", ["random", ("test_study_mutants", {"keep_best": True})])
    kw.setdefault("train", TINY)
    kw.setdefault("shift", SHIFT)
    return Study("tiny", data="digits", seeds=[0], budget=budget, ensemble_size=2,
                 data_options=DATA, output_dir=out, verbose=False, **kw)


@pytest.fixture(scope="module")
def base(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "tiny"
    return out, _study(out, 4).run()


def _trainings(out: Path):
    """How many times each job was trained, over every Tune run of the study (a trial's
    checkpoint holds the job it ran as job.json)."""
    from collections import Counter

    return Counter(p.read_text() for p in (out / "ray").glob("*/*/checkpoint_*/job.json"))


def _runs(out: Path, name: str = "tiny"):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    try:
        return mlflow.search_runs(experiment_names=[name])
    finally:
        mlflow.set_tracking_uri(None)


def test_table_curves_and_members(base):
    out, result = base
    table = result.table()
    assert list(table.columns) == [
        "strategy", "seed", "accuracy", "nll", "ece", "brier", "oracle_nll", "disagreement",
        "best_member_accuracy", "avg_member_nll", "members", "device_hours",
    ]
    assert list(table.strategy) == ["random", "test_study_mutants"]
    assert (table.members == 4).all() and (table.device_hours > 0).all()
    assert table[["accuracy", "nll", "ece", "brier", "oracle_nll"]].notna().all().all()
    curves = result.curves
    for _, c in curves.groupby("strategy"):
        assert list(c.members) == [1, 2, 3, 4] and c.device_hours.is_monotonic_increasing
    members = result.members
    assert len(members) == 8 and set(members.kind) == {"member"}
    for path in members.path:
        p = np.load(Path(path) / "test_probs.npy")
        assert p.dtype == np.float16 and p.shape == (len(result.labels("test")), 10)
        assert Path(path).is_relative_to(out / "ray")  # in Ray's storage, as the checkpoint
    assert len(result.labels("val")) == 80
    # Every member also stored its predictions on the corrupted test and validation copies.
    from nestune.platform.shift import load_shifted

    for path in members.path:
        for split in ("test", "val"):
            shifted = load_shifted(path, split)
            assert sorted(shifted) == [("gaussian_noise", 1), ("gaussian_noise", 5), ("jpeg", 1),
                                       ("jpeg", 5)]
            n = 100 if split == "test" else 80
            assert all(p.shape == (n, 10) and p.dtype == np.float16 for p in shifted.values())
    assert (members.shift_seconds > 0).all()
    # The user strategy's first job (seed 1) trained DARTS_V2, as it asked.
    mine = members[(members.strategy == "test_study_mutants") & (members.job_seed == 1)]
    assert len(mine) == 1 and Genotype.from_json(mine.iloc[0].genotype) == DARTS_V2
    # The results folder reads back the same.
    from nestune import StudyResult

    again = StudyResult.load(out)
    assert again.table()[["strategy", "members"]].equals(table[["strategy", "members"]])


def test_mlflow_runs_params_metrics_artifacts(base):
    from mlflow.tracking import MlflowClient

    out, result = base
    runs = _runs(out)
    parents = runs[runs["tags.nestune.role"] == "parent"]
    children = runs[runs["tags.nestune.role"] == "trial"]
    assert len(parents) == 2 and len(children) == 8
    assert set(children["tags.mlflow.parentRunId"]) == set(parents.run_id)
    assert (runs.status == "FINISHED").all()
    p = parents[parents["tags.nestune.strategy"] == "test_study_mutants"].iloc[0]
    assert p["params.hp.keep_best"] == "true" and p["params.data.name"] == "digits"
    assert p["params.budget.members"] == "4" and p["params.train.epochs"] == "1"
    assert Genotype.from_json(children.iloc[0]["params.genotype"])
    assert (children["metrics.device_seconds"] > 0).all() and children["metrics.val_nll"].notna().all()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    history = client.get_metric_history(p.run_id, "nll")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    curve = result.curves[result.curves.strategy == "test_study_mutants"]
    assert [round(m.value, 6) for m in sorted(history, key=lambda m: m.step)] == [
        round(v, 6) for v in curve.nll]
    assert {a.path for a in client.list_artifacts(p.run_id)} >= {"ensemble.json", "ensemble_genotypes.txt"}
    ens = json.loads(Path(client.download_artifacts(p.run_id, "ensemble.json", str(out))).read_text())
    assert len(ens["members"]) == 2 and all(Genotype.from_dict(m["genotype"]) for m in ens["members"])
    child = children.iloc[0].run_id
    assert [a.path for a in client.list_artifacts(child)] == ["genotype.json"]


def test_the_report_scores_the_study_under_shift(base):
    import pandas as pd

    from nestune.platform.report import write_report

    out, _ = base
    text = write_report(out, log_mlflow=False).read_text()
    shift = pd.read_csv(out / "report" / "shift.csv")
    # The study's own ensembles and NES-style selection on the shifted validation split.
    assert set(shift.selection) == {"val", "shifted_val"}
    assert set(shift.strategy) == {"random", "test_study_mutants"}
    assert set(zip(shift.corruption, shift.severity, strict=True)) >= {("gaussian_noise", 5), ("jpeg", 1)}
    assert shift[["nll", "error", "ece"]].notna().all().all()
    assert "![" in text.split("## Dataset shift")[1].split("\n## ")[0]
    assert (out / "report" / "shift.png").stat().st_size > 10_000


def test_resume_trains_only_what_is_new(base):
    out, first = base
    before = {s: set(g.trial_id) for s, g in first.members.groupby("strategy")}
    result = _study(out, 5).run()  # the same study, its budget raised from 4 to 5
    assert list(result.table().members) == [5, 5]
    for s, g in result.members.groupby("strategy"):
        assert before[s] <= set(g.trial_id) and len(set(g.trial_id) - before[s]) == 1
        # The one new trial ran in a second Tune run; the first run's trials were not rerun.
        assert len(list((out / "ray" / f"{s}-s0-r1").glob("*/checkpoint_*"))) == 4
        assert len(list((out / "ray" / f"{s}-s0-r2").glob("*/checkpoint_*"))) == 1
    # The user strategy's state was restored: its 5th job is its 5th ask, not its first.
    new = result.members[~result.members.trial_id.isin(before["test_study_mutants"])
                         & (result.members.strategy == "test_study_mutants")]
    assert list(new.job_seed) == [5]
    assert max(_trainings(out).values()) == 1  # no job was trained twice
    runs = _runs(out)
    assert (runs["tags.nestune.role"] == "parent").sum() == 2  # the parents continued
    assert (runs["tags.nestune.role"] == "trial").sum() == 10
    # Changed training settings would make the stored members a different study: refused.
    with pytest.raises(ValueError, match="train"):
        _study(out, 6, train={**TINY, "epochs": 2}).run()
    # Running it once more with the same budget trains nothing and starts no Tune run.
    third = _study(out, 5).run()
    assert third.members.trial_id.tolist() == result.members.trial_id.tolist()
    assert not (out / "ray" / "random-s0-r3").exists()


def test_a_study_stopped_with_a_trial_in_flight_resumes_without_retraining(
    ray_local, tmp_path, monkeypatch
):
    import signal
    import time

    from nestune.platform import study as study_module
    from nestune.platform.study import StudyInterrupted

    out = tmp_path / "stopped"
    on_entry = study_module._RunRecord._on_entry
    in_flight: list[str] = []
    done_at_stop: list[int] = []

    def stop_once_a_trial_in_flight_has_stored(self, searcher, entry, outputs):
        on_entry(self, searcher, entry, outputs)
        if in_flight or searcher.totals()[0] < 2:
            return
        # Ctrl-C once a trial still in flight has stored its outputs, before the driver hears
        # of them: the case a resume must not train again. The driver loop is held here, so a
        # trial that had not started yet cannot store anything: then try at the next entry.
        live = list(searcher._live)
        deadline = time.monotonic() + 30
        stored: list[str] = []
        while time.monotonic() < deadline and not stored:
            stored = [t for t in live if list((out / "ray").glob(f"*/{t}/checkpoint_*/report.json"))]
            time.sleep(0.2)
        if stored:
            in_flight.extend(stored)
            done_at_stop.append(searcher.totals()[0])
            os.kill(os.getpid(), signal.SIGINT)

    budget = 6
    monkeypatch.setattr(study_module._RunRecord, "_on_entry", stop_once_a_trial_in_flight_has_stored)
    with pytest.raises(StudyInterrupted):
        _study(out, budget, strategies=["random"], shift=None, max_concurrent=2).run()
    assert in_flight, "no trial was in flight with its outputs stored at any entry"
    monkeypatch.setattr(study_module._RunRecord, "_on_entry", on_entry)
    result = _study(out, budget, strategies=["random"], shift=None, max_concurrent=2).run()
    assert list(result.table().members) == [budget] and len(result.curves) == budget
    assert set(result.members.member_id) == set(range(budget))  # the in-flight job, not a new ask
    assert set(in_flight) <= set(result.members.trial_id)  # recorded from the stopped run
    assert max(_trainings(out).values()) == 1 and sum(_trainings(out).values()) == budget
    # The second run trained only what the first had not: its trials include the recovered ones.
    first = len(list((out / "ray" / "random-s0-r1").glob("*/checkpoint_*")))
    second = len(list((out / "ray" / "random-s0-r2").glob("*/checkpoint_*")))
    assert first >= done_at_stop[0] + len(in_flight) and first + second == budget


def test_a_crashed_trial_does_not_lose_the_study(ray_local, tmp_path):
    result = _study(tmp_path / "crashy", 2, strategies=["test_study_flaky"]).run()
    assert list(result.table().members) == [2]
    assert len(result.failures) == 1 and "conv_99x99" in result.failures.iloc[0].error
    runs = _runs(tmp_path / "crashy")
    children = runs[runs["tags.nestune.role"] == "trial"]
    assert sorted(children.status) == ["FAILED", "FINISHED", "FINISHED"]


def test_arguments_are_validated(tmp_path):
    from nestune import Study

    cases = [
        ({"name": "a b"}, "name"),
        ({"data": "mnist3"}, "data"),
        ({"strategies": []}, "strategies"),
        ({"strategies": ["nope"]}, r"strategies\[0\]"),
        ({"strategies": [("random", {"population": 3})]}, r"strategies\[0\]"),
        ({"strategies": ["random", "random"]}, r"strategies\[1\]"),
        ({"seeds": [0, 0]}, "seeds"),
        ({"seeds": ["a"]}, "seeds"),
        ({"budget": 0}, "budget.members"),
        ({"ensemble_size": 0}, "ensemble_size"),
        ({"train": {"epochs": 0}}, "train"),
        ({"train": {"epoch": 1}}, "train"),
        ({"resources": {"cpu": 0}}, "resources.cpu"),
        ({"resources": {"tpu": 1}}, "resources.tpu"),
        ({"resources": {"gpu": 1.5}}, "resources.gpu"),
        ({"resources": {"workers": 0}}, "resources.workers"),
        ({"resources": {"workers": 2, "gpu": 0.5}}, "resources.gpu"),
        ({"data_options": {"val_fraction": 2}}, "data_options.val_fraction"),
        ({"data_options": {"colour": 1}}, "data_options.colour"),
        ({"search": {1: 2}}, "search"),
        ({"search": {"epoch": 2}}, "search.epoch"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"tracking_uri": ""}, "tracking_uri"),
        ({"verbose": "yes"}, "verbose"),
        ({"shift": "yes"}, "shift"),
        ({"shift": {"corruptions": ["fog"]}}, r"shift.corruptions\[0\]"),
        ({"shift": {"severities": [0, 1]}}, "shift.severities"),
        ({"shift": {"subset": 0}}, "shift.subset"),
        ({"shift": {"noise": 1}}, "shift.noise"),
    ]
    for kw, field_name in cases:
        args = {"name": "ok", "output_dir": tmp_path, **kw}
        with pytest.raises(ValueError, match=field_name):
            Study(**args)
    s = Study("ok", strategies=[("random", {}, "rs"), "random"], storage_path="s3://bucket/x",
              output_dir=tmp_path, budget={"device_hours": 0.5})
    assert [x.label for x in s.specs] == ["rs", "random"] and s.storage_path == "s3://bucket/x/ok"
    assert s.tracking_uri.startswith("sqlite:///") or os.environ.get("MLFLOW_TRACKING_URI")


def test_data_parallel_trials_hold_only_a_sliver():
    from nestune.platform.study import _parse_resources, _ray_resources, _trial_cpus

    dp = _parse_resources({"cpu": 2, "workers": 3})
    # The trial coordinates; its Ray Train workers ask for the CPUs themselves.
    assert _ray_resources(dp) == {"cpu": 0.01} and _trial_cpus(dp) == 6.01
    single = _parse_resources({"cpu": 1, "gpu": 0.25})
    assert _ray_resources(single) == {"cpu": 1.0, "gpu": 0.25} and _trial_cpus(single) == 1.0
