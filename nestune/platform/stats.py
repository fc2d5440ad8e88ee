"""Statistics for comparing strategies over seeds: anytime AUC, mean ± std tables, p-values and
ensemble-size curves.

Everything here is a pure function over the DataFrames a :class:`StudyResult` exposes (see the
"StudyResult data" contract) or over arrays of stored probabilities, so a report can be rebuilt
from a finished study with nothing retrained.

Anytime curves and their area
-----------------------------
A run's anytime curve is a list of points ``(device_hours, metric)``, one per finished member:
the quality of the ensemble ForwardSelect builds from the pool so far, at the cumulative cost
(searches included) when that member finished. Between two points the curve is a **step**: the
ensemble available at time ``t`` is the last one finished at or before ``t``. The area under the
curve is the exact integral of that step function (the trapezoid rule over its corner points),
so a run that reaches a good ensemble early gets a small area for a loss-like metric.

Runs of different lengths are compared over a **common window**. By default it ends at the
*longest* run's final device-hours, and a run that finished earlier is worth its final ensemble
from then on: a strategy that stopped spends nothing more and keeps what it built, so its curve
is not extrapolated, only held. ``horizon="shortest"`` instead clips every run at the shortest
run's final device-hours (nothing beyond any run's end is used, but with budgets in members a
cheap strategy's end can come before others have any ensemble, which makes their areas equal
and tells nothing); a number sets the end in device-hours. Before a run's first ensemble there is
no ensemble; two choices are offered:

* ``initial=None`` (default): the window starts at the latest first-finish time among the
  compared runs, so every run has a value over the whole window;
* ``initial=<value>``: the window starts at 0 device-hours and a run is worth ``initial`` until
  its first ensemble finishes (the report uses the uniform predictor's value: ``ln C`` for NLL,
  ``1 - 1/C`` for error), which charges a slow start.

The area is in metric x device-hours (nats x h for NLL, as the seeds report it: "AUC for
DartsEns 2.90 ± 0.19, EdgeNES 2.78 ± 0.13"); ``normalize=True`` divides by the window's length,
giving the time-averaged metric (nats for NLL), which reads on the metric's own scale and does
not change the p-values of runs that share the window.

``method="linear"`` joins the points with straight lines instead (trapezoid between finished
points), for those who prefer it; the step curve is the honest default.

p-values
--------
:func:`pairwise_tests` compares every pair of strategies on a per-seed value (final accuracy,
an AUC, ...) with Welch's t-test by default (``scipy.stats.ttest_ind(equal_var=False)``). With
``paired=True`` it uses the paired t-test (``scipy.stats.ttest_rel``) over the seeds both
strategies share; ``paired="auto"`` pairs only when both have exactly the same seeds (and falls
back to Welch otherwise). Too few seeds (fewer than 2 per side, or fewer than 2 shared for a
paired test) or no variance at all give a NaN p-value with a note, never an exception.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from nestune.platform import metrics as M
from nestune.platform.ensemble import forward_select

__all__ = [
    "SUMMARY_COLUMNS",
    "step_values",
    "common_window",
    "curve_area",
    "anytime_auc",
    "summary_table",
    "format_mean_std",
    "pairwise_tests",
    "pvalue_matrix",
    "ensemble_size_curve",
    "uniform_value",
]

#: The per-seed columns of ``StudyResult.table()`` that the summary table aggregates, in order.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "accuracy",
    "nll",
    "ece",
    "brier",
    "oracle_nll",
    "disagreement",
    "best_member_accuracy",
    "avg_member_nll",
    "members",
    "device_hours",
)

Paired = bool | Literal["auto"]
Horizon = float | Literal["longest", "shortest"]


def _require_columns(df: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{name}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: expected columns {missing} (has {list(df.columns)})")


# ------------------------------------------------------------------------------- anytime curves


def _sorted_points(times: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(times, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if t.ndim != 1 or t.shape != v.shape:
        raise ValueError(f"times/values: expected two 1-d arrays of one length, got {t.shape} and {v.shape}")
    if t.size and not np.all(np.isfinite(t)):
        raise ValueError("times: expected finite device-hours, got NaN or inf")
    # A stable sort keeps the order of points that finished at the same time: the later row wins
    # in the step function, as it does in the study.
    order = np.argsort(t, kind="stable")
    return t[order], v[order]


def step_values(times: Any, values: Any, grid: Any, initial: float = math.nan) -> np.ndarray:
    """Value of the step curve ``(times, values)`` at each point of ``grid``: the value of the last
    point with ``time <= t`` (``initial`` before the first point)."""
    t, v = _sorted_points(times, values)
    g = np.asarray(grid, dtype=np.float64)
    idx = np.searchsorted(t, g, side="right") - 1
    out = np.where(idx >= 0, v[np.clip(idx, 0, None)] if v.size else initial, initial)
    return out.astype(np.float64)


def curve_area(
    times: Any,
    values: Any,
    start: float,
    end: float,
    *,
    initial: float | None = None,
    method: Literal["step", "linear"] = "step",
) -> float:
    """Area under one anytime curve between ``start`` and ``end`` (device-hours).

    ``method="step"`` integrates the step function exactly (the value at ``t`` is that of the
    last point finished at or before ``t``); ``"linear"`` uses the trapezoid rule between points,
    holding the first value before the first point and the last after the last. Before the
    first point the curve is worth ``initial``; with ``initial=None`` the window must not start
    before the first point (a ValueError says so). ``end <= start`` gives 0.0.
    """
    if method not in ("step", "linear"):
        raise ValueError(f"method: expected 'step' or 'linear', got {method!r}")
    t, v = _sorted_points(times, values)
    if t.size == 0:
        raise ValueError("times: expected at least one point on the curve, got none")
    if not (np.isfinite(start) and np.isfinite(end)):
        raise ValueError(f"start/end: expected finite device-hours, got {start!r}, {end!r}")
    if end <= start:
        return 0.0
    if initial is None and start < t[0] - 1e-12:
        raise ValueError(
            f"start: the curve has no value before its first point at {t[0]:.6g} device-hours; "
            f"got start={start:.6g} (pass initial=... to give it one)"
        )
    init = math.nan if initial is None else float(initial)
    # Breakpoints inside the window, plus its ends.
    inner = t[(t > start) & (t < end)]
    knots = np.concatenate(([start], inner, [end]))
    if method == "step":
        left = step_values(t, v, knots[:-1], init)
        return float(np.sum(left * np.diff(knots)))
    # Linear: values at the knots by interpolation; before the first point the curve is the
    # initial value up to t[0] (then jumps to the first value), after the last it stays flat.
    if initial is not None and start < t[0]:
        pre_end = min(t[0], end)
        area = (pre_end - start) * init
        if end <= t[0]:
            return float(area)
        knots = np.concatenate(([t[0]], inner[inner > t[0]], [end]))
    else:
        area = 0.0
    vals = np.interp(knots, t, v)
    return float(area + np.trapezoid(vals, knots))


def common_window(
    curves: pd.DataFrame,
    *,
    by: Sequence[str] = ("strategy", "seed"),
    time: str = "device_hours",
    initial: float | None = None,
    horizon: Horizon | None = "longest",
) -> tuple[float, float]:
    """The ``(start, end)`` in device-hours over which the runs in ``curves`` are compared.

    ``end`` is the longest run's final time (``horizon="longest"``, the default, also for
    ``None``), the shortest run's final time (``"shortest"``) or ``horizon`` device-hours;
    ``start`` is 0 with an ``initial`` value, else the latest first-finish time among the runs
    (grouped by ``by``).
    """
    _require_columns(curves, [*by, time], "curves")
    if curves.empty:
        raise ValueError("curves: expected at least one point, got an empty DataFrame")
    g = curves.groupby(list(by), sort=False)[time]
    first, last = g.min(), g.max()
    if horizon is None or horizon == "longest":
        end = float(last.max())
    elif horizon == "shortest":
        end = float(last.min())
    elif isinstance(horizon, (int, float, np.integer, np.floating)) and not isinstance(horizon, bool) \
            and math.isfinite(float(horizon)) and float(horizon) > 0:
        end = float(horizon)
    else:
        raise ValueError(
            f"horizon: expected 'longest', 'shortest' or device-hours > 0, got {horizon!r}"
        )
    start = 0.0 if initial is not None else float(first.max())
    return start, end


def anytime_auc(
    curves: pd.DataFrame,
    metric: str = "nll",
    *,
    by: Sequence[str] = ("strategy", "seed"),
    time: str = "device_hours",
    horizon: Horizon | None = "longest",
    initial: float | None = None,
    method: Literal["step", "linear"] = "step",
    normalize: bool = False,
) -> pd.DataFrame:
    """Area under the anytime curve of ``metric`` for every run (one row per group of ``by``).

    All runs share one window (see :func:`common_window` and the module docstring): by default
    it ends at the longest run's final device-hours (a run that ended earlier holds its final
    ensemble), and starts at 0 with ``initial`` or at the latest first finish without. Returns a
    DataFrame with the ``by`` columns, ``auc`` (metric x device-hours; with ``normalize`` the
    time-average of the metric over the window instead), ``start``, ``end``, ``points`` (how
    many finished ensembles of the run fall inside the window) and ``final`` (the run's own
    last finish). If the window is empty, ``auc`` is NaN.
    """
    _require_columns(curves, [*by, time, metric], "curves")
    start, end = common_window(curves, by=by, time=time, initial=initial, horizon=horizon)
    rows = []
    for key, grp in curves.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        t = grp[time].to_numpy(dtype=np.float64)
        v = grp[metric].to_numpy(dtype=np.float64)
        if end <= start:
            area = math.nan
        else:
            area = curve_area(t, v, start, end, initial=initial, method=method)
            if normalize:
                area /= end - start
        rows.append(
            {**dict(zip(by, key, strict=True)), "auc": area, "start": start, "end": end,
             "points": int(np.sum((t >= start) & (t <= end))), "final": float(t.max())}
        )
    return pd.DataFrame(rows, columns=[*by, "auc", "start", "end", "points", "final"])


def uniform_value(metric: str, num_classes: int) -> float:
    """The value of ``metric`` for the uniform predictor over ``num_classes`` classes: what a
    run is worth before it has any ensemble, as the ``initial`` of :func:`anytime_auc`
    (``nll``: ln C; ``error``: 1 - 1/C; ``brier``: 1 - 1/C; ``accuracy``: 1/C; ``ece``: 0, as a
    uniform guess on balanced classes is calibrated)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
    c = int(num_classes)
    table = {
        "nll": math.log(c),
        "error": 1.0 - 1.0 / c,
        "ece": 0.0,
        "brier": 1.0 - 1.0 / c,
        "accuracy": 1.0 / c,
    }
    if metric not in table:
        raise ValueError(f"metric: expected one of {sorted(table)}, got {metric!r}")
    return table[metric]


