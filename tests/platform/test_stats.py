import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from nestune import forward_select
from nestune.metrics import nll
from nestune.platform import stats as S


def _curves(runs: dict[tuple[str, int], list[tuple[float, float]]]) -> pd.DataFrame:
    rows = []
    for (strategy, seed), pts in runs.items():
        for i, (t, v) in enumerate(pts, start=1):
            rows.append({"strategy": strategy, "seed": seed, "members": i, "device_hours": t,
                         "nll": v, "error": v / 10})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ areas


def test_step_values_take_the_last_point_finished_at_or_before_t():
    v = S.step_values([1.0, 2.0, 4.0], [3.0, 2.0, 1.0], [0.5, 1.0, 1.5, 2.0, 3.9, 4.0, 9.0], initial=7.0)
    np.testing.assert_array_equal(v, [7.0, 3.0, 3.0, 2.0, 2.0, 1.0, 1.0])


def test_step_area_is_the_exact_integral_of_the_step_function():
    # 3 on [1, 2), 2 on [2, 4), 1 on [4, 5]
    assert S.curve_area([1, 2, 4], [3, 2, 1], 1.0, 5.0) == pytest.approx(3 + 4 + 1)
    # clipped window inside
    assert S.curve_area([1, 2, 4], [3, 2, 1], 1.5, 3.0) == pytest.approx(0.5 * 3 + 1.0 * 2)
    # initial value before the first point
    assert S.curve_area([1, 2], [3, 2], 0.0, 2.0, initial=10.0) == pytest.approx(10 + 3)
    # unsorted input is sorted first
    assert S.curve_area([4, 1, 2], [1, 3, 2], 1.0, 5.0) == pytest.approx(8)


def test_linear_area_is_the_trapezoid_between_points():
    assert S.curve_area([0, 2], [2, 0], 0.0, 2.0, method="linear") == pytest.approx(2.0)
    # held flat after the last point
    assert S.curve_area([0, 2], [2, 0], 0.0, 3.0, method="linear") == pytest.approx(2.0)
    # initial before the first point, then the trapezoid
    assert S.curve_area([1, 3], [2, 0], 0.0, 3.0, initial=5.0, method="linear") == pytest.approx(5 + 2)


def test_area_refuses_a_window_before_the_first_point_without_initial():
    with pytest.raises(ValueError, match="initial"):
        S.curve_area([1, 2], [3, 2], 0.0, 2.0)
    with pytest.raises(ValueError, match="method"):
        S.curve_area([1, 2], [3, 2], 1.0, 2.0, method="spline")
    assert S.curve_area([1, 2], [3, 2], 2.0, 1.0) == 0.0


def test_anytime_auc_clips_every_run_to_the_shortest_run():
    curves = _curves({
        ("a", 0): [(1.0, 2.0), (2.0, 1.0), (10.0, 0.1)],  # long run: clipped at 3
        ("b", 0): [(0.5, 3.0), (3.0, 2.0)],               # shortest final time: 3
    })
    auc = S.anytime_auc(curves, "nll", horizon="shortest")
    assert set(auc["end"]) == {3.0}
    assert set(auc["start"]) == {1.0}  # latest first finish: a's at 1.0
    assert auc.set_index("strategy")["final"].to_dict() == {"a": 10.0, "b": 3.0}
    a = auc.set_index("strategy").loc["a", "auc"]
    b = auc.set_index("strategy").loc["b", "auc"]
    assert a == pytest.approx(1 * 2.0 + 1 * 1.0)
    assert b == pytest.approx(2 * 3.0)  # b is 3.0 until its point at 3.0 = the end
    # with an initial value the window starts at 0 and a slow start costs
    auc0 = S.anytime_auc(curves, "nll", initial=5.0, horizon="shortest").set_index("strategy")["auc"]
    assert auc0["a"] == pytest.approx(5.0 + 2.0 + 1.0)
    assert auc0["b"] == pytest.approx(0.5 * 5.0 + 2.5 * 3.0)
    # normalised = time-average over the window
    n = S.anytime_auc(curves, "nll", initial=5.0, normalize=True,
                      horizon="shortest").set_index("strategy")["auc"]
    assert n["a"] == pytest.approx(8.0 / 3.0)
    # an explicit horizon
    h = S.anytime_auc(curves, "error", horizon=2.0).set_index("strategy")["auc"]
    assert h["a"] == pytest.approx(0.2)


