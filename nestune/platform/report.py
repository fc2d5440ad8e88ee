"""A study's report: ``report.md`` with tables, p-values and plots, the same tables as CSV, and
the plots logged to a study-level MLflow run, rebuilt from the study's output folder with
nothing retrained.

``write_report(output_dir)`` reads the study with :meth:`StudyResult.load` (or takes a
StudyResult-like object: ``table()``, ``curves``, ``members``, ``labels(split)``,
``output_dir``, ``name``, ``settings``, ``tracking_uri``) and writes::

    <output_dir>/report.md
    <output_dir>/report/*.png          plots (linked from report.md)
    <output_dir>/report/*.csv          summary, per-seed table, AUC, p-values, ensemble-size
                                       curves, shift metrics (when stored)

Each (strategy, seed)'s pool is read from the members' stored probabilities
(``val_probs.npy`` / ``test_probs.npy`` and, when training stored them,
:data:`nestune.platform.shift.SHIFT_FILE`); its ensemble is rebuilt with the strategy's own
``select`` (ForwardSelect unless the strategy overrides it), so the report scores exactly the
ensembles the study did.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nestune.platform import plots as P
from nestune.platform import shift as SH
from nestune.platform import stats as S
from nestune.platform.ensemble import forward_select

__all__ = ["write_report", "REPORT_DIR", "REPORT_TAG"]

log = logging.getLogger(__name__)

#: Folder (inside the study's output folder) of the report's plots and CSV files.
REPORT_DIR = "report"
#: MLflow tag of the study-level run that holds the report: ``nestune.kind = report``.
REPORT_TAG = ("nestune.kind", "report")

# Columns shown as percentages in report.md (the CSVs keep fractions).
_PERCENT = {"accuracy", "best_member_accuracy", "ece", "disagreement", "error"}
_HEADERS = {
    "accuracy": "accuracy (%)",
    "nll": "NLL",
    "ece": "ECE (%)",
    "brier": "Brier",
    "oracle_nll": "oracle NLL",
    "disagreement": "disagreement (%)",
    "best_member_accuracy": "best member acc. (%)",
    "avg_member_nll": "avg member NLL",
    "members": "members",
    "device_hours": "device-hours",
}


# ----------------------------------------------------------------------------------- markdown


def _cell(v: Any, digits: int = 4) -> str:
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "–"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{float(v):.{digits}g}"
        return f"{float(v):.{digits}f}"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_table(df: pd.DataFrame, digits: int = 4, index: bool = False) -> str:
    if index:
        df = df.reset_index()
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, digits) for v in row) + " |")
    return "\n".join(lines)


def _pcell(p: float) -> str:
    if not np.isfinite(p):
        return "–"
    return "<1e-4" if p < 1e-4 else f"{p:.3g}"


def _pvalue_md(tests: pd.DataFrame, names: Sequence[str]) -> str:
    mat = S.pvalue_matrix(tests, order=list(names))
    shown = pd.DataFrame(
        [[("" if a == b else _pcell(mat.loc[a, b])) for b in names] for a in names],
        columns=list(names),
    )
    shown.insert(0, "", list(names))
    return _md_table(shown)


# ------------------------------------------------------------------------------------- inputs


def _load(study: Any) -> Any:
    if isinstance(study, (str, os.PathLike)):
        from nestune.platform.study import StudyResult

        return StudyResult.load(study)
    for attr in ("table", "curves", "members", "labels", "output_dir"):
        if not hasattr(study, attr):
            raise ValueError(
                f"study: expected an output folder or a StudyResult, got {type(study).__name__} "
                f"without {attr!r}"
            )
    return study


def _settings(result: Any) -> dict[str, Any]:
    s = getattr(result, "settings", None)
    return dict(s) if isinstance(s, dict) else {}


def _name(result: Any) -> str:
    name = getattr(result, "name", None)
    return str(name) if name else Path(result.output_dir).name


def _strategy_names(settings: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (registered name, hyperparameters), from the study's settings."""
    out = {}
    for s in settings.get("strategies") or []:
        if isinstance(s, dict) and "label" in s:
            out[str(s["label"])] = (str(s.get("name", s["label"])), dict(s.get("hparams") or {}))
    return out


