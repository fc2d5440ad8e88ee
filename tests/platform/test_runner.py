"""The Searcher adapter (StrategySearcher), the budget and the ledger, with a fake strategy:
by hand (no Ray) and through one real Ray Tune run with a fake trainable (no torch)."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nestune.platform.runner import (
    Budget,
    Ledger,
    StrategySearcher,
    execute_job,
    job_key,
)
from nestune.platform.strategy import FINISHED, WAIT, Strategy, StrategyContext, register
from nestune.search_spaces.darts import DARTS_V2, DartsSpace

N_VAL, N_TEST, C = 12, 8, 3


@register("test_runner_counter")
@dataclass
class Counter(Strategy):
    """Member jobs numbered 0, 1, 2, ...; ``limit`` jobs then finished; remembers every tell.
    ``bad`` makes job number ``bad`` an invalid one; ``wait_after`` makes it wait (with jobs
    in flight) once that many were asked."""

    limit: int = 100
    bad: int = -1
    wait_after: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.asked = 0
        self.told: list = []

    def ask(self):
        if self.asked >= self.limit:
            return FINISHED
        if self.wait_after >= 0 and self.asked >= self.wait_after and len(self.told) < self.asked:
            return WAIT
        i = self.asked
        self.asked += 1
        if i == self.bad:
            return {"kind": "nonsense", "i": i}
        return {"kind": "member", "genotype": DARTS_V2.to_json(), "seed": i, "i": i}

    def tell(self, job, result):
        self.told.append((job["i"], result.get("error"), result.get("val_probs")))

    def state_dict(self):
        return {**super().state_dict(), "asked": self.asked, "told": [(i, e) for i, e, _ in self.told]}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.asked = state["asked"]
        self.told = [(i, e, None) for i, e in state["told"]]


def _context(seed: int = 0) -> StrategyContext:
    return StrategyContext(space=DartsSpace(), seed=seed, ensemble_size=2)


def _searcher(tmp: Path, budget: Any = 3, **hp: Any) -> StrategySearcher:
    return StrategySearcher(
        Counter(**hp), _context(), Budget.coerce(budget), env={"label": "counter"},
        ledger=Ledger(tmp / "ledger.jsonl"), state_path=tmp / "searcher.pkl",
    )


def _outputs(tmp: Path, i: int) -> str:
    """A fake member's stored outputs, as a trial would leave them."""
    d = tmp / f"member{i}"
    d.mkdir()
    rng = np.random.default_rng(i)
    for split, n in (("val", N_VAL), ("test", N_TEST)):
        p = rng.dirichlet(np.ones(C), size=n).astype(np.float16)
        np.save(d / f"{split}_probs.npy", p)
    (d / "genotype.json").write_text(DARTS_V2.to_json())
    return str(d)


def _done(s: StrategySearcher, tmp: Path, trial_id: str, seconds: float = 1.0) -> None:
    i = s._live[trial_id]["i"]
    s.on_trial_complete(trial_id, {"member_dir": _outputs(tmp, i), "val_nll": 0.5,
                                   "device_seconds": seconds, "kind": "member"})


# ------------------------------------------------------------------------------- budget, keys


def test_budget_coerce_and_validation():
    assert Budget.coerce(4) == Budget(members=4)
    assert Budget.coerce({"device_hours": 0.5}).device_hours == 0.5
    b = Budget(members=2)
    assert Budget.coerce(b) is b
    assert not b.spent(1, 1e9) and b.spent(2, 0)
    assert Budget(device_hours=1.0).spent(0, 3600.0)
    assert Budget(members=5).failure_limit == 5 and Budget(members=1).failure_limit == 3
    for bad, field_name in [
        ({}, "budget"),
        ({"members": 2, "device_hours": 1.0}, "budget"),
        ({"members": 0}, "budget.members"),
        ({"members": True}, "budget.members"),
        ({"device_hours": -1}, "budget.device_hours"),
        ({"hours": 1}, "budget.hours"),
        ({"members": 2, "max_failed": 0}, "budget.max_failed"),
    ]:
        with pytest.raises(ValueError, match=field_name.replace(".", r"\.")):
            Budget.coerce(bad)
    with pytest.raises(ValueError, match="budget"):
        Budget.coerce("many")


def test_job_key_is_canonical():
    assert job_key({"b": 1, "a": np.int64(2)}) == job_key({"a": 2, "b": 1}) == '{"a":2,"b":1}'


# ------------------------------------------------------------------------------- by hand


def test_suggest_tell_and_members_budget(tmp_path):
    s = _searcher(tmp_path, budget=2)
    c1, c2 = s.suggest("t1"), s.suggest("t2")
    assert c1["job"]["i"] == 0 and c2["job"]["i"] == 1 and c1["env"]["label"] == "counter"
    # Two members in flight fill a budget of 2: wait, do not finish yet.
    assert s.suggest("t3") is None and not s.is_finished
    _done(s, tmp_path, "t1")
    i, err, probs = s.strategy.told[0]
    assert (i, err) == (0, None) and probs.dtype == np.float32 and probs.shape == (N_VAL, C)
    assert s.suggest("t3") is None
    _done(s, tmp_path, "t2")
    assert s.suggest("t3") == "FINISHED" and s.finish_reason == "budget spent"
    assert s.totals() == (2, 2.0, 0)
    entries = Ledger(tmp_path / "ledger.jsonl").entries
    assert [e["trial_id"] for e in entries] == ["t1", "t2"] and all(e["ok"] for e in entries)