def test_anytime_auc_by_default_runs_to_the_longest_run_holding_final_ensembles():
    curves = _curves({
        ("a", 0): [(1.0, 2.0), (2.0, 1.0), (10.0, 0.1)],
        ("b", 0): [(0.5, 3.0), (3.0, 2.0)],  # ends at 3, then holds 2.0 up to 10
    })
    auc = S.anytime_auc(curves, "nll", initial=5.0).set_index("strategy")
    assert set(auc["end"]) == {10.0} and set(auc["start"]) == {0.0}
    assert auc.loc["a", "auc"] == pytest.approx(1 * 5.0 + 1 * 2.0 + 8 * 1.0)
    assert auc.loc["b", "auc"] == pytest.approx(0.5 * 5.0 + 2.5 * 3.0 + 7 * 2.0)
    # the same with the linear rule: b is flat after its last point
    lin = S.anytime_auc(curves, "nll", initial=5.0, method="linear").set_index("strategy")
    assert lin.loc["b", "auc"] == pytest.approx(0.5 * 5.0 + 2.5 * 2.5 + 7 * 2.0)
    assert S.common_window(curves) == S.common_window(curves, horizon=None) == (1.0, 10.0)
    for bad in ("median", -1.0, math.nan, True):
        with pytest.raises(ValueError, match="horizon"):
            S.common_window(curves, horizon=bad)


def test_anytime_auc_with_an_empty_window_is_nan_not_an_error():
    curves = _curves({("a", 0): [(1.0, 2.0)], ("b", 0): [(5.0, 1.0)]})
    auc = S.anytime_auc(curves, "nll")
    assert auc["auc"].isna().all()


def test_anytime_auc_names_missing_columns():
    with pytest.raises(ValueError, match="device_hours"):
        S.anytime_auc(pd.DataFrame({"strategy": ["a"], "seed": [0], "nll": [1.0]}))


def test_uniform_value():
    assert S.uniform_value("nll", 10) == pytest.approx(math.log(10))
    assert S.uniform_value("error", 4) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="metric"):
        S.uniform_value("auc", 10)
    with pytest.raises(ValueError, match="num_classes"):
        S.uniform_value("nll", 0)


# ------------------------------------------------------------------------------- summary


def _table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for strategy, base in (("random", 0.90), ("nes_re", 0.93), ("deep_ens", 0.91)):
        for seed in range(3):
            acc = base + rng.normal(0, 0.005)
            rows.append({"strategy": strategy, "seed": seed, "accuracy": acc, "nll": 1 - acc,
                         "ece": 0.02, "brier": 0.1, "oracle_nll": 0.05, "disagreement": 0.1,
                         "best_member_accuracy": acc - 0.01, "avg_member_nll": 1.1 - acc,
                         "members": 10, "device_hours": 0.1})
    return pd.DataFrame(rows)


def test_summary_table_mean_and_sample_std_per_strategy():
    t = _table()
    s = S.summary_table(t)
    assert list(s["strategy"]) == ["random", "nes_re", "deep_ens"]
    assert list(s["n"]) == [3, 3, 3]
    r = t[t.strategy == "nes_re"]["accuracy"]
    row = s.set_index("strategy").loc["nes_re"]
    assert row["accuracy_mean"] == pytest.approx(r.mean())
    assert row["accuracy_std"] == pytest.approx(r.std(ddof=1))
    assert row["members_std"] == 0.0
    # one seed: std is NaN, formatted without ±
    one = S.summary_table(t[t.seed == 0], ["accuracy"])
    assert one["accuracy_std"].isna().all()
    f = S.format_mean_std(one)
    assert "±" not in f["accuracy"].iloc[0]
    f3 = S.format_mean_std(s, digits={"accuracy": 3})
    assert f3.set_index("strategy").loc["nes_re", "accuracy"].count("±") == 1


# ------------------------------------------------------------------------------- p-values


def test_welch_by_default_and_matches_scipy():
    t = _table()
    tests = S.pairwise_tests(t, "accuracy")
    assert len(tests) == 3 and set(tests["test"]) == {"welch"}
    row = tests[(tests.a == "random") & (tests.b == "nes_re")].iloc[0]
    ref = st.ttest_ind(t[t.strategy == "random"].accuracy, t[t.strategy == "nes_re"].accuracy,
                       equal_var=False)
    assert row.pvalue == pytest.approx(ref.pvalue)
    assert row.statistic == pytest.approx(ref.statistic)
    mat = S.pvalue_matrix(tests)
    assert mat.loc["random", "nes_re"] == mat.loc["nes_re", "random"] == pytest.approx(ref.pvalue)
    assert np.isnan(mat.loc["random", "random"])


