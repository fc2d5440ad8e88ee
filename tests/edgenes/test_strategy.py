"""The ``edgenes`` strategy: job sequence (DARTS search → EdgeNES search → distinct members with
their λ), retries, state round trip, cost split, and selection on validation only."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json

import numpy as np
import pytest
import torch

import nestune.platform.ensemble as ensemble
import nestune.platform.study as study
from nestune.edgenes.strategy import EdgeNES, exhaustive_select, member_disagreement
from nestune.metrics import disagreement, nll
from nestune.platform.data import load_data
from nestune.platform.search import SEARCH_METHODS, run_search
from nestune.platform.strategy import FINISHED, WAIT, StrategyContext, get_strategy, make_strategy
from nestune.search_spaces.darts import DARTS_V1, DARTS_V2, DartsSpace

SPACE = DartsSpace()


def _strategy(**hparams) -> EdgeNES:
    s = make_strategy("edgenes", **hparams)
    s.setup(StrategyContext(space=SPACE, seed=0, ensemble_size=3))
    return s


def _search_result(genotype: str, seconds: float, extra: dict | None = None) -> dict:
    return {"kind": "search", "genotype": genotype, "device_seconds": seconds, "extra": extra or {},
            "trial_id": "t"}


def _samples() -> list[dict]:
    rng = np.random.default_rng(0)
    genos = [SPACE.sample(rng) for _ in range(4)]
    # Six λ samples, two of them giving a genotype seen before.
    picks = [0, 1, 0, 2, 3, 2]
    return [{"lambda": float(i * 2.5), "genotype": genos[k].to_json(),
             "shared_edges": SPACE.common_edges(DARTS_V2, genos[k])} for i, k in enumerate(picks)]


def _extra() -> dict:
    return {"samples": _samples(), "lambdas": [0.0, 8.0, 16.0], "shared_edges": [0, 8, 16],
            "spearman": 1.0, "mean_abs_gap": 0.0, "lambda_max": 16.0, "plot_png": "iVBORw0KGgo="}


def test_registered_as_strategy_and_search_method() -> None:
    assert get_strategy("edgenes") is EdgeNES
    assert "edgenes" in SEARCH_METHODS


def test_job_sequence_darts_then_edgenes_then_distinct_members() -> None:
    s = _strategy(darts_epochs=3, search_epochs=4, num_samples=6, search_options={"grid_points": 9})
    darts = s.ask()
    assert darts["kind"] == "search" and darts["method"] == "darts"
    assert (darts["epochs"], darts["C"], darts["layers"], darts["order"]) == (3, 8, 5, 1)
    assert s.ask() == WAIT  # everything else needs α*
    s.tell(darts, _search_result(DARTS_V2.to_json(), 100.0))

    search = s.ask()
    assert search["kind"] == "search" and search["method"] == "edgenes"
    assert search["alpha_star"] == DARTS_V2.to_json()
    assert (search["epochs"], search["num_samples"], search["grid_points"]) == (4, 6, 9)
    assert search["seed"] != darts["seed"]
    json.dumps(search)  # a Tune trial config, logged as params
    assert s.ask() == WAIT
    s.tell(search, _search_result(DARTS_V1.to_json(), 50.0, _extra()))

    members = []
    while True:
        job = s.ask()
        if job == WAIT:
            break
        members.append(job)
    samples = _samples()
    assert len(members) == 4  # 6 samples, 2 duplicates dropped
    assert [m["genotype"] for m in members] == list(dict.fromkeys(x["genotype"] for x in samples))
    for m in members:
        first = next(x for x in samples if x["genotype"] == m["genotype"])
        assert m["kind"] == "member"
        assert m["lambda"] == first["lambda"] and m["shared_edges"] == first["shared_edges"]
    assert len({m["seed"] for m in members}) == 4
    for i, m in enumerate(members):
        assert s.ask() == WAIT
        s.tell(m, {"kind": "member", "device_seconds": 10.0 + i, "val_probs": np.ones((2, 2)) / 2})
    assert s.ask() == FINISHED
    assert s.cost_split() == {"darts": 100.0, "edgenes": 50.0, "members": 46.0}
    assert s.diversity["spearman"] == 1.0 and s.diversity["distinct"] == 4
    assert s.artifacts()["shared_edges_vs_lambda.png"].startswith(b"\x89PNG")


def test_given_alpha_star_skips_the_darts_search() -> None:
    s = _strategy(alpha_star=str(DARTS_V2))
    job = s.ask()
    assert job["method"] == "edgenes" and job["alpha_star"] == DARTS_V2.to_json()
    with pytest.raises(ValueError, match="alpha_star"):
        make_strategy("edgenes", alpha_star="nonsense")


def test_bad_hyperparameters_name_the_field() -> None:
    with pytest.raises(ValueError, match="search_options"):
        make_strategy("edgenes", search_options={"epochz": 3})
    with pytest.raises(ValueError, match="temp_schedule"):
        make_strategy("edgenes", temp_schedule="cosine")
    with pytest.raises(ValueError, match="num_samples"):
        make_strategy("edgenes", num_samples=0)
    with pytest.raises(ValueError, match="hypernet"):
        make_strategy("edgenes", hypernet="rnn")
    for name in ("darts_layers", "search_layers"):  # fewer than 3 cells: no normal cell
        with pytest.raises(ValueError, match=f"EdgeNES.{name}"):
            make_strategy("edgenes", **{name: 2})


def test_failed_search_is_retried_with_a_new_seed_then_given_up() -> None:
    s = _strategy(max_retries=1)
    first = s.ask()
    s.tell(first, {"kind": "search", "error": "boom", "device_seconds": 5.0})
    second = s.ask()
    assert second["method"] == "darts" and second["seed"] != first["seed"]
    s.tell(second, {"kind": "search", "error": "boom again", "device_seconds": 5.0})
    assert s.ask() == FINISHED
    assert s.cost_split()["darts"] == 10.0  # failed searches were paid for


def test_failed_member_is_dropped() -> None:
    s = _strategy(alpha_star=DARTS_V2.to_json())
    search = s.ask()
    s.tell(search, _search_result(DARTS_V2.to_json(), 1.0, _extra()))
    jobs = [s.ask() for _ in range(4)]
    s.tell(jobs[0], {"kind": "member", "error": "diverged", "device_seconds": 1.0})
    for j in jobs[1:]:
        s.tell(j, {"kind": "member", "device_seconds": 1.0})
    assert s.ask() == FINISHED
    assert [m["status"] for m in s.members] == ["failed", "ok", "ok", "ok"]
    assert all("lambda" in m and "shared_edges" in m for m in s.members)


def test_state_dict_round_trip_continues_identically() -> None:
    a = _strategy()
    darts = a.ask()
    a.tell(darts, _search_result(DARTS_V2.to_json(), 3.0))
    search = a.ask()
    a.tell(search, _search_result(DARTS_V2.to_json(), 4.0, _extra()))
    first = a.ask()
    state = json.loads(json.dumps(a.state_dict()))  # JSON-able, as the runner saves it

    b = _strategy()
    b.load_state_dict(state)
    assert b.state_dict() == state
    rest_a = [a.ask() for _ in range(3)]
    rest_b = [b.ask() for _ in range(3)]
    assert rest_a == rest_b
    for s in (a, b):
        for j in [first, *rest_a]:
            s.tell(j, {"kind": "member", "device_seconds": 2.0})
        assert s.ask() == FINISHED
    assert a.cost_split() == b.cost_split() == {"darts": 3.0, "edgenes": 4.0, "members": 8.0}


# -- selection -------------------------------------------------------------------------------


def _pool(true_class: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Two-class probabilities whose true-class column is ``true_class`` (K, N); labels alternate."""
    p = np.asarray(true_class)
    k, n = p.shape
    labels = np.arange(n) % 2
    probs = np.empty((k, n, 2))
    probs[:, np.arange(n), labels] = p
    probs[:, np.arange(n), 1 - labels] = 1 - p
    return probs, labels


