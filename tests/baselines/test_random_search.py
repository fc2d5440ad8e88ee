"""NES-RS (``random``): uniform valid genotypes, determinism per seed, ``max_members``, failed
members, and a restored strategy that continues as the uninterrupted one."""

import pickle

import numpy as np
import pytest

from nestune.baselines.random_search import RandomSearch
from nestune.platform.strategy import FINISHED, WAIT, StrategyContext, get_strategy, make_strategy
from nestune.search_spaces import DartsSpace, Genotype

SPACE = DartsSpace()


def make(seed=0, **hparams):
    s = RandomSearch(**hparams)
    s.setup(StrategyContext(space=SPACE, seed=seed, ensemble_size=5))
    return s


def ok_result(job):
    return {
        "kind": "member",
        "genotype": job["genotype"],
        "val_probs": np.full((4, 10), 0.1, dtype=np.float16),
        "metrics": {"val_nll": 2.3},
        "device_seconds": 1.0,
    }


def test_registered_under_its_name():
    assert get_strategy("random") is RandomSearch
    assert isinstance(make_strategy("random"), RandomSearch)


def test_jobs_are_valid_member_jobs_with_mostly_distinct_genotypes():
    s = make()
    jobs = [s.ask() for _ in range(50)]
    for job in jobs:
        assert job["kind"] == "member"
        SPACE.validate(Genotype.from_json(job["genotype"]))
        assert isinstance(job["seed"], int)
    assert len({j["genotype"] for j in jobs}) == 50  # the space has ~1e18 cells: no repeats
    assert len({j["seed"] for j in jobs}) == 50
    assert [j["member_id"] for j in jobs] == list(range(50))


def test_same_seed_same_sequence_other_seed_other_sequence():
    s1, s2, s3 = make(seed=3), make(seed=3), make(seed=4)
    seq1 = [s1.ask() for _ in range(10)]
    assert seq1 == [s2.ask() for _ in range(10)]
    assert [j["genotype"] for j in seq1] != [s3.ask()["genotype"] for _ in range(10)]


def test_sampling_covers_every_op_and_input_uniformly_enough():
    s = make(seed=1)
    ops, inputs_node3 = [], []
    for _ in range(300):
        g = Genotype.from_json(s.ask()["genotype"])
        ops += [op for op, _ in g.normal + g.reduce]
        inputs_node3 += [inp for _, inp in g.normal[6:8]]
    counts = {op: ops.count(op) for op in SPACE.choices}
    assert "none" not in ops
    # 4800 draws over 7 ops: each near 686; a broken sampler is far off.
    assert all(550 < c < 830 for c in counts.values()), counts
    assert set(inputs_node3) == {0, 1, 2, 3, 4}


def test_never_finishes_by_itself():
    s = make()
    for _ in range(200):
        job = s.ask()
        assert isinstance(job, dict)
        s.tell(job, ok_result(job))
    assert len(s.genotypes()) == 200


def test_max_members_waits_for_jobs_in_flight_and_replaces_failures():
    s = make(max_members=3)
    jobs = [s.ask() for _ in range(3)]
    assert s.ask() == WAIT
    s.tell(jobs[0], ok_result(jobs[0]))
    s.tell(jobs[1], {"error": "CUDA out of memory"})
    replacement = s.ask()  # the failed one's slot is free again
    assert isinstance(replacement, dict) and replacement["genotype"] != jobs[1]["genotype"]
    assert s.ask() == WAIT
    s.tell(jobs[2], ok_result(jobs[2]))
    s.tell(replacement, ok_result(replacement))
    assert s.ask() == FINISHED
    assert [h["status"] for h in s.history] == ["ok", "failed", "ok", "ok"]
    assert len(s.genotypes()) == 3


def test_bad_hyperparameters_and_bad_tell_name_the_problem():
    with pytest.raises(ValueError, match="max_members"):
        RandomSearch(max_members=0)
    with pytest.raises(ValueError, match="max_members"):
        make_strategy("random", max_members="many")
    s = make()
    job = s.ask()
    s.tell(job, ok_result(job))
    with pytest.raises(ValueError, match="member_id=0 is not pending"):
        s.tell(job, ok_result(job))


def test_restored_strategy_continues_as_the_uninterrupted_one():
    def drive(s, steps, in_flight):
        out = []
        for _ in range(steps):
            job = s.ask()
            out.append(job)
            in_flight.append(job)
            if len(in_flight) > 2:  # three trials in flight, told oldest first
                done = in_flight.pop(0)
                s.tell(done, ok_result(done) if done["member_id"] % 4 else {"error": "boom"})
        return out

    a, flight_a = make(seed=7), []
    drive(a, 9, flight_a)
    state = pickle.loads(pickle.dumps(a.state_dict()))
    b = make(seed=7)
    b.load_state_dict(state)
    flight_b = [dict(j) for j in flight_a]
    assert drive(a, 12, flight_a) == drive(b, 12, flight_b)
    assert a.history == b.history
    assert a.state_dict()["rng"] == b.state_dict()["rng"]