def test_failures_are_told_and_do_not_count(tmp_path):
    s = _searcher(tmp_path, budget={"members": 1, "max_failed": 2})
    s.suggest("t1")
    s.on_trial_complete("t1", {"error": "ValueError: broken genotype", "kind": "member"})
    assert s.strategy.told[-1][:2] == (0, "ValueError: broken genotype")
    s.suggest("t2")
    s.on_trial_complete("t2", None, error=True)  # the trial's process crashed
    assert "crashed" in s.strategy.told[-1][1]
    # Two failures reach max_failed: the runner stops asking.
    assert s.suggest("t3") == "FINISHED" and "failed" in s.finish_reason
    assert s.totals() == (0, 0.0, 2)


def test_invalid_job_is_failed_without_a_trial(tmp_path):
    s = _searcher(tmp_path, budget=1, bad=0)
    config = s.suggest("t1")
    assert config["job"]["i"] == 1  # job 0 was refused, the next one runs
    assert s.strategy.told[0][0] == 0 and "job.kind" in s.strategy.told[0][1]
    assert Ledger(tmp_path / "ledger.jsonl").entries[0]["ok"] is False


def test_waiting_with_nothing_in_flight_finishes(tmp_path):
    s = _searcher(tmp_path, budget=5, wait_after=1)
    s.suggest("t1")
    assert s.suggest("t2") is None  # waits for t1
    s.on_trial_complete("t1", {"error": "boom"})
    s.strategy.wait_after = 0
    s.strategy.told.clear()  # make it wait forever
    assert s.suggest("t2") == "FINISHED" and "nothing in flight" in s.finish_reason


def test_device_hours_budget_counts_every_job(tmp_path):
    s = _searcher(tmp_path, budget={"device_hours": 1.0})
    s.suggest("t1")
    _done(s, tmp_path, "t1", seconds=1800.0)
    s.suggest("t2")
    s.on_trial_complete("t2", {"error": "diverged", "device_seconds": 1800.0})
    assert s.suggest("t3") == "FINISHED"


def test_strategy_finished(tmp_path):
    s = _searcher(tmp_path, budget=10, limit=1)
    s.suggest("t1")
    _done(s, tmp_path, "t1")
    assert s.suggest("t2") == "FINISHED" and s.finish_reason == "strategy finished"


def test_save_restore_requeues_jobs_in_flight(tmp_path):
    s = _searcher(tmp_path, budget=4)
    s.suggest("t1"), s.suggest("t2")
    _done(s, tmp_path, "t1")
    # The run stops here with t2 in flight; a new run restores the state file.
    s2 = _searcher(tmp_path, budget=4)
    s2.restore(str(tmp_path / "searcher.pkl"))
    assert s2.session == 2 and s2.strategy.asked == 2 and s2.totals() == (1, 1.0, 0)
    c = s2.suggest("u1")
    assert c["job"]["i"] == 1  # the job that was in flight, issued again, not a new ask
    assert s2.suggest("u2")["job"]["i"] == 2
    with pytest.raises(ValueError, match="resume"):
        _searcher(tmp_path, budget=4, limit=7).restore(str(tmp_path / "searcher.pkl"))


def test_finished_jobs_asked_again_are_served_from_the_ledger(tmp_path):
    s = _searcher(tmp_path, budget=3)
    s.suggest("t1")
    _done(s, tmp_path, "t1")
    # Same study again without its state file: the strategy asks job 0 again.
    os.remove(tmp_path / "searcher.pkl")
    s2 = _searcher(tmp_path, budget=3)
    c = s2.suggest("u1")
    assert c["job"]["i"] == 1  # job 0 came from storage, no trial for it
    i, err, probs = s2.strategy.told[0]
    assert i == 0 and err is None and probs.shape == (N_VAL, C)
    assert s2.totals() == (1, 1.0, 0)


