"""The report on a synthetic finished study: an output folder laid out as Study.run leaves it
(results/*.csv, labels, members' stored probabilities, an EdgeNES search.json), read back by
StudyResult.load. No Ray, no training."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nestune import forward_select
from nestune.platform import metrics as M
from nestune.platform import shift as SH
from nestune.platform.report import REPORT_TAG, write_report
from nestune.search_spaces.darts import DartsSpace

C, N_VAL, N_TEST, K, SIZE = 4, 60, 80, 5, 3
STRATEGIES = [("random", 0.8), ("nes_re", 1.4), ("edgenes", 1.8)]


def _probs(rng, y, skill):
    logits = rng.normal(size=(len(y), C))
    logits[np.arange(len(y)), y] += skill
    p = np.exp(logits)
    return (p / p.sum(1, keepdims=True)).astype(np.float16)


def make_study(root: Path, seeds=(0, 1, 2), shifted=True, name="synthetic") -> Path:
    rng = np.random.default_rng(0)
    out = root / name
    res = out / "results"
    res.mkdir(parents=True)
    y_val = rng.integers(0, C, N_VAL)
    y_test = rng.integers(0, C, N_TEST)
    np.save(res / "labels_val.npy", y_val)
    np.save(res / "labels_test.npy", y_test)
    space = DartsSpace()
    table, curves, members = [], [], []
    for label, skill in STRATEGIES:
        for seed in seeds:
            hours = 0.0
            vals, tests = [], []
            edge = label == "edgenes"
            if edge:
                alpha = space.sample(seed)
                sdir = out / "members" / f"{label}-s{seed}" / "search"
                sdir.mkdir(parents=True)
                samples = []
                for i in range(8):
                    g = space.sample(100 + i)
                    samples.append({"lambda": float(2 * i), "genotype": g.to_json(),
                                    "shared_edges": space.common_edges(alpha, g)})
                (sdir / "search.json").write_text(json.dumps({
                    "method": "edgenes", "genotype": alpha.to_json(), "device_seconds": 30.0,
                    "extra": {"samples": samples, "lambdas": [0.0, 8.0, 16.0],
                              "shared_edges": [1, 7, 16]}}))
                (sdir / "genotype.json").write_text(alpha.to_json())
                hours += 30.0 / 3600
                members.append({"strategy": label, "seed": seed, "trial_id": f"{label}{seed}s",
                                "kind": "search", "genotype": alpha.to_json(), "device_seconds": 30.0,
                                "val_nll": np.nan, "val_error": np.nan, "test_nll": np.nan,
                                "test_error": np.nan, "path": str(sdir), "lambda": np.nan,
                                "shared_edges": np.nan})
            for k in range(K):
                g = space.sample(1000 * seed + k + hash(label) % 97)
                d = out / "members" / f"{label}-s{seed}" / f"m{k}"
                d.mkdir(parents=True)
                pv = _probs(rng, y_val, skill + 0.2 * rng.normal())
                pt = _probs(rng, y_test, skill + 0.2 * rng.normal())
                np.save(d / "val_probs.npy", pv)
                np.save(d / "test_probs.npy", pt)
                (d / "genotype.json").write_text(g.to_json())
                if shifted:
                    SH.save_shifted(d, {(c, s): _probs(rng, y_test[:50], skill / (1 + s))
                                        for c in ("gaussian_noise", "jpeg") for s in (1, 3, 5)})
                    # shifted validation data on another corruption, as NES selects on
                    SH.save_shifted(d, {("contrast", s): _probs(rng, y_val[:40], skill / (1 + s))
                                        for s in (1, 3, 5)}, split="val")
                vals.append(pv)
                tests.append(pt)
                secs = 10.0 + 5 * rng.random()
                hours += secs / 3600
                chosen = forward_select(np.stack(vals), y_val, min(SIZE, len(vals)))
                ens = np.stack(tests)[chosen].astype(np.float64)
                curves.append({"strategy": label, "seed": seed, "members": k + 1, "device_hours": hours,
                               "nll": M.nll(ens, y_test), "error": M.error(ens, y_test),
                               "ece": M.ece(ens, y_test), "brier": M.brier(ens, y_test)})
                members.append({"strategy": label, "seed": seed, "trial_id": f"{label}{seed}{k}",
                                "kind": "member", "genotype": g.to_json(), "device_seconds": secs,
                                "val_nll": M.nll(pv, y_val), "val_error": M.error(pv, y_val),
                                "test_nll": M.nll(pt, y_test), "test_error": M.error(pt, y_test),
                                "path": str(d), "lambda": 2.0 * k if edge else np.nan,
                                "shared_edges": space.common_edges(alpha, g) if edge else np.nan})
            ens_m = np.stack(tests)[chosen].astype(np.float64)
            c = curves[-1]
            table.append({"strategy": label, "seed": seed, "accuracy": 1 - c["error"], "nll": c["nll"],
                          "ece": c["ece"], "brier": c["brier"], "oracle_nll": M.oracle_nll(ens_m, y_test),
                          "disagreement": M.disagreement(ens_m), "best_member_accuracy": 0.5,
                          "avg_member_nll": 1.0, "members": K, "device_hours": hours})
    pd.DataFrame(table).to_csv(res / "table.csv", index=False)
    pd.DataFrame(curves).to_csv(res / "curves.csv", index=False)
    pd.DataFrame(members).to_csv(res / "members.csv", index=False)
    (out / "study.json").write_text(json.dumps({
        "name": name, "data": {"name": "digits"}, "seeds": list(seeds), "ensemble_size": SIZE,
        "budget": {"members": K}, "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
        "strategies": [{"label": s, "name": s, "hparams": {}} for s, _ in STRATEGIES],
    }))
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = make_study(tmp_path_factory.mktemp("study"))
    return out, write_report(out)


def test_report_writes_markdown_tables_pvalues_and_plots(report):
    out, path = report
    assert path == out / "report.md"
    text = path.read_text()
    for heading in ("## Final ensembles", "## Anytime performance", "## Significance",
                    "## Ensemble size", "## Dataset shift", "## EdgeNES", "## The best ensemble's cells"):
        assert heading in text, heading
    for label, _ in STRATEGIES:
        assert f"| {label} |" in text
    assert "AUC NLL" in text and "±" in text
    assert "paired" in text  # the seeds are shared, so "auto" pairs them
    # every linked plot and CSV exists
    for link in ("anytime.png", "ensemble_size.png", "shift.png", "shift_by_corruption.png",
                 "shared_edges.png", "summary.csv", "auc.csv", "pvalues.csv", "ensemble_size.csv",
                 "shift.csv", "table.csv"):
        assert f"report/{link}" in text, link
        assert (out / "report" / link).is_file(), link
    genos = list((out / "report").glob("genotype_*.png"))
    assert 1 <= len(genos) <= 3
    for png in (out / "report").glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_report_csvs_hold_the_numbers(report):
    out, _ = report
    r = out / "report"
    summary = pd.read_csv(r / "summary.csv")
    table = pd.read_csv(out / "results" / "table.csv")
    got = summary.set_index("strategy").loc["nes_re", "accuracy_mean"]
    assert got == pytest.approx(table[table.strategy == "nes_re"].accuracy.mean())
    auc = pd.read_csv(r / "auc.csv")
    assert set(auc["metric"]) == {"nll", "error"} and len(auc) == 2 * 3 * 3
    assert auc["end"].nunique() == 1 and (auc["start"] == 0).all()
    assert (auc["points"] > 0).all()
    pv = pd.read_csv(r / "pvalues.csv")
    assert set(pv["quantity"]) >= {"final ensemble test accuracy", "AUC of NLL vs device-hours"}
    assert len(pv[pv.quantity == "final ensemble test accuracy"]) == 3  # 3 pairs
    assert pv["pvalue"].between(0, 1).all()
    sizes = pd.read_csv(r / "ensemble_size.csv")
    assert sizes["size"].max() == K
    lam = pd.read_csv(r / "shared_edges.csv")  # from the trained members' job keys
    assert len(lam) == 3 * K and set(lam["lambda"]) == {0.0, 2.0, 4.0, 6.0, 8.0}
    shift = pd.read_csv(r / "shift.csv")
    assert set(shift["severity"]) == {0, 1, 3, 5}
    assert set(shift["corruption"]) == {"gaussian_noise", "jpeg"}
    assert set(shift["selection"]) == {"val", "shifted_val"}


def test_auc_window_runs_to_the_longest_run_by_default(report):
    out, _ = report
    auc = pd.read_csv(out / "report" / "auc.csv")
    curves = pd.read_csv(out / "results" / "curves.csv")
    assert auc["end"].iloc[0] == pytest.approx(curves["device_hours"].max())
    np.testing.assert_allclose(auc["auc_mean"], auc["auc"] / (auc["end"] - auc["start"]))
    assert "longest run's final cost" in (out / "report.md").read_text()


def test_shift_rows_score_the_chosen_and_the_shift_selected_ensembles(report):
    out, _ = report
    shift = pd.read_csv(out / "report" / "shift.csv")
    members = pd.read_csv(out / "results" / "members.csv")
    rows = members[(members.strategy == "nes_re") & (members.seed == 1) & (members.kind == "member")]
    y_val = np.load(out / "results" / "labels_val.npy")
    y_test = np.load(out / "results" / "labels_test.npy")
    val = np.stack([np.load(Path(p) / "val_probs.npy") for p in rows.path])
    chosen = forward_select(val, y_val, SIZE)
    shifted_val = [SH.load_shifted(p, "val") for p in rows.path]
    pool = {k: np.stack([d[k] for d in shifted_val]) for k in shifted_val[0]}
    picked = SH.forward_select_shifted(pool, y_val, SIZE)
    for selection, idx in (("val", chosen), ("shifted_val", picked)):
        p = np.stack([SH.load_shifted(rows.path.iloc[i])[("jpeg", 3)] for i in idx]).astype(np.float64)
        got = shift[(shift.strategy == "nes_re") & (shift.seed == 1) & (shift.selection == selection)
                    & (shift.corruption == "jpeg") & (shift.severity == 3)]
        assert got["nll"].iloc[0] == pytest.approx(M.nll(p, y_test[:50]))


def test_shift_select_picks_what_the_report_shows(tmp_path):
    out = make_study(tmp_path, seeds=(0, 1))
    text = write_report(out, log_mlflow=False, shift_select="shifted_val").read_text()
    assert "selected by ForwardSelect on the shifted validation split" in text
    assert "minus that of the ensemble selected on clean validation data" in text
    with pytest.raises(ValueError, match="shift_select"):
        write_report(out, log_mlflow=False, shift_select="test")
    with pytest.raises(ValueError, match="horizon"):
        write_report(out, log_mlflow=False, horizon="median")


def test_report_is_logged_to_a_study_level_mlflow_run(report):
    from mlflow.tracking import MlflowClient

    out, _ = report
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("synthetic")
    key, value = REPORT_TAG
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{key}` = '{value}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert any(k.startswith("auc_nll.") for k in run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report"} <= names
    pngs = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert "report/anytime.png" in pngs


def test_one_seed_and_no_shift_still_report(tmp_path):
    out = make_study(tmp_path, seeds=(0,), shifted=False, name="single")
    path = write_report(out, log_mlflow=False)
    text = path.read_text()
    assert "No member of this study stored predictions on corrupted test data" in text
    assert "One seed per strategy: no p-values" in text and "seed noise" in text
    assert not (out / "report" / "pvalues.csv").exists()
    assert not (out / "report" / "shift.png").exists()
    # a second run overwrites in place and leaves nothing of the first behind
    (out / "report" / "shift.png").write_bytes(b"old")
    assert write_report(out, log_mlflow=False) == path
    assert not (out / "report" / "shift.png").exists()


def test_not_a_study(tmp_path):
    with pytest.raises(ValueError, match="output_dir"):
        write_report(tmp_path)
    with pytest.raises(ValueError, match="study"):
        write_report(object())
