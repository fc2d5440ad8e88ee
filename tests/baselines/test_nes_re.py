"""NES-RE (``nes_re``, Zaidi et al. 2021, Alg. 1) on a toy objective, without training.

A fake trainer turns a job into validation probabilities whose true-class logit grows with the
genotype's share of ``sep_conv`` ops, plus noise seeded by the job's seed, so members differ
and ensembles of them beat their members. The tests check the algorithm's lines: P random
initial members, parents from ForwardSelect(population, m), children one mutation away,
aging, failed members kept out, and that it finds better ensembles than random search.
"""

import pickle

import numpy as np
import pytest

import nestune.baselines.nes_re as nes_re_module
from nestune import forward_select
from nestune.baselines.nes_re import NesRE
from nestune.metrics import nll
from nestune.platform.strategy import FINISHED, WAIT, StrategyContext, get_strategy, make_strategy
from nestune.search_spaces import DartsSpace, Genotype

SPACE = DartsSpace()
N, C = 200, 10
LABELS = np.random.default_rng(123).integers(C, size=N)


def quality(genotype):
    """The toy objective: the share of sep_conv ops among the 16 edges."""
    return sum(op.startswith("sep_conv") for op, _ in genotype.normal + genotype.reduce) / 16


def fake_result(job):
    g = Genotype.from_json(job["genotype"])
    r = np.random.default_rng(job["seed"])
    logits = r.normal(0.0, 1.0, (N, C))
    logits[np.arange(N), LABELS] += 4.0 * quality(g)
    p = np.exp(logits)
    p = (p / p.sum(axis=1, keepdims=True)).astype(np.float16)
    return {
        "kind": "member",
        "genotype": job["genotype"],
        "val_probs": p,
        "metrics": {"val_nll": nll(p, LABELS)},
        "device_seconds": 1.0,
    }


def make(seed=0, **hparams):
    s = make_strategy("nes_re", **hparams)
    s.setup(StrategyContext(space=SPACE, seed=seed, ensemble_size=5, val_labels=LABELS))
    return s


class Driver:
    """Asks and tells like a runner with ``concurrency`` trials in flight, telling the oldest
    first; ``fail(job)`` decides which jobs fail. Records every job asked, by member_id."""

    def __init__(self, strategy, concurrency=1, fail=lambda job: False):
        self.s, self.concurrency, self.fail = strategy, concurrency, fail
        self.in_flight, self.jobs, self.told = [], {}, []

    def step(self):
        """One ask (and one tell when the flight is full or the strategy waits)."""
        job = self.s.ask()
        if isinstance(job, dict):
            self.jobs[job["member_id"]] = job
            self.in_flight.append(job)
        if self.in_flight and (len(self.in_flight) >= self.concurrency or job == WAIT):
            done = self.in_flight.pop(0)
            result = {"error": "diverged"} if self.fail(done) else fake_result(done)
            self.s.tell(done, result)
            self.told.append((done, result))
        return job

    def run_until(self, members):
        while sum("error" not in r for _, r in self.told) < members:
            self.step()
        return self


def pool_ensemble_nll(driver, size=5):
    pool = np.stack([r["val_probs"] for _, r in driver.told if "error" not in r])
    idx = forward_select(pool, LABELS, size)
    return nll(pool[idx].astype(np.float64).mean(axis=0), LABELS)


def test_registered_with_paper_hyperparameters_validated():
    assert get_strategy("nes_re") is NesRE
    assert NesRE().hparams() == {"population": 10, "candidates": 5, "max_members": None}
    with pytest.raises(ValueError, match="NesRE.candidates"):
        NesRE(population=4, candidates=5)
    with pytest.raises(ValueError, match="NesRE.population"):
        NesRE(population=0, candidates=1)
    with pytest.raises(ValueError, match="population"):
        make_strategy("nes_re", population=2.5)
    with pytest.raises(ValueError, match="val_labels"):
        NesRE().setup(StrategyContext(space=SPACE, seed=0, ensemble_size=5))


def test_first_p_asks_are_random_members_then_it_waits_for_a_population():
    s = make(population=4, candidates=2)
    jobs = [s.ask() for _ in range(4)]
    assert all("parent_id" not in j for j in jobs)
    assert len({j["genotype"] for j in jobs}) == 4
    assert s.ask() == WAIT  # P asked, no result in yet: nothing to select parents from
    s.tell(jobs[2], fake_result(jobs[2]))
    child = s.ask()  # asynchronous: evolve from the population as it stands (one member)
    assert child["parent_id"] == jobs[2]["member_id"]
    assert SPACE.common_edges(
        Genotype.from_json(child["genotype"]), Genotype.from_json(jobs[2]["genotype"])
    ) == SPACE.arch_edges - 1


def test_population_keeps_p_members_and_ages_out_the_oldest():
    P = 6
    d = Driver(make(seed=1, population=P, candidates=3), concurrency=3)
    arrivals = []
    for _ in range(40):
        d.step()
        arrivals = [j["member_id"] for j, r in d.told if "error" not in r]
        # Aging: the population is exactly the last P arrivals, oldest first.
        assert d.s.population_ids == arrivals[-P:]
    assert len(arrivals) > 3 * P and len(d.s.population_ids) == P