def test_exhaustive_selection_finds_the_best_subset_where_greedy_does_not() -> None:
    # A is the best single member; B and C are complementary, and together beat any pair with A.
    h = 10
    a = [0.7] * (2 * h)
    b = [0.99] * h + [0.45] * h
    c = [0.45] * h + [0.99] * h
    val_probs, labels = _pool([a, b, c, [0.5] * (2 * h)])
    best = min(itertools.combinations(range(4), 2),
               key=lambda idx: nll(val_probs[list(idx)].mean(0), labels))
    assert set(best) == {1, 2}
    assert exhaustive_select(val_probs, labels, 2) == [1, 2]
    assert 0 in ensemble.forward_select(val_probs, labels, 2)  # greedy starts from A
    s = _strategy()
    assert s.select(val_probs, labels, 2) == [1, 2]
    assert s.select(val_probs, labels, 10) == [0, 1, 2, 3]  # size capped at the pool


def test_select_uses_forward_select_when_there_are_too_many_subsets(monkeypatch) -> None:
    calls = []
    real = ensemble.forward_select

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(ensemble, "forward_select", spy)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(12, 30))
    labels = rng.integers(0, 3, 30)
    s = _strategy(exhaustive_limit=100)  # C(12, 3) = 220 > 100
    picked = s.select(probs, labels, 3)
    assert calls == [3] and len(picked) == 3
    calls.clear()
    s = _strategy(exhaustive_limit=220)
    assert s.select(probs, labels, 3) == exhaustive_select(probs, labels, 3)
    assert calls == []