# ------------------------------------------------------------------------------- summary table


def summary_table(
    table: pd.DataFrame,
    columns: Sequence[str] | None = None,
    *,
    group: str = "strategy",
    order: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each column, per strategy.

    ``table`` has one row per (strategy, seed) (``StudyResult.table()``). Returns one row per
    strategy (in ``order`` if given, else first appearance) with ``n`` (the number of seeds) and
    ``<col>_mean`` / ``<col>_std`` for each of ``columns`` (default: those of
    :data:`SUMMARY_COLUMNS` present in ``table``). The std is the sample std (ddof=1); with one
    seed it is NaN.
    """
    _require_columns(table, [group], "table")
    if columns is None:
        columns = [c for c in SUMMARY_COLUMNS if c in table.columns]
    else:
        _require_columns(table, columns, "table")
    groups = list(dict.fromkeys(table[group])) if order is None else list(order)
    rows = []
    for name in groups:
        sub = table[table[group] == name]
        row: dict[str, Any] = {group: name, "n": int(len(sub))}
        for col in columns:
            x = pd.to_numeric(sub[col], errors="coerce").to_numpy(dtype=np.float64)
            x = x[np.isfinite(x)]
            row[f"{col}_mean"] = float(np.mean(x)) if x.size else math.nan
            row[f"{col}_std"] = float(np.std(x, ddof=1)) if x.size >= 2 else math.nan
        rows.append(row)
    out_cols = [group, "n"] + [f"{c}_{s}" for c in columns for s in ("mean", "std")]
    return pd.DataFrame(rows, columns=out_cols)


def _fmt(x: float, digits: int) -> str:
    if not np.isfinite(x):
        return "–"
    if x != 0 and (abs(x) >= 10 ** (digits + 2) or abs(x) < 10 ** (-digits)):
        return f"{x:.{digits}g}" if abs(x) >= 1 else f"{x:.2e}"
    return f"{x:.{digits}f}"


def format_mean_std(
    summary: pd.DataFrame, *, group: str = "strategy", digits: int | dict[str, int] = 4
) -> pd.DataFrame:
    """``summary_table`` output as strings ``"mean ± std"`` (``"mean"`` alone with one seed), one
    column per metric, for a markdown table. ``digits`` may be a dict per metric."""
    _require_columns(summary, [group, "n"], "summary")
    metrics = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    out = summary[[group, "n"]].copy()
    for m in metrics:
        d = digits.get(m, 4) if isinstance(digits, dict) else digits
        cells = []
        for mean, std in zip(summary[f"{m}_mean"], summary[f"{m}_std"], strict=True):
            cell = _fmt(float(mean), d)
            if np.isfinite(std):
                cell += f" ± {_fmt(float(std), d)}"
            cells.append(cell)
        out[m] = cells
    return out


# ------------------------------------------------------------------------------------ p-values


def _test_pair(
    a: pd.Series, b: pd.Series, paired: Paired
) -> tuple[str, float, float, int, int, str]:
    """(test, statistic, pvalue, n_a, n_b, note) for two per-seed Series indexed by seed."""
    from scipy import stats as st

    a = a[np.isfinite(a.to_numpy(dtype=np.float64))]
    b = b[np.isfinite(b.to_numpy(dtype=np.float64))]
    shared = a.index.intersection(b.index)
    same_seeds = set(a.index) == set(b.index)
    use_paired = paired is True or (paired == "auto" and same_seeds and len(shared) >= 2)
    if use_paired:
        if len(shared) < 2:
            return "paired", math.nan, math.nan, len(shared), len(shared), (
                f"paired t-test needs >= 2 shared seeds, got {len(shared)}"
            )
        x = a.loc[shared].to_numpy(dtype=np.float64)
        y = b.loc[shared].to_numpy(dtype=np.float64)
        d = x - y
        if np.all(d == d[0]):
            note = "identical per-seed values" if d[0] == 0 else "constant per-seed difference"
            return "paired", math.nan, math.nan, len(x), len(y), f"no variance in the differences ({note})"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = st.ttest_rel(x, y)
        note = "" if same_seeds else f"paired over the {len(shared)} shared seeds"
        return "paired", float(res.statistic), float(res.pvalue), len(x), len(y), note
    x = a.to_numpy(dtype=np.float64)
    y = b.to_numpy(dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        return "welch", math.nan, math.nan, len(x), len(y), (
            f"Welch's t-test needs >= 2 seeds per strategy, got {len(x)} and {len(y)}"
        )
    if np.var(x) == 0 and np.var(y) == 0:
        return "welch", math.nan, math.nan, len(x), len(y), "no variance within either strategy"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = st.ttest_ind(x, y, equal_var=False)
    return "welch", float(res.statistic), float(res.pvalue), len(x), len(y), ""


def pairwise_tests(
    values: pd.DataFrame,
    value: str,
    *,
    group: str = "strategy",
    unit: str = "seed",
    paired: Paired = False,
    order: Sequence[str] | None = None,
) -> pd.DataFrame:
    """A t-test for every unordered pair of strategies on the per-seed ``value``.

    ``values`` has one row per (``group``, ``unit``) — e.g. ``StudyResult.table()`` or the
    output of :func:`anytime_auc`. ``paired``: False = Welch's t-test (default), True = paired
    t-test over the shared seeds, ``"auto"`` = paired when both strategies have the same seeds,
    Welch otherwise. Returns one row per pair ``a < b`` (in ``order``): ``a``, ``b``, ``test``
    (``"welch"`` / ``"paired"``), ``n_a``, ``n_b``, ``mean_a``, ``mean_b``, ``statistic``,
    ``pvalue`` and ``note`` (why a p-value is NaN, or how it was paired).
    """
    if paired not in (True, False, "auto"):
        raise ValueError(f"paired: expected True, False or 'auto', got {paired!r}")
    _require_columns(values, [group, unit, value], "values")
    names = list(dict.fromkeys(values[group])) if order is None else list(order)
    per: dict[str, pd.Series] = {}
    for name in names:
        sub = values[values[group] == name]
        s = pd.Series(pd.to_numeric(sub[value], errors="coerce").to_numpy(dtype=np.float64),
                      index=sub[unit].to_numpy())
        if s.index.has_duplicates:
            raise ValueError(f"values: expected one row per ({group}, {unit}), got repeats for {name!r}")
        per[name] = s
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            test, stat, p, na, nb, note = _test_pair(per[a], per[b], paired)
            fa = per[a][np.isfinite(per[a])]
            fb = per[b][np.isfinite(per[b])]
            rows.append({
                "a": a, "b": b, "test": test, "n_a": na, "n_b": nb,
                "mean_a": float(fa.mean()) if len(fa) else math.nan,
                "mean_b": float(fb.mean()) if len(fb) else math.nan,
                "statistic": stat, "pvalue": p, "note": note,
            })
    cols = ["a", "b", "test", "n_a", "n_b", "mean_a", "mean_b", "statistic", "pvalue", "note"]
    return pd.DataFrame(rows, columns=cols)


def pvalue_matrix(tests: pd.DataFrame, order: Sequence[str] | None = None) -> pd.DataFrame:
    """The p-values of :func:`pairwise_tests` as a symmetric square DataFrame (NaN diagonal)."""
    _require_columns(tests, ["a", "b", "pvalue"], "tests")
    names = order or list(dict.fromkeys([*tests["a"], *tests["b"]]))
    mat = pd.DataFrame(math.nan, index=list(names), columns=list(names), dtype=np.float64)
    for a, b, p in zip(tests["a"], tests["b"], tests["pvalue"], strict=True):
        if a in mat.index and b in mat.index:
            mat.loc[a, b] = mat.loc[b, a] = p
    return mat


# ------------------------------------------------------------------------- ensemble-size curves


def ensemble_size_curve(
    val_probs: Any,
    val_labels: Any,
    test_probs: Any,
    test_labels: Any,
    max_size: int | None = None,
    *,
    replacement: bool = False,
    select: Callable[..., list[int]] = forward_select,
) -> pd.DataFrame:
    """Test metrics of the ensembles of size M = 1..``max_size`` that ForwardSelect builds from a
    pool on its validation probabilities.

    ``val_probs`` / ``test_probs`` are the pool's ``(K, N, C)`` probabilities on the validation
    and test splits (same member order). ForwardSelect is greedy, so the size-M ensemble is the
    first M picks of one selection of ``max_size`` (default K, or K without replacement). Returns
    one row per size: ``size``, ``nll``, ``error``, ``accuracy``, ``ece``, ``brier``,
    ``oracle_nll``, ``disagreement``, ``unique`` (distinct members; fewer than ``size`` only with
    replacement).
    """
    val = np.asarray(val_probs)
    test = np.asarray(test_probs)
    if val.ndim != 3 or test.ndim != 3:
        raise ValueError(f"val_probs/test_probs: expected (K, N, C) arrays, got {val.shape} and {test.shape}")
    if val.shape[0] != test.shape[0]:
        raise ValueError(
            f"test_probs: expected the same K={val.shape[0]} members as val_probs, got {test.shape[0]}"
        )
    k = val.shape[0]
    if max_size is None:
        max_size = k
    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 1:
        raise ValueError(f"max_size: expected an int >= 1, got {max_size!r}")
    if not replacement:
        max_size = min(int(max_size), k)
    order = select(val, val_labels, int(max_size), replacement=replacement)
    y = np.asarray(test_labels)
    rows = []
    running = np.zeros(test.shape[1:], dtype=np.float64)
    for m, idx in enumerate(order, start=1):
        running += test[idx].astype(np.float64)
        ens = running / m
        members = test[order[:m]].astype(np.float64)
        err = M.error(ens, y)
        rows.append({
            "size": m,
            "nll": M.nll(ens, y),
            "error": err,
            "accuracy": 1.0 - err,
            "ece": M.ece(ens, y),
            "brier": M.brier(ens, y),
            "oracle_nll": M.oracle_nll(members, y),
            "disagreement": M.disagreement(members),
            "unique": len(set(order[:m])),
        })
    return pd.DataFrame(rows)