def test_a_job_stored_by_a_stopped_trial_is_recovered_not_rerun(tmp_path):
    s = _searcher(tmp_path, budget=3)
    s.experiment_path = str(tmp_path / "exp-r1")  # as the Tune callback sets it
    s.suggest("t1"), s.suggest("t2")
    _done(s, tmp_path, "t1")
    # The run stops: t2 had stored its checkpoint, but the driver never saw its report.
    job = s._live["t2"]
    ckpt = Path(_outputs(tmp_path, job["i"]))
    (ckpt / "job.json").write_text(job_key(job))
    (ckpt / "report.json").write_text(json.dumps({"kind": "member", "val_nll": 0.7,
                                                  "device_seconds": 2.5}))
    stored = tmp_path / "exp-r1" / "t2" / "checkpoint_000000"
    stored.parent.mkdir(parents=True)
    ckpt.rename(stored)
    s.on_trial_complete("t2")  # Tune ends the trial without a result
    s2 = _searcher(tmp_path, budget=3)
    s2.restore(str(tmp_path / "searcher.pkl"))
    assert s2.suggest("u1")["job"]["i"] == 2  # job 1 came from storage, no trial for it
    entry = Ledger(tmp_path / "ledger.jsonl").entries[-1]
    assert (entry["trial_id"], entry["ok"], entry["recovered"]) == ("t2", True, True)
    assert entry["device_seconds"] == 2.5 and entry["path"] == str(stored)
    assert s2.strategy.told[-1][0] == 1 and s2.totals() == (2, 3.5, 0)
    # A checkpoint of another job, or one stored in part, is not taken for it.
    s3 = _searcher(tmp_path / "b", budget=3)
    s3.experiment_path = str(tmp_path / "b" / "exp")
    s3.suggest("v1")
    part = tmp_path / "b" / "exp" / "v1" / "checkpoint_000000"
    part.mkdir(parents=True)
    (part / "job.json").write_text(job_key(s3._live["v1"]))  # no report.json: partial
    s3.on_trial_complete("v1")
    assert s3.suggest("v2")["job"]["i"] == 0  # issued again


def test_stopped_before_running_is_requeued(tmp_path):
    s = _searcher(tmp_path, budget=3)
    s.suggest("t1")
    s.on_trial_complete("t1")  # Tune removed the pending trial (run interrupted)
    assert s.strategy.told == [] and s.suggest("t2")["job"]["i"] == 0


def test_searcher_pickles_without_listeners(tmp_path):
    s = _searcher(tmp_path, budget=3)
    s.listeners.append(lambda *a: None)
    s.suggest("t1")
    s2 = pickle.loads(pickle.dumps(s))
    assert s2.listeners == [] and s2.strategy.asked == 1 and "t1" in s2._live


def test_execute_job_member_and_errors(tmp_path):
    env = {"data": {"name": "digits", "subset": 300},
           "train": {"epochs": 1, "C": 4, "layers": 1, "batch_size": 64}, "cpu": 1}
    job = {"kind": "member", "genotype": DARTS_V2.to_json(), "seed": 0, "epochs": 1}
    metrics = execute_job(job, env, tmp_path)
    assert metrics["device_seconds"] > 0 and np.isfinite(metrics["val_nll"])
    assert np.load(tmp_path / "val_probs.npy").dtype == np.float16
    assert json.loads((tmp_path / "job.json").read_text()) == job
    with pytest.raises(ValueError, match="job.kind"):
        execute_job({"kind": "sing"}, env, tmp_path)


# ------------------------------------------------------------------------------- through Tune


def fake_trainable(config):
    """Writes fake probabilities as the checkpoint; job 1 raises (a crashed trial)."""
    from ray import tune

    job = config["job"]
    if job["i"] == 1:
        raise RuntimeError("fake crash in trial")
    d = tempfile.mkdtemp()
    rng = np.random.default_rng(job["i"])
    for split, n in (("val", N_VAL), ("test", N_TEST)):
        np.save(os.path.join(d, f"{split}_probs.npy"),
                rng.dirichlet(np.ones(C), size=n).astype(np.float16))
    tune.report({"val_nll": 1.0, "device_seconds": 0.5, "kind": "member"},
                checkpoint=tune.Checkpoint.from_directory(d))


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_real_tune_run_with_fake_trainable(ray_local, tmp_path):
    from ray import tune

    from nestune.platform.runner import trial_dirname

    s = _searcher(tmp_path, budget=3)
    seen = []
    s.listeners.append(lambda searcher, entry, outputs: seen.append((entry, sorted(outputs))))
    tuner = tune.Tuner(
        tune.with_resources(fake_trainable, {"cpu": 1}),
        tune_config=tune.TuneConfig(search_alg=s, num_samples=-1, max_concurrent_trials=2,
                                    reuse_actors=True, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name="fake", storage_path=str(tmp_path / "ray"), verbose=0,
                                  callbacks=[s.callback()],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    tuner.fit()
    assert s.is_finished and s.finish_reason == "budget spent"
    members, _, failed = s.totals()
    assert (members, failed) == (3, 1)
    told = {i: (err, probs) for i, err, probs in s.strategy.told}
    assert "fake crash in trial" in told[1][0]
    # The crashed trial reported nothing; its wall time still counts as spent.
    crashed = [e for e, _ in seen if not e["ok"]]
    assert len(crashed) == 1 and crashed[0]["device_seconds"] > 0
    ok = [e for e, _ in seen if e["ok"]]
    # Probabilities came back from the checkpoints Tune persisted under storage_path.
    assert all(e["path"].startswith(str(tmp_path / "ray" / "fake")) for e in ok)
    assert all(told[e["job"]["i"]][1].shape == (N_VAL, C) for e in ok)
    assert all(names == ["test_probs", "val_probs"] for e, names in seen if e["ok"])