def test_select_sees_validation_data_only() -> None:
    # The contract: the strategy's select gets the pool's validation probabilities and labels,
    # nothing that could hold test data.
    params = list(inspect.signature(EdgeNES.select).parameters)
    assert params == ["self", "val_probs", "labels", "size"]
    with pytest.raises(ValueError, match="labels"):
        exhaustive_select(np.full((2, 4, 2), 0.5), np.zeros(5, dtype=int), 1)


def test_the_study_selects_the_ensemble_on_validation_not_test() -> None:
    """The reference selects on the test split. Here the pool's validation predictions pick
    the ensemble and the test predictions only score it: a pool whose best pair on
    validation, {1, 2}, is not its best pair on test, {0, 3}."""
    h = 10
    val_probs, labels = _pool([[0.7] * (2 * h), [0.99] * h + [0.45] * h, [0.45] * h + [0.99] * h,
                               [0.5] * (2 * h)])
    test_probs, test_labels = _pool([[0.99] * h + [0.45] * h, [0.6] * (2 * h), [0.6] * (2 * h),
                                     [0.45] * h + [0.99] * h])
    assert exhaustive_select(val_probs, labels, 2) == [1, 2]
    assert exhaustive_select(test_probs, test_labels, 2) == [0, 3]
    s = _strategy()
    chosen, scores = study.score_ensemble(s, val_probs, list(test_probs), labels, test_labels, 2)
    assert sorted(chosen) == [1, 2]
    assert scores["nll"] == pytest.approx(nll(test_probs[[1, 2]].mean(0), test_labels))


def test_member_disagreement_averages_to_the_pool_disagreement() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=(5, 50))
    per_member = member_disagreement(probs)
    assert per_member.shape == (5,)
    assert per_member.mean() == pytest.approx(disagreement(probs))
    assert member_disagreement(probs[:1]).tolist() == [0.0]


# -- end to end, tiny --------------------------------------------------------------------------


def test_edgenes_search_job_feeds_member_jobs(monkeypatch) -> None:
    """The strategy's own search job runs through run_search and its result plans members
    that carry λ and shared edges (a tiny search: correctness, not quality)."""
    data = load_data("digits", subset=200)
    data = dataclasses.replace(data, train=type(data.train)(data.train.x[:96], data.train.y[:96]))
    s = _strategy(alpha_star=DARTS_V2.to_json(), search_epochs=1, search_C=4, search_layers=3,
                  search_batch_size=16, num_samples=6, search_options={"grid_points": 5})
    job = s.ask()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_search(job, data, "cpu")
    finally:
        torch.set_num_threads(before)
    s.tell(job, {**result, "trial_id": "t1"})
    members = []
    while (m := s.ask()) != WAIT:
        members.append(m)
    samples = result["extra"]["samples"]
    assert 1 <= len(members) <= 6
    assert len(members) == len({x["genotype"] for x in samples})
    for m in members:
        g = SPACE.validate(type(DARTS_V2).from_json(m["genotype"]))
        assert m["shared_edges"] == SPACE.common_edges(DARTS_V2, g)
        assert 0.0 <= m["lambda"] <= SPACE.arch_edges
    assert s.cost_split()["edgenes"] == pytest.approx(result["device_seconds"])


def test_darts_search_result_gives_alpha_star() -> None:
    """The DARTS search job the strategy issues runs as the darts method reads it, and its
    result becomes α* of the EdgeNES search job (tiny: correctness, not quality)."""
    pytest.importorskip("nestune.baselines.darts")
    if "darts" not in SEARCH_METHODS:
        pytest.skip("the darts search method is not registered")
    data = load_data("digits", subset=200)
    data = dataclasses.replace(data, train=type(data.train)(data.train.x[:64], data.train.y[:64]))
    s = _strategy(darts_epochs=1, darts_C=4, darts_layers=3, darts_batch_size=16)
    job = s.ask()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_search(job, data, "cpu")
    finally:
        torch.set_num_threads(before)
    s.tell(job, {**result, "trial_id": "t0"})
    search = s.ask()
    assert search["method"] == "edgenes" and search["alpha_star"] == result["genotype"]
    SPACE.validate(type(DARTS_V2).from_json(search["alpha_star"]))
    assert s.cost_split()["darts"] == pytest.approx(result["device_seconds"])
