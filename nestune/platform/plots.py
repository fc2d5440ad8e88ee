"""The report's plots: matplotlib PNGs, one fixed colour per strategy across every plot.

Plots are drawn on ``matplotlib.figure.Figure`` objects rendered by the Agg canvas, never
through ``pyplot``: nothing here changes the process-wide backend or leaks open figures, so the
report can run inside a notebook, a Ray worker or a headless CI job alike.

Every function takes the DataFrames of :mod:`nestune.platform.stats` /
:mod:`nestune.platform.shift` (or a Genotype), writes one PNG and returns its path.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch

from nestune.search_spaces.genotype import Genotype

__all__ = [
    "STRATEGY_COLORS",
    "FALLBACK_COLORS",
    "METRIC_LABELS",
    "color_for",
    "time_unit",
    "plot_anytime",
    "plot_ensemble_size",
    "plot_shift",
    "plot_shift_by_corruption",
    "plot_shared_edges",
    "plot_genotype",
]

#: One colour per registered strategy (Okabe-Ito based: tells apart under the common colour
#: vision deficiencies), fixed so a strategy looks the same in every plot and every report.
STRATEGY_COLORS: dict[str, str] = {
    "random": "#7F7F7F",     # grey: the baseline
    "nes_re": "#0072B2",     # blue
    "deep_ens": "#E69F00",   # orange
    "tpe": "#CC79A7",        # reddish purple
    "darts": "#56B4E9",      # sky blue
    "darts_ens": "#009E73",  # bluish green
    "xnas": "#D55E00",       # vermillion
    "edgenes": "#6A3D9A",    # dark purple
}

#: Colours for strategies not in :data:`STRATEGY_COLORS`, chosen by a stable hash of the name.
FALLBACK_COLORS: tuple[str, ...] = (
    "#8C564B", "#BCBD22", "#17BECF", "#1F77B4", "#D62728", "#2CA02C", "#F0E442", "#393B79",
)

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")

#: Axis labels (with units) of the metrics the report plots; ``scale`` turns fractions into %.
METRIC_LABELS: dict[str, tuple[str, float]] = {
    "nll": ("test NLL (nats)", 1.0),
    "error": ("test error (%)", 100.0),
    "accuracy": ("test accuracy (%)", 100.0),
    "ece": ("test ECE (%)", 100.0),
    "brier": ("test Brier score", 1.0),
    "oracle_nll": ("test oracle NLL (nats)", 1.0),
    "disagreement": ("disagreement (%)", 100.0),
}


def color_for(name: str) -> str:
    """The colour of strategy ``name``: its entry in :data:`STRATEGY_COLORS`, else a fallback
    colour that depends only on the name (the same in every plot and every run)."""
    if name in STRATEGY_COLORS:
        return STRATEGY_COLORS[name]
    return FALLBACK_COLORS[zlib.crc32(str(name).encode()) % len(FALLBACK_COLORS)]


def _marker_for(name: str) -> str:
    known = list(STRATEGY_COLORS)
    i = known.index(name) if name in known else zlib.crc32(str(name).encode())
    return _MARKERS[i % len(_MARKERS)]


def time_unit(max_hours: float) -> tuple[float, str]:
    """A readable unit for a span of device-hours: ``(factor, label)`` to multiply hours by."""
    if not np.isfinite(max_hours) or max_hours >= 1.0:
        return 1.0, "device-hours"
    if max_hours >= 1.0 / 60.0:
        return 60.0, "device-minutes"
    return 3600.0, "device-seconds"


def _metric_label(metric: str) -> tuple[str, float]:
    return METRIC_LABELS.get(metric, (metric, 1.0))


def _new_figure(ncols: int, nrows: int = 1, width: float = 5.2, height: float = 3.9) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _order(names: Iterable[str], order: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(names))
    if order is None:
        return present
    return [n for n in order if n in present] + [n for n in present if n not in order]


def _require(df: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{name}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: expected columns {missing} (has {list(df.columns)})")


def _legend(ax: Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, framealpha=0.85)


def _figure_legend(fig: Figure, axes: Iterable[Axes]) -> None:
    """One legend for the whole figure, outside the panels on the right, so it never hides a
    curve; entries are collected from every panel once each, in drawing order."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8.5,
                   frameon=False)