def test_parents_are_drawn_from_forward_select_of_the_population(monkeypatch):
    calls = []

    def spy(val_probs, labels, size, replacement=False):
        chosen = forward_select(val_probs, labels, size, replacement)
        calls.append((np.asarray(val_probs), size, chosen))
        return chosen

    monkeypatch.setattr(nes_re_module, "forward_select", spy)
    P, m = 8, 3
    s = make(seed=2, population=P, candidates=m)
    d = Driver(s, concurrency=2)
    children = first_picks = 0
    for _ in range(80):
        population = list(s.population_ids)
        probs = {j["member_id"]: r["val_probs"] for j, r in d.told if "error" not in r}
        n_calls = len(calls)
        job = d.step()
        if not (isinstance(job, dict) and "parent_id" in job):
            assert len(calls) == n_calls  # random initial members need no selection
            continue
        assert len(calls) == n_calls + 1
        val_probs, size, chosen = calls[-1]
        # ForwardSelect ran on exactly the population's validation predictions, for m members.
        assert size == min(m, len(population))
        np.testing.assert_array_equal(val_probs, np.stack([probs[mid] for mid in population]))
        candidates = [population[i] for i in chosen]
        assert job["parent_id"] in candidates
        children += 1
        first_picks += job["parent_id"] == candidates[0]
    # The parent is uniform among the m candidates, not always ForwardSelect's first pick.
    assert children > 60
    assert 0.15 < first_picks / children < 0.55, (first_picks, children)


def test_children_are_one_mutation_away_from_their_parent():
    d = Driver(make(seed=3, population=5, candidates=2), concurrency=2).run_until(40)
    children = [j for j in d.jobs.values() if "parent_id" in j]
    assert len(children) >= 30
    for child in children:
        parent = d.jobs[child["parent_id"]]
        a, b = Genotype.from_json(child["genotype"]), Genotype.from_json(parent["genotype"])
        SPACE.validate(a)
        assert SPACE.common_edges(a, b) == SPACE.arch_edges - 1


def test_failed_members_stay_out_of_the_population_and_evolution_goes_on():
    P = 5
    d = Driver(make(seed=4, population=P, candidates=2), concurrency=2,
               fail=lambda job: job["member_id"] % 3 == 0)
    d.run_until(30)
    failed = {j["member_id"] for j, r in d.told if "error" in r}
    assert failed and not failed & set(d.s.population_ids)
    assert not any(d.jobs[j["member_id"]].get("parent_id") in failed for j in d.jobs.values())
    assert len(d.s.population_ids) == P
    statuses = {h["member_id"]: h["status"] for h in d.s.history}
    assert {k for k, v in statuses.items() if v == "failed"} == failed


def test_failed_initial_members_are_replaced_by_random_ones():
    P = 4
    # Sequentially: the first P members that train are all random, though two initial ones fail.
    d = Driver(make(seed=5, population=P, candidates=2), fail=lambda job: job["member_id"] in (0, 2))
    d.run_until(P)
    assert [j.get("parent_id") for j, r in d.told if "error" not in r] == [None] * P
    assert len(d.told) == P + 2
    # Every initial member failing does not leave the strategy waiting on an empty population.
    s = make(seed=6, population=P, candidates=2)
    first = [s.ask() for _ in range(P)]
    assert s.ask() == WAIT
    for job in first:
        s.tell(job, {"error": "CUDA out of memory"})
    again = s.ask()
    assert isinstance(again, dict) and "parent_id" not in again
    assert again["member_id"] == P


def test_a_member_with_non_finite_probabilities_counts_as_failed():
    s = make(population=2, candidates=1)
    a, b = s.ask(), s.ask()
    bad = fake_result(a)
    bad["val_probs"] = np.full((N, C), np.nan, dtype=np.float16)
    s.tell(a, bad)
    s.tell(b, fake_result(b))
    assert s.population_ids == [b["member_id"]]
    assert "parent_id" not in s.ask()  # the failed initial member's random replacement
    assert s.ask()["parent_id"] == b["member_id"]
    with pytest.raises(ValueError, match=r"val_probs.*expected shape"):
        c = s.ask()
        s.tell(c, {**fake_result(c), "val_probs": np.ones((N - 1, C), dtype=np.float16) / C})


def test_max_members_finishes():
    d = Driver(make(population=3, candidates=2, max_members=7), concurrency=2)
    while d.step() != FINISHED:
        pass
    assert sum("error" not in r for _, r in d.told) == 7


def test_better_ensembles_than_random_search_on_the_toy_objective():
    nes, rnd = [], []
    for seed in range(3):
        a = Driver(make(seed=seed, population=10, candidates=5), concurrency=2).run_until(50)
        b = Driver(make_strategy("random"), concurrency=2)
        b.s.setup(StrategyContext(space=SPACE, seed=seed, ensemble_size=5))
        b.run_until(50)
        mean_quality = [
            np.mean([quality(Genotype.from_json(j["genotype"])) for j, _ in x.told]) for x in (a, b)
        ]
        assert mean_quality[0] > mean_quality[1] + 0.05, (seed, mean_quality)
        nes.append(pool_ensemble_nll(a))
        rnd.append(pool_ensemble_nll(b))
    assert np.mean(nes) < np.mean(rnd) - 0.05, (nes, rnd)


def test_restored_strategy_continues_as_the_uninterrupted_one():
    fail = lambda job: job["member_id"] % 5 == 4  # noqa: E731
    a = Driver(make(seed=9, population=5, candidates=3), concurrency=3, fail=fail)
    for _ in range(17):
        a.step()
    assert a.in_flight and a.s.population_ids  # mid-evolution, with trials in flight
    state = pickle.loads(pickle.dumps(a.s.state_dict()))
    b = Driver(make(seed=9, population=5, candidates=3), concurrency=3, fail=fail)
    b.s.load_state_dict(state)
    b.in_flight = [dict(j) for j in a.in_flight]
    b.told = list(a.told)
    rest_a = [a.step() for _ in range(25)]
    rest_b = [b.step() for _ in range(25)]
    assert rest_a == rest_b
    assert a.s.population_ids == b.s.population_ids
    assert a.s.history == b.s.history
    assert a.s.state_dict()["rng"] == b.s.state_dict()["rng"]