def _selector(label: str, seed: int, settings: dict[str, Any], val_labels: np.ndarray,
              size: int, notes: list[str]):
    """The strategy's own ``select`` (as the study scored it), else ForwardSelect."""
    name, hparams = _strategy_names(settings).get(label, (label, {}))
    try:
        from nestune.platform.strategy import StrategyContext, make_strategy
        from nestune.search_spaces.darts import DartsSpace

        hp = {k: v for k, v in hparams.items() if k}
        strategy = make_strategy(name, **hp)
        strategy.setup(StrategyContext(space=DartsSpace(), seed=int(seed), ensemble_size=size,
                                       val_labels=val_labels))
        return strategy.select
    except Exception as e:  # an unregistered or changed strategy: the default rule still applies
        notes.append(f"{label}: ensembles rebuilt with ForwardSelect ({type(e).__name__}: {e})")
        return lambda v, y, m: forward_select(v, y, min(m, len(v)))


def _member_rows(members: pd.DataFrame, label: str, seed: int) -> pd.DataFrame:
    if members is None or members.empty:
        return pd.DataFrame()
    rows = members[(members["strategy"] == label) & (members["seed"] == seed)]
    if "kind" in rows.columns:
        rows = rows[rows["kind"] == "member"]
    keep = [isinstance(p, str) and (Path(p) / "val_probs.npy").is_file()
            and (Path(p) / "test_probs.npy").is_file() for p in rows["path"]]
    return rows[keep].reset_index(drop=True)


