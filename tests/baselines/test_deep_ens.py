"""Deep ensembles (``deep_ens``): M jobs of one genotype with M distinct seeds, the genotype
given by name, JSON or DARTS repr, failed members replaced, and the state round trip."""

import pickle

import numpy as np
import pytest

from nestune.baselines.deep_ens import DeepEnsemble
from nestune.platform.strategy import FINISHED, WAIT, StrategyContext, get_strategy, make_strategy
from nestune.search_spaces import DARTS_V1, DARTS_V2, DartsSpace, Genotype

SPACE = DartsSpace()


def make(seed=0, size=5, **hparams):
    s = make_strategy("deep_ens", **hparams)
    s.setup(StrategyContext(space=SPACE, seed=seed, ensemble_size=size))
    return s


def ok_result(job):
    return {
        "kind": "member",
        "genotype": job["genotype"],
        "val_probs": np.full((4, 10), 0.1, dtype=np.float16),
        "metrics": {"val_nll": 2.3},
        "device_seconds": 1.0,
    }


def test_m_jobs_of_darts_v2_with_distinct_seeds_then_finished():
    assert get_strategy("deep_ens") is DeepEnsemble
    s = make(size=5)
    jobs = [s.ask() for _ in range(5)]
    assert all(j["kind"] == "member" for j in jobs)
    assert {Genotype.from_json(j["genotype"]) for j in jobs} == {DARTS_V2}
    assert len({j["seed"] for j in jobs}) == 5
    assert s.ask() == WAIT  # all M in flight
    for j in jobs[:4]:
        s.tell(j, ok_result(j))
    assert s.ask() == WAIT
    s.tell(jobs[4], ok_result(jobs[4]))
    assert s.ask() == FINISHED
    assert s.ask() == FINISHED


def test_seeds_follow_the_strategy_seed():
    a, b, c = make(seed=1, size=4), make(seed=1, size=4), make(seed=2, size=4)
    seeds = [a.ask()["seed"] for _ in range(4)]
    assert seeds == [b.ask()["seed"] for _ in range(4)]
    assert seeds != [c.ask()["seed"] for _ in range(4)]


@pytest.mark.parametrize(
    "text", ["DARTS_V1", DARTS_V1.to_json(), str(DARTS_V1), "  " + str(DARTS_V1) + "\n"]
)
def test_genotype_by_name_json_or_darts_repr(text):
    s = make(genotype=text, size=2)
    assert Genotype.from_json(s.ask()["genotype"]) == DARTS_V1


@pytest.mark.parametrize(
    "text, match",
    [
        ("DARTS_V3", "expected one of"),
        ('{"normal": [["sep_conv_3x3", 0]]}', "missing field"),
        ("Genotype(normal=oops)", "not a literal"),
    ],
)
def test_bad_genotype_names_the_field(text, match):
    with pytest.raises(ValueError, match=rf"DeepEnsemble\.genotype.*{match}"):
        DeepEnsemble(genotype=text)


def test_genotype_outside_the_space_is_refused_at_setup():
    s = DeepEnsemble()  # DARTS_V2 uses skip_connect and max_pool
    narrow = DartsSpace(ops=("none", "sep_conv_3x3", "dil_conv_3x3"))
    with pytest.raises(ValueError, match=r"DeepEnsemble\.genotype.*not in the study's space"):
        s.setup(StrategyContext(space=narrow, seed=0, ensemble_size=3))


def test_failed_members_are_replaced_with_fresh_seeds_up_to_m_failures():
    s = make(size=3)
    jobs = [s.ask() for _ in range(3)]
    s.tell(jobs[0], {"error": "diverged"})
    replacement = s.ask()
    assert replacement["seed"] not in {j["seed"] for j in jobs}
    assert replacement["genotype"] == jobs[0]["genotype"]
    for j in jobs[1:] + [replacement]:
        s.tell(j, ok_result(j))
    assert s.ask() == FINISHED
    assert [h["status"] for h in s.history] == ["failed", "ok", "ok", "ok"]

    # A genotype that never trains: M failures end it instead of retrying for ever.
    s = make(size=2)
    asked = 0
    while (job := s.ask()) != FINISHED:
        assert job != WAIT
        asked += 1
        s.tell(job, {"error": "CUDA out of memory"})
    assert asked == 2


def test_restored_strategy_continues_as_the_uninterrupted_one():
    a = make(seed=5, size=4)
    first = [a.ask() for _ in range(3)]
    a.tell(first[1], {"error": "boom"})
    a.tell(first[0], ok_result(first[0]))
    b = make(seed=5, size=4)
    b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    for s in (a, b):
        s.tell(first[2], ok_result(first[2]))
    rest_a, rest_b = [a.ask() for _ in range(3)], [b.ask() for _ in range(3)]
    assert rest_a == rest_b
    assert rest_a[2] == WAIT
    assert a.history == b.history
