import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from nestune.platform import plots as P
from nestune.search_spaces.darts import DartsSpace
from nestune.search_spaces.genotype import DARTS_V2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def _has_color(path, color: str, tol: float = 0.02) -> bool:
    img = imread(path)[..., :3]
    return bool(np.any(np.all(np.abs(img - np.array(to_rgb(color))) < tol, axis=-1)))


def _curves(strategies=("random", "nes_re"), seeds=3):
    rng = np.random.default_rng(0)
    rows = []
    for s in strategies:
        for seed in range(seeds):
            t = 0.0
            for m in range(1, 9):
                t += rng.uniform(0.01, 0.02)
                nll = 0.4 + 0.5 / m + rng.normal(0, 0.02)
                rows.append({"strategy": s, "seed": seed, "members": m, "device_hours": t,
                             "nll": nll, "error": nll / 5})
    return pd.DataFrame(rows)


def test_every_registered_strategy_has_its_own_fixed_colour():
    names = ["random", "nes_re", "deep_ens", "tpe", "darts", "darts_ens", "xnas", "edgenes"]
    assert set(names) <= set(P.STRATEGY_COLORS)
    colours = [P.color_for(n) for n in names]
    assert len(set(colours)) == len(colours)
    # unknown names get a fallback that depends only on the name
    assert P.color_for("my_strategy") == P.color_for("my_strategy")
    assert P.color_for("my_strategy") in P.FALLBACK_COLORS
    assert not set(P.FALLBACK_COLORS) & set(P.STRATEGY_COLORS.values())


def test_time_unit_picks_a_readable_scale():
    assert P.time_unit(5.0) == (1.0, "device-hours")
    assert P.time_unit(0.2) == (60.0, "device-minutes")
    assert P.time_unit(0.001) == (3600.0, "device-seconds")


def test_anytime_plot_uses_the_strategy_colours(tmp_path):
    path = P.plot_anytime(_curves(), tmp_path / "sub" / "anytime.png", horizon=0.1, title="t")
    assert path.is_file() and _is_png(path)
    assert _has_color(path, P.STRATEGY_COLORS["nes_re"])
    assert _has_color(path, P.STRATEGY_COLORS["random"])
    assert not _has_color(path, P.STRATEGY_COLORS["edgenes"])


def test_anytime_plot_handles_one_seed_and_unknown_strategies(tmp_path):
    c = _curves(("edgenes", "brand_new"), seeds=1)
    path = P.plot_anytime(c, tmp_path / "a.png", metrics=("nll",))
    assert _has_color(path, P.color_for("brand_new"))
    with pytest.raises(ValueError, match="device_hours"):
        P.plot_anytime(c.drop(columns="device_hours"), tmp_path / "b.png")
    with pytest.raises(ValueError, match="empty"):
        P.plot_anytime(c.iloc[:0], tmp_path / "b.png")


def test_ensemble_size_and_shift_plots(tmp_path):
    rows = [{"strategy": s, "seed": seed, "size": m, "nll": 1 / m + seed * 0.01, "error": 0.1 / m}
            for s in ("random", "deep_ens") for seed in range(2) for m in range(1, 6)]
    p = P.plot_ensemble_size(pd.DataFrame(rows), tmp_path / "size.png")
    assert _is_png(p) and _has_color(p, P.STRATEGY_COLORS["deep_ens"])

    summary = pd.DataFrame([
        {"strategy": s, "severity": sev, "nll_mean": 0.3 + 0.2 * sev, "nll_std": 0.02,
         "error_mean": 0.05 * sev, "error_std": np.nan, "ece_mean": 0.01 * sev, "ece_std": 0.0}
        for s in ("random", "edgenes") for sev in range(6)
    ])
    p = P.plot_shift(summary, tmp_path / "shift.png")
    assert _is_png(p) and _has_color(p, P.STRATEGY_COLORS["edgenes"])

    per = pd.DataFrame([
        {"strategy": s, "seed": 0, "corruption": c, "severity": sev, "nll": 0.3 + 0.1 * sev}
        for s in ("random", "edgenes") for c in ("jpeg", "contrast", "pixelate") for sev in range(6)
    ])
    p = P.plot_shift_by_corruption(per, tmp_path / "shift_c.png")
    assert _is_png(p)


def test_shared_edges_plot(tmp_path):
    rng = np.random.default_rng(0)
    lam = rng.integers(0, 17, size=30)
    df = pd.DataFrame({"lambda": lam, "shared_edges": np.clip(lam + rng.integers(-2, 3, 30), 0, 16),
                       "seed": np.repeat([0, 1, 2], 10)})
    grid = pd.DataFrame({"lambda": [0, 8, 16], "shared_edges": [1, 7, 16]})
    p = P.plot_shared_edges(df, tmp_path / "lam.png", grid=grid)
    assert _is_png(p) and _has_color(p, P.STRATEGY_COLORS["edgenes"], tol=0.1)
    with pytest.raises(ValueError, match="shared_edges"):
        P.plot_shared_edges(df.drop(columns="shared_edges"), tmp_path / "x.png")


@pytest.mark.parametrize("form", ["genotype", "json", "darts"])
def test_genotype_drawing(tmp_path, form):
    g = {"genotype": DARTS_V2, "json": DARTS_V2.to_json(), "darts": str(DARTS_V2)}[form]
    p = P.plot_genotype(g, tmp_path / "g.png", title="DARTS_V2")
    assert _is_png(p)
    img = imread(p)
    assert img.shape[1] > img.shape[0]  # two cells stacked, each wider than tall


def test_genotype_drawing_of_random_genotypes_and_bad_input(tmp_path):
    space = DartsSpace()
    for seed in range(3):
        assert _is_png(P.plot_genotype(space.sample(seed), tmp_path / f"r{seed}.png"))
    with pytest.raises(ValueError, match="genotype"):
        P.plot_genotype(42, tmp_path / "x.png")


def test_plots_do_not_touch_pyplot():
    # The report runs in notebooks and Ray workers: no global backend switch, no open figures.
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()


def test_anytime_plot_shows_a_one_point_run_and_final_values(tmp_path, monkeypatch):
    # darts has one finished ensemble: a step curve of one point draws no line, so the run must
    # still show up (its marker and the dotted hold of its final value)
    c = pd.concat([_curves(("random",), seeds=1),
                   pd.DataFrame([{"strategy": "darts", "seed": 0, "members": 1, "device_hours": 0.05,
                                  "nll": 0.7, "error": 0.1}])], ignore_index=True)
    figs = []
    save = P._save
    monkeypatch.setattr(P, "_save", lambda fig, path: figs.append(fig) or save(fig, path))
    path = P.plot_anytime(c, tmp_path / "one.png", horizon=float(c.device_hours.max()))
    assert _has_color(path, P.STRATEGY_COLORS["darts"])
    fig = figs[0]
    for ax in fig.axes:
        drawn = [ln for ln in ax.lines if to_rgb(ln.get_color()) == to_rgb(P.STRATEGY_COLORS["darts"])]
        assert any(ln.get_marker() not in (None, "None", "") or len(ln.get_xdata()) >= 2 for ln in drawn)
    # one legend for the figure, outside the panels, so no panel's curves sit under it
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["random (n=1)", "darts (n=1)", "end of AUC window"]
    for ax in fig.axes:
        assert "device-" in ax.get_xlabel() and ax.get_ylabel()