def _pool(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    val = np.stack([np.load(Path(p) / "val_probs.npy", allow_pickle=False) for p in rows["path"]])
    test = np.stack([np.load(Path(p) / "test_probs.npy", allow_pickle=False) for p in rows["path"]])
    return val, test


# --------------------------------------------------------------------------------- the report


def write_report(
    study: str | os.PathLike | Any,
    *,
    paired: S.Paired = "auto",
    log_mlflow: bool = True,
    tracking_uri: str | None = None,
    max_size: int | None = None,
    max_genotypes: int = 3,
    horizon: S.Horizon = "longest",
    shift_select: str = "val",
) -> Path:
    """Write the study's report (see the module docstring); returns the path of report.md.

    Args:
        study: the study's output folder, or a StudyResult(-like) object.
        paired: p-values by Welch's t-test (False), paired t-test over shared seeds (True), or
            paired when two strategies ran the same seeds, Welch otherwise ("auto", default).
        log_mlflow: log report.md, the plots and CSVs to a study-level run tagged
            ``nestune.kind=report`` in the study's experiment.
        tracking_uri: MLflow store (default: the study's own).
        max_size: largest M of the ensemble-size curves (default max(10, 2 x ensemble size),
            capped by the pool).
        max_genotypes: how many of the best ensemble's genotypes to draw.
        horizon: end of the common AUC window: "longest" (default: the longest run's final
            device-hours, a run that ended earlier holding its final ensemble), "shortest"
            (every run clipped at the shortest run's end) or device-hours.
        shift_select: which ensembles the shift section plots and tabulates: "val" (default,
            the study's own, selected on clean validation data) or "shifted_val" (ForwardSelect
            on the members' stored shifted validation predictions, as in NES). shift.csv holds
            both when both are there.
    """
    if shift_select not in ("val", "shifted_val"):
        raise ValueError(f"shift_select: expected 'val' or 'shifted_val', got {shift_select!r}")
    result = _load(study)
    out = Path(result.output_dir)
    rdir = out / REPORT_DIR
    rdir.mkdir(parents=True, exist_ok=True)
    # A rerun must not leave plots or tables of an earlier report next to the new ones.
    for stale in [*rdir.glob("*.png"), *rdir.glob("*.csv")]:
        stale.unlink()
    settings = _settings(result)
    name = _name(result)
    notes: list[str] = []
    md: list[str] = []
    figures: list[Path] = []

    table = result.table()
    table = table[[c for c in table.columns if c in ("strategy", "seed") or c in S.SUMMARY_COLUMNS]]
    order = list(dict.fromkeys(table["strategy"]))
    curves = result.curves if result.curves is not None else pd.DataFrame()
    members = result.members if result.members is not None else pd.DataFrame()
    ens_size = int(settings.get("ensemble_size") or 3)
    try:
        y_val, y_test = np.asarray(result.labels("val")), np.asarray(result.labels("test"))
    except Exception as e:
        y_val = y_test = None
        notes.append(f"no stored labels ({e}): pools are not rescored")

    md.append(f"# nestune report: {name}\n")
    md.append(_settings_md(settings, table, out))

    # ---- final ensembles
    summary = S.summary_table(table, order=order)
    summary.to_csv(rdir / "summary.csv", index=False)
    table.to_csv(rdir / "table.csv", index=False)
    md.append("## Final ensembles\n")
    md.append(f"Test metrics of each strategy's final ensemble (size {ens_size}), mean ± std over "
              "seeds (sample std; one seed: no ±). Percentages are of the test split. "
              "[summary.csv](report/summary.csv), per seed: [table.csv](report/table.csv).\n")
    md.append(_md_table(_display_summary(summary)) + "\n")

    # ---- anytime curves and AUC
    auc_frames = []
    if not curves.empty and y_test is not None:
        num_classes = int(max(int(y_test.max()) + 1, 2))
        md.append("## Anytime performance\n")
        for metric in ("nll", "error"):
            init = S.uniform_value(metric, num_classes)
            auc = S.anytime_auc(curves, metric, initial=init, horizon=horizon)
            auc.insert(2, "metric", metric)
            auc.insert(4, "auc_mean", auc["auc"] / (auc["end"] - auc["start"]))
            auc_frames.append(auc)
            if metric == "nll":
                for _, r in auc[auc["points"] == 0].iterrows():
                    notes.append(
                        f"{r['strategy']} seed {r['seed']}: no ensemble finished inside the common "
                        f"AUC window (0 to {r['end']:.4g} h), so its AUC is the uniform predictor's; "
                        "a longer horizon compares more"
                    )
        auc_all = pd.concat(auc_frames, ignore_index=True)
        auc_all.to_csv(rdir / "auc.csv", index=False)
        end = float(auc_all["end"].iloc[0])
        figures.append(P.plot_anytime(curves, rdir / "anytime.png", order=order, horizon=end,
                                      title=f"{name}: ensemble quality vs compute"))
        if horizon == "shortest":
            window = f"the shortest run's final cost ({_hours(end)}), every run clipped there"
        elif isinstance(horizon, str) or horizon is None:
            window = (f"the longest run's final cost ({_hours(end)}); a run that ended earlier "
                      "keeps its final ensemble from then on (dotted in the plot)")
        else:
            window = f"{_hours(end)} (given; a run that ended earlier keeps its final ensemble)"
        ended = auc_all[(auc_all.metric == "nll") & (auc_all["final"] < end * (1 - 1e-9))]
        md.append(
            "Ensemble test NLL and error against cumulative device-hours (searches included), "
            "mean ± std over seeds; each marker is a finished member, a large marker the run's "
            "final ensemble. The area under each curve is taken over one window for all runs, "
            f"from 0 to {window}. A run is a step function (the ensemble at t is the last one "
            "finished by t) and is worth the uniform predictor's value "
            f"(NLL ln {num_classes} = {math.log(num_classes):.3f}, error "
            f"{100 * (1 - 1 / num_classes):.1f} %) until its first ensemble, so a slow start "
            "costs. **AUC** is metric × device-hours (lower is better; the seeds' unit); "
            "**mean** is AUC divided by the window's length, the time-averaged metric on its "
            "own scale. [auc.csv](report/auc.csv)\n")
        if horizon != "shortest" and not ended.empty:
            md.append(f"{ended['strategy'].nunique()} of {auc_all['strategy'].nunique()} "
                      "strategies ended before the window's end in some seed and are held at "
                      "their final ensemble; pass `horizon=\"shortest\"` to compare only over "
                      "the time every run was still running.\n")
        md.append("![anytime curves](report/anytime.png)\n")
        rows = []
        for label in order:
            row: dict[str, Any] = {"strategy": label}
            n_seeds = 0
            for metric in ("nll", "error"):
                sub = auc_all[(auc_all.metric == metric) & (auc_all.strategy == label)]
                scale = 1.0 if metric == "nll" else 100.0
                unit = "nats × h" if metric == "nll" else "% × h"
                mname = "NLL" if metric == "nll" else "error"
                row[f"AUC {mname} ({unit})"] = _mean_std(sub["auc"].to_numpy(float) * scale)
                row[f"mean {mname} ({'nats' if metric == 'nll' else '%'})"] = _mean_std(
                    sub["auc_mean"].to_numpy(float) * scale)
                n_seeds = int(np.isfinite(sub["auc"].to_numpy(float)).sum())
            row["seeds"] = n_seeds
            rows.append(row)
        md.append(_md_table(pd.DataFrame(rows)) + "\n")
    else:
        notes.append("no anytime curves in the study: no AUC")

    # ---- p-values
    pv_frames = []
    md.append("## Significance\n")
    test_name = {False: "Welch's t-test", True: "the paired t-test (over shared seeds)",
                 "auto": "the paired t-test when two strategies ran the same seeds, Welch's "
                 "t-test otherwise"}[paired]
    quantities: list[tuple[str, pd.DataFrame, str]] = []
    for auc in auc_frames:
        metric = auc["metric"].iloc[0]
        quantities.append((f"AUC of {'NLL' if metric == 'nll' else metric} vs device-hours", auc, "auc"))
    quantities.append(("final ensemble test accuracy", table, "accuracy"))
    quantities.append(("final ensemble test NLL", table, "nll"))
    max_seeds = int(table.groupby("strategy")["seed"].nunique().max()) if not table.empty else 0
    if max_seeds >= 2 and len(order) >= 2:
        md.append(f"Two-sided p-values for every pair of strategies, by {test_name}, over seeds. "
                  "– : not computable (fewer than 2 seeds per side, or no variance). "
                  "[pvalues.csv](report/pvalues.csv) has the test, the means and the reason for "
                  "each.\n")
    elif max_seeds < 2:
        md.append("One seed per strategy: no p-values, since a t-test needs at least two seeds "
                  "per strategy, and no ± in the tables. Every difference above is between "
                  "single runs and may be seed noise; run the study with several seeds (three or "
                  "more for a useful test) before concluding that one strategy beats another.\n")
    for title, df, col in quantities:
        if len(order) < 2 or max_seeds < 2:
            break
        tests = S.pairwise_tests(df, col, paired=paired, order=order)
        tests.insert(0, "quantity", title)
        pv_frames.append(tests)
        used = ", ".join(sorted(set(tests["test"])))
        md.append(f"**{title}** ({used}):\n")
        md.append(_pvalue_md(tests, order) + "\n")
        for _, t in tests[tests["note"] != ""].iterrows():
            notes.append(f"{title}: {t['a']} vs {t['b']}: {t['note']}")
    if len(order) < 2:
        md.append("Only one strategy: nothing to compare.\n")
    if pv_frames:
        pd.concat(pv_frames, ignore_index=True).to_csv(rdir / "pvalues.csv", index=False)

    # ---- pools: ensemble size, shift, genotypes
    size_frames, shift_frames, best = [], [], None
    if y_val is not None and not members.empty:
        for _, run in table.iterrows():
            label, seed = run["strategy"], int(run["seed"])
            rows = _member_rows(members, label, seed)
            if rows.empty:
                continue
            val, test = _pool(rows)
            m_max = max_size or max(10, 2 * ens_size)
            try:
                curve = S.ensemble_size_curve(val, y_val, test, y_test, min(m_max, len(rows)))
            except ValueError as e:
                notes.append(f"{label} seed {seed}: no ensemble-size curve ({e})")
                continue
            curve.insert(0, "seed", seed)
            curve.insert(0, "strategy", label)
            size_frames.append(curve)
            select = _selector(label, seed, settings, y_val, ens_size, notes)
            chosen = [int(i) for i in select(val, y_val, ens_size)]
            sm = _shift_rows(rows, chosen, test, y_val, y_test, ens_size)
            if sm is not None:
                sm.insert(0, "seed", seed)
                sm.insert(0, "strategy", label)
                shift_frames.append(sm)
            elif (rows["path"].map(lambda p: (Path(p) / SH.SHIFT_FILE).is_file())).any():
                notes.append(f"{label} seed {seed}: not scored under shift (some chosen members "
                             "have no shifted test predictions, or none in common)")
            score = float(run["nll"]) if np.isfinite(run.get("nll", np.nan)) else math.inf
            if best is None or score < best[0]:
                best = (score, label, seed, [rows.loc[i, "genotype"] for i in chosen])

    if size_frames:
        sizes = pd.concat(size_frames, ignore_index=True)
        sizes.to_csv(rdir / "ensemble_size.csv", index=False)
        figures.append(P.plot_ensemble_size(sizes, rdir / "ensemble_size.png", order=order,
                                            title=f"{name}: ensemble size", mark=ens_size))
        md.append("## Ensemble size\n")
        md.append("Test metrics of the ensemble of the first M members ForwardSelect picks from "
                  "each final pool on the validation split, mean ± std over seeds. "
                  "[ensemble_size.csv](report/ensemble_size.csv)\n")
        md.append("![ensemble size](report/ensemble_size.png)\n")
        piv = sizes.groupby(["strategy", "size"])["nll"].mean().unstack("size")
        piv = piv.reindex([o for o in order if o in piv.index])
        piv.columns = [f"M={c}" for c in piv.columns]
        md.append("Mean test NLL by ensemble size:\n")
        md.append(_md_table(piv, index=True) + "\n")
    else:
        notes.append("no stored member probabilities: no ensemble-size curves")

    md.append("## Dataset shift\n")
    if shift_frames:
        shifted_df = pd.concat(shift_frames, ignore_index=True)
        shifted_df.to_csv(rdir / "shift.csv", index=False)
        selections = list(dict.fromkeys(shifted_df["selection"]))
        shown = shift_select if shift_select in selections else "val"
        if shift_select not in selections:
            notes.append("shift_select='shifted_val': no pool stored shifted validation "
                         f"predictions ({SH.SHIFT_VAL_FILE}), so ensembles are selected on the "
                         "clean validation split")
        view = shifted_df[shifted_df["selection"] == shown]
        sev = SH.severity_summary(shifted_df, by=("strategy", "selection"))
        sev.to_csv(rdir / "shift_summary.csv", index=False)
        sev_shown = sev[sev["selection"] == shown]
        how = ("selected by the strategy's own rule on the clean validation split (the study's "
               "final ensembles)" if shown == "val" else
               "selected by ForwardSelect on the shifted validation split, as in NES")
        figures.append(P.plot_shift(sev_shown, rdir / "shift.png", order=order,
                                    title=f"{name}: ensembles under dataset shift"))
        figures.append(P.plot_shift_by_corruption(view, rdir / "shift_by_corruption.png",
                                                  order=order))
        corrs = ", ".join(c.replace("_", " ") for c in dict.fromkeys(view["corruption"]))
        sevs = ", ".join(str(int(v)) for v in sorted(set(view["severity"]) - {0}))
        md.append(f"Ensembles of size {ens_size}, {how}, on CIFAR-10-C-style corruptions "
                  f"({corrs}) of the test split at severities {sevs} (Hendrycks & Dietterich's "
                  "CIFAR parameters, generated from a seed); severity 0 is the clean test split. "
                  "Averaged over corruptions, ± std over seeds. "
                  "[shift.csv](report/shift.csv), [shift_summary.csv](report/shift_summary.csv)\n")
        md.append("![shift](report/shift.png)\n")
        md.append("![shift per corruption](report/shift_by_corruption.png)\n")
        for metric, title in (("nll", "test NLL"), ("error", "test error (%)"), ("ece", "test ECE (%)")):
            k = 1.0 if metric == "nll" else 100.0
            piv = sev_shown.pivot(index="strategy", columns="severity", values=f"{metric}_mean") * k
            piv = piv.reindex([o for o in order if o in piv.index])
            piv.columns = [f"sev {c}" for c in piv.columns]
            md.append(f"Mean {title} by severity:\n")
            md.append(_md_table(piv, digits=4 if metric == "nll" else 2, index=True) + "\n")
        if len(selections) > 1:
            a = sev[sev["selection"] == "val"].set_index(["strategy", "severity"])["nll_mean"]
            b = sev[sev["selection"] == "shifted_val"].set_index(["strategy", "severity"])["nll_mean"]
            diff = (b - a).unstack("severity")
            diff = diff.reindex([o for o in order if o in diff.index])
            diff.columns = [f"sev {c}" for c in diff.columns]
            md.append("Test NLL of the ensemble selected on shifted validation data minus that "
                      "of the ensemble selected on clean validation data (negative: selecting "
                      "under shift helps):\n")
            md.append(_md_table(diff, index=True) + "\n")
    else:
        md.append(f"No member of this study stored predictions on corrupted test data "
                  f"({SH.SHIFT_FILE} next to its test_probs.npy), so its ensembles cannot be "
                  "scored under shift without retraining. Run the study with `shift=True` (or "
                  "a `[shift]` table in its study file) and every member stores them as it "
                  "finishes.\n")

    # ---- EdgeNES
    lam = _shared_edges(members)
    if lam is not None:
        samples, grid, label = lam
        figures.append(P.plot_shared_edges(samples, rdir / "shared_edges.png", grid=grid,
                                           strategy=label))
        samples.to_csv(rdir / "shared_edges.csv", index=False)
        md.append("## EdgeNES: diversity control\n")
        md.append("Edges each architecture sampled at λ shares with α* (the DARTS genotype), "
                  "against λ; the thin line: genotypes derived along a λ grid after the search; "
                  "the dashed line is the ideal shared = λ. "
                  "[shared_edges.csv](report/shared_edges.csv)\n")
        md.append("![shared edges vs lambda](report/shared_edges.png)\n")

    # ---- genotypes
    if best is not None and max_genotypes > 0:
        _, label, seed, genos = best
        md.append("## The best ensemble's cells\n")
        md.append(f"The final ensemble with the lowest test NLL: **{label}**, seed {seed}; its "
                  "distinct genotypes (normal and reduction cells):\n")
        seen: list[str] = []
        for g in genos:
            if isinstance(g, str) and g not in seen:
                seen.append(g)
        for i, g in enumerate(seen[:max_genotypes]):
            fname = f"genotype_{_slug(label)}_s{seed}_{i}.png"
            try:
                figures.append(P.plot_genotype(g, rdir / fname, title=f"{label} seed {seed}, member {i + 1}"))
            except ValueError as e:
                notes.append(f"genotype {i} of {label} seed {seed} not drawn: {e}")
                continue
            md.append(f"![{label} genotype {i + 1}](report/{fname})\n")

    if notes:
        md.append("## Notes\n")
        md.extend(f"- {n}" for n in dict.fromkeys(notes))
        md.append("")

    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")

    if log_mlflow:
        try:
            run_id = _log_mlflow(result, settings, name, path, rdir, auc_frames, tracking_uri)
            log.info("report logged to MLflow run %s", run_id)
        except Exception as e:  # the report on disk stands without a tracking store
            log.warning("report not logged to MLflow: %s", e)
            with path.open("a") as f:
                f.write(f"\n_Not logged to MLflow: {type(e).__name__}: {e}_\n")
    return path


def _shift_rows(rows: pd.DataFrame, chosen: list[int], test: np.ndarray, y_val: np.ndarray,
                y_test: np.ndarray, size: int) -> pd.DataFrame | None:
    """Shift metrics of one pool's ensemble as the study chose it (``selection = "val"``) and,
    when every member stored shifted validation predictions, of the ensemble ForwardSelect
    picks on the shifted validation split (``"shifted_val"``); None if the chosen members have
    no shifted test predictions in common."""
    paths = list(rows["path"])
    test_shift = {i: SH.load_shifted(paths[i]) for i in set(chosen)}
    keys = set.intersection(*(set(d) for d in test_shift.values())) if test_shift else set()
    if not keys:
        return None
    frames = []
    stacked = {k: np.stack([test_shift[i][k] for i in chosen]) for k in sorted(keys)}
    sm = SH.shift_metrics(stacked, y_test, clean=test[chosen])
    sm.insert(0, "selection", "val")
    frames.append(sm)
    val_shift = [SH.load_shifted(p, "val") for p in paths]
    vkeys = set.intersection(*(set(d) for d in val_shift)) if all(val_shift) else set()
    if vkeys:
        pool = {k: np.stack([d[k] for d in val_shift]) for k in sorted(vkeys)}
        picked = SH.forward_select_shifted(pool, y_val, min(size, len(paths)))
        tests = {i: test_shift.get(i) or SH.load_shifted(paths[i]) for i in set(picked)}
        tkeys = set.intersection(*(set(d) for d in tests.values()))
        if tkeys:
            stacked = {k: np.stack([tests[i][k] for i in picked]) for k in sorted(tkeys)}
            sm = SH.shift_metrics(stacked, y_test, clean=test[picked])
            sm.insert(0, "selection", "shifted_val")
            frames.append(sm)
    return pd.concat(frames, ignore_index=True)


def _hours(h: float) -> str:
    """Device-hours as written in the report, with a smaller unit alongside when it reads better."""
    factor, unit = P.time_unit(h)
    if factor == 1.0:
        return f"{h:.4g} device-hours"
    return f"{h:.4g} device-hours = {h * factor:.3g} {unit}"


def _mean_std(x: np.ndarray) -> str:
    """"mean ± std" over the finite entries (sample std; the mean alone for one value)."""
    x = x[np.isfinite(x)]
    if not x.size:
        return "–"
    m = f"{float(np.mean(x)):.4g}"
    return m + (f" ± {float(np.std(x, ddof=1)):.2g}" if x.size >= 2 else "")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def _display_summary(summary: pd.DataFrame) -> pd.DataFrame:
    disp = summary.copy()
    for col in _PERCENT:
        for s in ("mean", "std"):
            if f"{col}_{s}" in disp.columns:
                disp[f"{col}_{s}"] = disp[f"{col}_{s}"] * 100.0
    digits = {"accuracy": 2, "best_member_accuracy": 2, "ece": 2, "disagreement": 1,
              "members": 1, "device_hours": 3}
    f = S.format_mean_std(disp, digits=digits)
    return f.rename(columns={k: v for k, v in _HEADERS.items() if k in f.columns} | {"n": "seeds"})


def _settings_md(settings: dict[str, Any], table: pd.DataFrame, out: Path) -> str:
    data = settings.get("data")
    data = data.get("name") if isinstance(data, dict) else data
    lines = [
        f"- output folder: `{out}`",
        f"- data: {data or '?'}; strategies: {', '.join(dict.fromkeys(table['strategy']))}; "
        f"seeds: {sorted(set(int(s) for s in table['seed']))}",
        f"- budget: {json.dumps(settings.get('budget'))}; "
        f"ensemble size: {settings.get('ensemble_size', '?')}",
        f"- written {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
    ]
    return "\n".join(lines) + "\n"


def _shared_edges(members: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None, str] | None:
    """EdgeNES' sampled architectures as (λ, edges shared with α*) points, the λ grid of its
    search, and the strategy's label.

    Points come from the trained members' job keys ``lambda`` / ``shared_edges`` (what the
    edgenes strategy puts in every member job), else from the search's ``extra.samples``; the
    grid (genotypes derived along λ) from ``extra.lambdas`` / ``extra.shared_edges`` in the
    edgenes search's ``search.json``.
    """
    if members is None or members.empty or "kind" not in members.columns:
        return None
    samples, from_search, grids, labels = [], [], [], []
    if {"lambda", "shared_edges"} <= set(members.columns):
        rows = members[(members["kind"] == "member") & members["lambda"].notna()
                       & members["shared_edges"].notna()]
        for _, r in rows.iterrows():
            samples.append({"strategy": r["strategy"], "seed": r["seed"], "lambda": float(r["lambda"]),
                            "shared_edges": float(r["shared_edges"])})
            labels.append(r["strategy"])
    for _, row in members[members["kind"] == "search"].iterrows():
        p = row.get("path")
        f = Path(p) / "search.json" if isinstance(p, str) else None
        if f is None or not f.is_file():
            continue
        try:
            extra = json.loads(f.read_text()).get("extra") or {}
        except (OSError, ValueError):
            continue
        got = [s for s in extra.get("samples") or [] if "lambda" in s and "shared_edges" in s]
        for s in got:
            from_search.append({"strategy": row["strategy"], "seed": row["seed"],
                                "lambda": float(s["lambda"]), "shared_edges": float(s["shared_edges"])})
        lams, shared = extra.get("lambdas") or [], extra.get("shared_edges") or []
        if got and lams and len(lams) == len(shared):
            labels.append(row["strategy"])
            grids.extend({"strategy": row["strategy"], "seed": row["seed"], "lambda": float(a),
                          "shared_edges": float(b)} for a, b in zip(lams, shared, strict=True))
    points = samples or from_search
    if not points:
        return None
    grid = pd.DataFrame(grids) if grids else None
    return pd.DataFrame(points), grid, str(labels[0] if labels else points[0]["strategy"])


def _log_mlflow(result: Any, settings: dict[str, Any], name: str, md_path: Path, rdir: Path,
                auc_frames: list[pd.DataFrame], tracking_uri: str | None) -> str:
    for lg in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(lg).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    from nestune.platform.tracking import default_tracking_uri, is_local_store

    out = Path(result.output_dir)
    uri = tracking_uri or getattr(result, "tracking_uri", None) or settings.get("tracking_uri") \
        or default_tracking_uri(out)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        artifacts = (out / "mlartifacts").as_uri() if is_local_store(uri) else None
        exp_id = client.create_experiment(name, artifact_location=artifacts,
                                          tags={"nestune.output_dir": str(out)})
    else:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        exp_id = exp.experiment_id
    key, value = REPORT_TAG
    found = client.search_runs([exp_id], filter_string=f"tags.`{key}` = '{value}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run = client.create_run(exp_id, run_name=f"{name} report",
                                tags={key: value, "nestune.study": name})
        run_id = run.info.run_id
    try:
        from mlflow.entities import Metric

        now = int(_dt.datetime.now().timestamp() * 1000)
        metrics = []
        for auc in auc_frames:
            metric = auc["metric"].iloc[0]
            for label, g in auc.groupby("strategy"):
                a = g["auc"].to_numpy(float)
                a = a[np.isfinite(a)]
                if a.size:
                    metrics.append(Metric(f"auc_{metric}.{_slug(label)}", float(a.mean()), now, 0))
        if metrics:
            client.log_batch(run_id, metrics=metrics)
        client.log_artifact(run_id, str(md_path))
        client.log_artifacts(run_id, str(rdir), REPORT_DIR)
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id