def test_paired_when_seeds_are_shared():
    t = _table()
    tests = S.pairwise_tests(t, "accuracy", paired="auto")
    assert set(tests["test"]) == {"paired"}
    a = t[t.strategy == "random"].sort_values("seed").accuracy.to_numpy()
    b = t[t.strategy == "nes_re"].sort_values("seed").accuracy.to_numpy()
    row = tests[(tests.a == "random") & (tests.b == "nes_re")].iloc[0]
    assert row.pvalue == pytest.approx(st.ttest_rel(a, b).pvalue)
    # auto falls back to Welch when the seeds differ
    t2 = t.copy()
    t2.loc[t2.strategy == "deep_ens", "seed"] += 10
    auto = S.pairwise_tests(t2, "accuracy", paired="auto").set_index(["a", "b"])
    assert auto.loc[("random", "deep_ens"), "test"] == "welch"
    assert auto.loc[("random", "nes_re"), "test"] == "paired"
    # paired=True with no shared seeds: NaN and a note
    forced = S.pairwise_tests(t2, "accuracy", paired=True).set_index(["a", "b"])
    assert np.isnan(forced.loc[("random", "deep_ens"), "pvalue"])
    assert "shared seeds" in forced.loc[("random", "deep_ens"), "note"]


def test_too_few_seeds_or_no_variance_give_nan_with_a_note():
    t = _table()
    one = t[t.seed == 0]
    tests = S.pairwise_tests(one, "accuracy")
    assert tests["pvalue"].isna().all()
    assert tests["note"].str.contains(">= 2 seeds").all()
    const = t.copy()
    const["accuracy"] = 0.5
    c = S.pairwise_tests(const, "accuracy")
    assert c["pvalue"].isna().all() and c["note"].str.contains("variance").all()
    cp = S.pairwise_tests(const, "accuracy", paired=True)
    assert cp["pvalue"].isna().all() and cp["note"].str.contains("variance").all()
    with pytest.raises(ValueError, match="paired"):
        S.pairwise_tests(t, "accuracy", paired="yes")
    dup = pd.concat([t, t])
    with pytest.raises(ValueError, match="one row per"):
        S.pairwise_tests(dup, "accuracy")


def test_auc_feeds_the_tests():
    rng = np.random.default_rng(1)
    runs = {}
    for strategy, level in (("darts_ens", 3.0), ("edgenes", 2.7)):
        for seed in range(4):
            pts = [(0.1 * i, level / i + rng.normal(0, 0.05)) for i in range(1, 8)]
            runs[(strategy, seed)] = pts
    auc = S.anytime_auc(_curves(runs), "nll")
    tests = S.pairwise_tests(auc, "auc", paired="auto")
    assert tests.iloc[0]["test"] == "paired"
    assert 0.0 <= tests.iloc[0]["pvalue"] < 0.05


# ------------------------------------------------------------------------- ensemble size


def _pool(k=6, n=60, c=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, size=n)
    logits = rng.normal(size=(k, n, c))
    logits[:, np.arange(n), y] += rng.uniform(0.0, 2.5, size=(k, 1))
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return p.astype(np.float16), y


def test_ensemble_size_curve_scores_prefixes_of_one_forward_selection():
    val, yv = _pool(seed=0)
    test, yt = _pool(seed=1)
    curve = S.ensemble_size_curve(val, yv, test, yt)
    assert list(curve["size"]) == list(range(1, 7))
    order = forward_select(val, yv, 6)
    for m in (1, 3, 6):
        ens = test[order[:m]].astype(np.float64).mean(0)
        assert curve.loc[m - 1, "nll"] == pytest.approx(nll(ens, yt))
    assert curve.loc[0, "disagreement"] == 0.0
    assert (curve["accuracy"] + curve["error"]).round(12).eq(1.0).all()
    # with replacement the size may exceed K
    rep = S.ensemble_size_curve(val, yv, test, yt, 9, replacement=True)
    assert len(rep) == 9 and rep["unique"].max() <= 6
    # without, it is capped at K
    assert len(S.ensemble_size_curve(val, yv, test, yt, 20)) == 6


def test_ensemble_size_curve_validates_shapes():
    val, yv = _pool()
    with pytest.raises(ValueError, match="test_probs"):
        S.ensemble_size_curve(val, yv, val[:3], yv)
    with pytest.raises(ValueError, match="max_size"):
        S.ensemble_size_curve(val, yv, val, yv, 0)
