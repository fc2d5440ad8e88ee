"""TPE (``tpe``): the categorical encoding of genotypes, learning from the history on a toy
objective, failed and concurrent trials, and the state round trip through a pickled study."""

import itertools
import math
import pickle

import numpy as np
import optuna
import pytest

from nestune.baselines.tpe import TPE, decode, encode, input_pairs
from nestune.metrics import nll
from nestune.platform.strategy import FINISHED, WAIT, StrategyContext, get_strategy, make_strategy
from nestune.search_spaces import DARTS_V2, DartsSpace, Genotype

SPACE = DartsSpace()
N, C = 50, 10
LABELS = np.random.default_rng(0).integers(C, size=N)


def make(seed=0, labels=None, **hparams):
    s = make_strategy("tpe", **hparams)
    s.setup(StrategyContext(space=SPACE, seed=seed, ensemble_size=5, val_labels=labels))
    return s


def toy_nll(genotype):
    """The toy objective: lower with more sep_conv_3x3 ops (7 choices: 1/7 of ops at random)."""
    ops = [op for op, _ in genotype.normal + genotype.reduce]
    return 0.5 + sum(op != "sep_conv_3x3" for op in ops) / len(ops)


def result(job):
    g = Genotype.from_json(job["genotype"])
    return {
        "kind": "member",
        "genotype": job["genotype"],
        "val_probs": np.full((N, C), 0.1, dtype=np.float16),
        "metrics": {"val_nll": toy_nll(g)},
        "device_seconds": 1.0,
    }


def sep_share(jobs):
    ops = [op for j in jobs for g in [Genotype.from_json(j["genotype"])] for op, _ in g.normal + g.reduce]
    return ops.count("sep_conv_3x3") / len(ops)


def test_encoding_is_one_to_one_on_valid_genotypes():
    assert [len(input_pairs(i)) for i in range(4)] == [math.comb(i + 2, 2) for i in range(4)]
    rng = np.random.default_rng(0)
    for g in [DARTS_V2] + [SPACE.sample(rng) for _ in range(50)]:
        params = encode(g, SPACE)
        assert len(params) == 2 * 4 * 3
        back = decode(params, SPACE)
        # Same edges; only the order of a node's two (op, input) pairs may differ.
        assert back.edges() == g.edges()
        assert encode(back, SPACE) == params
    # Every combination of choices decodes to a valid genotype.
    for pair, op0, op1 in itertools.product(input_pairs(3), SPACE.choices, SPACE.choices[:2]):
        params = encode(DARTS_V2, SPACE) | {"normal_n3_inputs": pair, "normal_n3_op0": op0,
                                            "normal_n3_op1": op1}
        SPACE.validate(decode(params, SPACE))


def test_jobs_are_valid_and_the_sequence_follows_the_seed():
    assert get_strategy("tpe") is TPE
    a, b, c = make(seed=1), make(seed=1), make(seed=2)
    jobs = [a.ask() for _ in range(12)]
    for job in jobs:
        assert job["kind"] == "member" and isinstance(job["seed"], int)
        SPACE.validate(Genotype.from_json(job["genotype"]))
    assert len({j["genotype"] for j in jobs}) == 12
    assert [j["tpe_trial"] for j in jobs] == list(range(12))
    assert jobs == [b.ask() for _ in range(12)]
    assert [j["genotype"] for j in jobs] != [c.ask()["genotype"] for _ in range(12)]


@pytest.mark.parametrize("multivariate", [False, True])
def test_learns_from_the_history_with_trials_in_flight(multivariate):
    s = make(seed=3, startup_trials=10, multivariate=multivariate)
    in_flight, asked = [], []
    for _ in range(60):
        job = s.ask()
        asked.append(job)
        in_flight.append(job)
        if len(in_flight) == 3:  # three concurrent trials
            done = in_flight.pop(0)
            s.tell(done, result(done))
    # Uniform sampling picks sep_conv_3x3 for 1/7 ~ 0.14 of the ops (sd ~0.014 over 20
    # genotypes); TPE, having seen that it lowers the NLL, picks it about twice as often.
    assert sep_share(asked[:10]) < 0.2
    assert sep_share(asked[-20:]) > 0.22, sep_share(asked[-20:])
    best = min(h["val_nll"] for h in s.history)
    assert best < 1.2 and s.study.best_value == best


def test_failed_members_are_told_as_fail_and_it_goes_on():
    s = make(labels=LABELS, startup_trials=2)
    jobs = [s.ask() for _ in range(4)]
    s.tell(jobs[0], {"error": "CUDA out of memory"})
    s.tell(jobs[1], {**result(jobs[1]), "metrics": {"val_nll": float("nan")}})
    s.tell(jobs[2], result(jobs[2]))
    # No val_nll in the metrics: computed from the probabilities and the labels.
    s.tell(jobs[3], {**result(jobs[3]), "metrics": {}})
    states = [t.state for t in s.study.trials]
    assert states[:2] == [optuna.trial.TrialState.FAIL] * 2
    assert states[2:] == [optuna.trial.TrialState.COMPLETE] * 2
    assert s.study.trials[3].value == pytest.approx(nll(np.full((N, C), 0.1), LABELS), rel=1e-3)
    assert [h["status"] for h in s.history] == ["failed", "ok", "ok", "ok"]
    SPACE.validate(Genotype.from_json(s.ask()["genotype"]))
    unlabelled = make()
    job = unlabelled.ask()
    with pytest.raises(ValueError, match="val_nll"):
        unlabelled.tell(job, {})


def test_max_members_and_bad_hyperparameters():
    s = make(max_members=2)
    a, b = s.ask(), s.ask()
    assert s.ask() == WAIT
    s.tell(a, {"error": "boom"})
    c = s.ask()
    s.tell(b, result(b))
    s.tell(c, result(c))
    assert s.ask() == FINISHED
    with pytest.raises(ValueError, match="TPE.startup_trials"):
        TPE(startup_trials=-1)
    with pytest.raises(ValueError, match="multivariate"):
        TPE(multivariate="yes")
    with pytest.raises(ValueError, match="member_id=None is not pending"):
        make().tell({}, {})


def test_restored_strategy_continues_as_the_uninterrupted_one():
    def drive(s, steps, in_flight):
        out = []
        for _ in range(steps):
            job = s.ask()
            out.append(job)
            in_flight.append(job)
            if len(in_flight) == 3:
                done = in_flight.pop(0)
                s.tell(done, result(done) if done["member_id"] % 6 else {"error": "boom"})
        return out

    a, flight_a = make(seed=4, startup_trials=5), []
    drive(a, 14, flight_a)  # past the startup trials, with two trials in flight
    state = pickle.loads(pickle.dumps(a.state_dict()))
    b = make(seed=4, startup_trials=5)
    b.load_state_dict(state)
    flight_b = [dict(j) for j in flight_a]
    assert drive(a, 16, flight_a) == drive(b, 16, flight_b)
    assert a.history == b.history
    assert [(t.params, t.value, t.state) for t in a.study.trials] == [
        (t.params, t.value, t.state) for t in b.study.trials
    ]


def test_setup_is_quiet_and_leaves_optuna_verbosity_alone():
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("optuna")
    logger.addHandler(handler)
    before = optuna.logging.get_verbosity()
    try:
        make(seed=5)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "A new study created" in r.getMessage()]
    assert optuna.logging.get_verbosity() == before