# ----------------------------------------------------------------------------- anytime curves


def _seed_band(curves: pd.DataFrame, metric: str, time: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over seeds of one strategy's step curves on the union of its finish times,
    from the time every seed has an ensemble (a seed joining late would make the mean jump) to
    its longest seed's last finish, a seed that ended earlier holding its final ensemble as it
    does in the AUC, so the last point is the mean of the final ensembles."""
    runs = [g.sort_values(time, kind="stable") for _, g in curves.groupby("seed", sort=True)]
    start = max(float(r[time].min()) for r in runs)
    end = max(float(r[time].max()) for r in runs)
    grid = np.unique(np.concatenate([r[time].to_numpy(dtype=float) for r in runs]))
    grid = grid[(grid >= start) & (grid <= end)]
    vals = np.full((len(runs), len(grid)), np.nan)
    for i, r in enumerate(runs):
        t = r[time].to_numpy(dtype=float)
        v = r[metric].to_numpy(dtype=float)
        idx = np.searchsorted(t, grid, side="right") - 1
        vals[i] = np.where(idx >= 0, v[np.clip(idx, 0, None)], np.nan)
    n = np.sum(np.isfinite(vals), axis=0)
    total = np.where(np.isfinite(vals), vals, 0.0).sum(axis=0)
    mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    sq = np.where(np.isfinite(vals), (vals - mean) ** 2, 0.0).sum(axis=0)
    std = np.where(n >= 2, np.sqrt(sq / np.maximum(n - 1, 1)), 0.0)  # sample std over seeds
    return grid, mean, std


def plot_anytime(
    curves: pd.DataFrame,
    path: str | Path,
    metrics: Sequence[str] = ("nll", "error"),
    *,
    time: str = "device_hours",
    order: Sequence[str] | None = None,
    horizon: float | None = None,
    title: str | None = None,
) -> Path:
    """Ensemble test metric against cumulative device-hours, one panel per metric: for each
    strategy the mean over seeds of the step curves (the ensemble at ``t`` is the last one
    finished by ``t``) with a band of ± one std over seeds, from the time all its seeds have an
    ensemble up to its longest seed's end (a seed that ended earlier holds its final ensemble).
    A small marker is a finished member, a large one the
    run's final ensemble, and a dotted line holds that final value to the right edge, so a run
    with one point or one that ended early still shows where it stands.
    ``horizon`` (device-hours) draws the end of the common AUC window as a dashed line."""
    _require(curves, ["strategy", "seed", time, *metrics], "curves")
    if curves.empty:
        raise ValueError("curves: expected at least one point, got an empty DataFrame")
    right = float(curves[time].max())
    if horizon is not None and np.isfinite(horizon):
        right = max(right, float(horizon))
    factor, unit = time_unit(right)
    fig, axes = _new_figure(len(metrics), width=4.8, height=3.8)
    for ax, metric in zip(axes[0], metrics, strict=True):
        label, scale = _metric_label(metric)
        for name in _order(curves["strategy"], order):
            sub = curves[curves["strategy"] == name]
            grid, mean, std = _seed_band(sub, metric, time)
            if grid.size == 0:
                continue
            x = grid * factor
            y = mean * scale
            n_seeds = sub["seed"].nunique()
            c, mk = color_for(name), _marker_for(name)
            ax.plot(x, y, drawstyle="steps-post", color=c, lw=1.8, marker=mk, ms=3.5,
                    label=f"{name} (n={n_seeds})")
            if n_seeds > 1:
                ax.fill_between(x, (mean - std) * scale, (mean + std) * scale, step="post",
                                color=c, alpha=0.18, lw=0)
            ax.plot([x[-1]], [y[-1]], marker=mk, ms=8, color=c, mec="black", mew=0.6, ls="none",
                    zorder=4)
            if x[-1] < right * factor:
                ax.plot([x[-1], right * factor], [y[-1], y[-1]], color=c, lw=1.0, ls=":", alpha=0.9)
        if horizon is not None and np.isfinite(horizon):
            ax.axvline(horizon * factor, color="k", ls="--", lw=0.8, label="end of AUC window")
        ax.set_xlabel(f"cumulative {unit} (searches included)")
        ax.set_ylabel(f"ensemble {label}")
        ax.set_title(f"ensemble {label.split(' (')[0]} vs compute", fontsize=10.5)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes[0])
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# -------------------------------------------------------------------------------- ensemble size


def plot_ensemble_size(
    sizes: pd.DataFrame,
    path: str | Path,
    metrics: Sequence[str] = ("nll", "error"),
    *,
    order: Sequence[str] | None = None,
    title: str | None = None,
    mark: int | None = None,
) -> Path:
    """Ensemble test metric against ensemble size M (ForwardSelect's first M picks), mean ± std
    over seeds per strategy. ``sizes`` has ``strategy``, ``seed``, ``size`` and the metrics;
    ``mark`` (the study's ensemble size) is drawn as a dashed line."""
    _require(sizes, ["strategy", "seed", "size", *metrics], "sizes")
    fig, axes = _new_figure(len(metrics))
    for ax, metric in zip(axes[0], metrics, strict=True):
        label, scale = _metric_label(metric)
        for name in _order(sizes["strategy"], order):
            sub = sizes[sizes["strategy"] == name]
            g = sub.groupby("size")[metric]
            m = g.mean()
            s = g.std(ddof=1).fillna(0.0)
            c = color_for(name)
            ax.plot(m.index, m * scale, marker=_marker_for(name), ms=4, color=c, lw=1.8,
                    label=f"{name} (n={sub['seed'].nunique()})")
            ax.fill_between(m.index, (m - s) * scale, (m + s) * scale, color=c, alpha=0.18, lw=0)
        if mark is not None:
            ax.axvline(mark, color="k", ls="--", lw=0.8, label=f"study's M = {mark}")
        ax.set_xlabel("ensemble size M (members, ForwardSelect order)")
        ax.set_ylabel(f"ensemble {label}")
        ax.set_title(f"ensemble {label.split(' (')[0]} vs ensemble size")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes[0])
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------- shift


def plot_shift(
    summary: pd.DataFrame,
    path: str | Path,
    metrics: Sequence[str] = ("nll", "error", "ece"),
    *,
    order: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Ensemble metric against corruption severity (0 = clean), averaged over corruptions, with
    ± one std over seeds: the output of :func:`nestune.platform.shift.severity_summary`."""
    _require(summary, ["strategy", "severity", *[f"{m}_mean" for m in metrics]], "summary")
    fig, axes = _new_figure(len(metrics), width=4.6)
    for ax, metric in zip(axes[0], metrics, strict=True):
        label, scale = _metric_label(metric)
        for name in _order(summary["strategy"], order):
            sub = summary[summary["strategy"] == name].sort_values("severity")
            mean = sub[f"{metric}_mean"].to_numpy(dtype=float)
            std = sub.get(f"{metric}_std", pd.Series(np.zeros(len(sub)))).fillna(0.0).to_numpy(dtype=float)
            ax.errorbar(sub["severity"], mean * scale, yerr=std * scale, color=color_for(name),
                        marker=_marker_for(name), ms=4, capsize=3, lw=1.6, label=name)
        ax.set_xlabel("corruption severity (0 = clean)")
        ax.set_ylabel(f"ensemble {label}")
        ax.set_title(f"{label.split(' (')[0]} under shift (mean over corruptions)", fontsize=10)
        ax.set_xticks(range(6))
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes[0])
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_shift_by_corruption(
    rows: pd.DataFrame,
    path: str | Path,
    metric: str = "nll",
    *,
    order: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Small multiples: ``metric`` against severity for each corruption, mean over seeds per
    strategy. ``rows`` are :func:`nestune.platform.shift.shift_metrics` rows with ``strategy``
    and ``seed`` added."""
    _require(rows, ["strategy", "corruption", "severity", metric], "rows")
    label, scale = _metric_label(metric)
    corruptions = list(dict.fromkeys(rows["corruption"]))
    ncols = min(4, len(corruptions))
    nrows = -(-len(corruptions) // ncols)
    fig, axes = _new_figure(ncols, nrows, width=3.4, height=2.8)
    for i, corr in enumerate(corruptions):
        ax = axes[i // ncols][i % ncols]
        sub = rows[rows["corruption"] == corr]
        for name in _order(sub["strategy"], order):
            m = sub[sub["strategy"] == name].groupby("severity")[metric].mean()
            ax.plot(m.index, m * scale, color=color_for(name), marker=_marker_for(name), ms=3,
                    lw=1.4, label=name)
        ax.set_title(corr.replace("_", " "), fontsize=10)
        ax.set_xticks(range(6))
        ax.grid(alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel(label, fontsize=9)
        if i // ncols == nrows - 1:
            ax.set_xlabel("severity", fontsize=9)
    for j in range(len(corruptions), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    _figure_legend(fig, [ax for row in axes for ax in row])
    fig.suptitle(title or f"ensemble {label} per corruption")
    return _save(fig, path)


# ---------------------------------------------------------------------------- EdgeNES λ edges


def plot_shared_edges(
    df: pd.DataFrame,
    path: str | Path,
    *,
    max_edges: int = 16,
    lam: str = "lambda",
    shared: str = "shared_edges",
    strategy: str = "edgenes",
    grid: pd.DataFrame | None = None,
    title: str | None = None,
) -> Path:
    """EdgeNES: edges each sampled architecture shares with α* against the λ it was sampled at,
    with the ideal line (shared = λ, up to the ``max_edges`` = Λ edges of a genotype). Points
    are jittered horizontally by a hair so repeated λ stay visible; ``seed`` (if present) picks
    the marker. ``grid`` (same columns) adds the genotypes derived along a λ grid as lines."""
    _require(df, [lam, shared], "df")
    if df.empty:
        raise ValueError("df: expected at least one sampled architecture, got none")
    fig, axes = _new_figure(1, width=5.6, height=4.4)
    ax = axes[0][0]
    c = color_for(strategy)
    seeds = list(dict.fromkeys(df["seed"])) if "seed" in df.columns else [None]
    rng = np.random.default_rng(0)
    for i, seed in enumerate(seeds):
        sub = df if seed is None else df[df["seed"] == seed]
        x = sub[lam].to_numpy(dtype=float)
        jitter = rng.uniform(-0.08, 0.08, size=x.shape)
        ax.scatter(x + jitter, sub[shared].to_numpy(dtype=float), color=c, alpha=0.7, s=26,
                   marker=_MARKERS[i % len(_MARKERS)], edgecolors="white", linewidths=0.5,
                   label=f"{strategy} samples" + ("" if seed is None else f" (seed {seed})"))
    if grid is not None and not grid.empty:
        _require(grid, [lam, shared], "grid")
        gseeds = list(dict.fromkeys(grid["seed"])) if "seed" in grid.columns else [None]
        for i, seed in enumerate(gseeds):
            sub = grid if seed is None else grid[grid["seed"] == seed]
            sub = sub.sort_values(lam)
            ax.plot(sub[lam], sub[shared], color=c, lw=1.0, alpha=0.6, drawstyle="steps-mid",
                    label="derived along the λ grid" if i == 0 else None)
    hi = max(float(max_edges), float(np.nanmax(df[lam].to_numpy(dtype=float))))
    xs = np.linspace(0, hi, 100)
    ax.plot(xs, np.minimum(xs, max_edges), "k--", lw=1.2, label="ideal: shared = λ")
    ax.set_xlim(-0.5, hi + 0.5)
    ax.set_ylim(-0.5, max_edges + 0.5)
    ax.set_xlabel("λ (target number of edges shared with α*)")
    ax.set_ylabel(f"edges shared with α* (of {max_edges})")
    ax.set_title(title or "EdgeNES: shared edges vs λ")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


# -------------------------------------------------------------------------------- genotype cells

#: Edge colours by op family, so a cell's make-up reads at a glance.
_OP_COLORS = {
    "sep_conv": "#0072B2",
    "dil_conv": "#009E73",
    "max_pool": "#D55E00",
    "avg_pool": "#E69F00",
    "skip_connect": "#555555",
    "none": "#BBBBBB",
}


def _op_color(op: str) -> str:
    for prefix, c in _OP_COLORS.items():
        if op.startswith(prefix):
            return c
    return "#CC79A7"


def _node_positions(nodes: int) -> dict[int, tuple[float, float]]:
    """Cell inputs 0, 1 (c_{k-2}, c_{k-1}) up and down on the left, intermediate nodes 2.. in a
    row, output c_{k} (key -1) on the right."""
    pos = {0: (0.0, 1.8), 1: (0.0, -1.8)}
    for i in range(nodes):
        pos[i + 2] = (3.0 + 3.0 * i, 0.0)
    pos[-1] = (3.0 + 3.0 * nodes + 1.0, 0.0)
    return pos


def _arc_point(p0: np.ndarray, p1: np.ndarray, rad: float, at: float) -> tuple[np.ndarray, float]:
    """Point ``at`` (0..1) of matplotlib's arc3 edge p0 -> p1 (a quadratic Bezier with control
    point mid + rad * (dy, -dx)) and the angle of its tangent there, in degrees, kept upright."""
    d = p1 - p0
    ctrl = (p0 + p1) / 2 + rad * np.array([d[1], -d[0]])
    pt = (1 - at) ** 2 * p0 + 2 * (1 - at) * at * ctrl + at**2 * p1
    tangent = 2 * (1 - at) * (ctrl - p0) + 2 * at * (p1 - ctrl)
    angle = float(np.degrees(np.arctan2(tangent[1], tangent[0])))
    if angle > 90:
        angle -= 180
    elif angle < -90:
        angle += 180
    return pt, angle


def _overlap(a: Any, b: Any) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(0.0, w) * max(0.0, h)


def _place_label(ax: Axes, renderer: Any, p0: np.ndarray, p1: np.ndarray, rad: float, text: str,
                 color: str, candidates: Sequence[float], taken: list[Any]) -> None:
    """Write ``text`` along the edge at the first position in ``candidates`` whose box overlaps
    no label or node already drawn (else where it overlaps least). Aspect is equal, so data
    angles are screen angles."""
    best = None
    for at in candidates:
        pt, angle = _arc_point(p0, p1, rad, at)
        t = ax.text(pt[0], pt[1], text, fontsize=7.5, ha="center", va="center", color=color,
                    zorder=3, rotation=angle, rotation_mode="anchor",
                    bbox={"boxstyle": "round,pad=0.12", "fc": "white", "ec": color, "lw": 0.6,
                          "alpha": 0.95})
        box = t.get_window_extent(renderer).padded(5)  # the label box, plus breathing room
        cost = sum(_overlap(box, o) for o in taken)
        if best is None or cost < best[0]:
            if best is not None:
                best[1].remove()
            best = (cost, t, box)
        else:
            t.remove()
        if cost == 0:
            break
    assert best is not None
    taken.append(best[2])


def _draw_cell(ax: Axes, pairs: Sequence[tuple[str, int]], concat: Sequence[int], name: str) -> None:
    nodes = len(pairs) // 2
    pos = _node_positions(nodes)
    radius = 0.45
    labels = {0: "c_{k-2}", 1: "c_{k-1}", -1: "c_{k}"}
    xs = [p[0] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
    ax.set_ylim(-2.6, 2.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"{name} cell (dashed: concatenated into $c_{{k}}$)", fontsize=10)
    ax.apply_aspect()  # fix the data-to-pixel transform before measuring labels
    renderer = ax.figure.canvas.get_renderer()
    taken: list[Any] = []
    for key, (x, y) in pos.items():
        if key in (0, 1, -1):
            fc, txt = ("#FFF2CC" if key != -1 else "#D9EAD3"), f"${labels[key]}$"
        else:
            fc, txt = "#DDEBF7", str(key - 2)
        circle = Circle((x, y), radius, fc=fc, ec="#333333", lw=1.0, zorder=2)
        ax.add_patch(circle)
        ax.text(x, y, txt, ha="center", va="center", fontsize=10, zorder=4)
        taken.append(circle.get_window_extent(renderer))
    seen: dict[tuple[int, int], int] = {}
    edges = []
    for k, (op, inp) in enumerate(pairs):
        dst = k // 2 + 2
        p0, p1 = np.array(pos[inp]), np.array(pos[dst])
        dup = seen.get((inp, dst), 0)
        seen[(inp, dst)] = dup + 1
        if inp >= 2 and dst - inp > 1:
            # Node-to-node edges that skip a node arc above the row, higher the further they go.
            rad = -0.34 - 0.04 * (dst - inp - 2)
        elif inp < 2:
            # A long edge from a cell input bows outwards, clear of the nodes it passes.
            rad = 0.05 * (dst - 2) * (-1 if inp == 0 else 1)
        else:
            rad = 0.0
        rad += 0.22 * dup * (1 if inp != 0 else -1)  # a repeated (input, node) pair bends away
        c = _op_color(op)
        ax.add_patch(FancyArrowPatch(p0, p1, connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
                                     mutation_scale=12, color=c, lw=1.6, shrinkA=13, shrinkB=13,
                                     zorder=1))
        edges.append((p0, p1, rad, op, c, inp < 2))
    # Node-to-node labels first (they have the fewest good spots), then the fan from the inputs.
    for p0, p1, rad, op, c, from_input in sorted(edges, key=lambda e: e[5]):
        cands = (0.5, 0.35, 0.65, 0.25, 0.75, 0.18, 0.82) if from_input else (0.5, 0.4, 0.6, 0.3, 0.7)
        _place_label(ax, renderer, p0, p1, rad, op, c, cands, taken)
    out = np.array(pos[-1])
    for j, node in enumerate(sorted(concat, reverse=True)):
        p0 = np.array(pos[node])
        # Concatenation edges arc below the row so they do not cross the nodes they pass.
        rad = 0.0 if node == max(concat) else 0.12 + 0.02 * j
        ax.add_patch(FancyArrowPatch(p0, out, connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
                                     mutation_scale=10, color="#999999", lw=1.0, ls="--",
                                     shrinkA=13, shrinkB=13, zorder=0))


def plot_genotype(genotype: Genotype | str, path: str | Path, *, title: str | None = None) -> Path:
    """A drawing of a genotype's normal and reduction cells as DAGs: cell inputs c_{k-2} and
    c_{k-1}, intermediate nodes 0..n-1, output c_{k} (the concatenation, dashed edges), and the
    op on every edge (labels placed where they overlap no other label or node). Accepts a
    Genotype, its JSON or its DARTS repr string."""
    if isinstance(genotype, str):
        text = genotype.strip()
        genotype = Genotype.from_json(text) if text.startswith("{") else Genotype.parse(text)
    if not isinstance(genotype, Genotype):
        raise ValueError(
            f"genotype: expected a Genotype or its JSON/DARTS text, got {type(genotype).__name__}"
        )
    nodes = max(genotype.nodes, len(genotype.reduce) // 2)
    # A fixed layout (no constrained layout): labels are placed by measuring them, so the
    # data-to-pixel transform must not change after they are drawn.
    width = 0.62 * (3.0 * nodes + 5.4)
    fig = Figure(figsize=(width, 6.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.9 if title else 0.95, bottom=0.02, hspace=0.12)
    _draw_cell(axes[0], genotype.normal, genotype.normal_concat, "normal")
    _draw_cell(axes[1], genotype.reduce, genotype.reduce_concat, "reduction")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)
