"""Ray Tune execution of one (strategy, seed): the budget, the Searcher adapter, the trainable.

Each (strategy, seed) of a study is one ``ray.tune.Tuner`` run whose ``search_alg`` is a
:class:`StrategySearcher`: Tune asks it for trial configs (``suggest`` -> ``strategy.ask()``)
and tells it when a trial ends (``on_trial_complete`` -> ``strategy.tell()``). The trial runs
:func:`run_job`, which trains a member (``train_member``) or runs a supernet search
(``run_search``), stores what it produced (float16 val/test probabilities, the genotype, its
metrics) as the trial's Tune checkpoint under the run's ``storage_path``, and reports its
metrics, ``device_seconds`` included.

Resume does not depend on Tune's own experiment restore (which cannot change the budget of a
finished run): every finished job is appended to a per-(strategy, seed) :class:`Ledger`, keyed
by the job's canonical JSON, and the searcher's state (the strategy's ``state_dict``, the jobs
in flight, what the strategy has been told) is written after every event. A run of the same
study restores that state, re-issues the jobs that were in flight, and serves any job the
ledger already holds from storage instead of training it again.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import pickle
import shutil
import socket
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune
from ray.tune.search import Searcher

from nestune.platform.strategy import FINISHED, WAIT, Strategy, StrategyContext

__all__ = [
    "Budget",
    "Ledger",
    "StrategySearcher",
    "job_key",
    "run_job",
    "trial_dirname",
]

log = logging.getLogger(__name__)

# The metric every trial reports (NaN when a job has none), so Tune's strict metric check,
# which the searcher's metric/mode switch on, never fails a study over a search job.
METRIC = "val_nll"
STATE_VERSION = 1
# What run_job reported, stored with the job's outputs, so that a job whose report the driver
# never saw (the run stopped in between) can be recorded from its checkpoint alone.
REPORT_FILE = "report.json"
_MAX_ASKS_PER_SUGGEST = 1000


# ------------------------------------------------------------------------------------ budget


@dataclass(frozen=True)
class Budget:
    """How much one (strategy, seed) may spend: ``members`` trained, or ``device_hours``.

    ``members`` counts member jobs that finished without error (search jobs are free under
    it); ``device_hours`` counts every job's reported device-seconds, searches and failed jobs
    included, so a strategy's searches are paid for. Exactly one of the two is given. Trials
    in flight when the budget is reached still finish and count.

    ``max_failed`` bounds the failed jobs after which the runner stops asking a strategy that
    keeps producing broken jobs (default: the member budget, at least 3; 20 under a
    device-hour budget).
    """

    members: int | None = None
    device_hours: float | None = None
    max_failed: int | None = None

    def __post_init__(self) -> None:
        if (self.members is None) == (self.device_hours is None):
            raise ValueError(
                "budget: expected exactly one of members=N or device_hours=H, got "
                f"members={self.members!r}, device_hours={self.device_hours!r}"
            )
        if self.members is not None and (not _is_int(self.members) or self.members < 1):
            raise ValueError(f"budget.members: expected an int >= 1, got {self.members!r}")
        if self.device_hours is not None and (
            not _is_number(self.device_hours)
            or not math.isfinite(self.device_hours)
            or self.device_hours <= 0
        ):
            raise ValueError(
                f"budget.device_hours: expected a positive number, got {self.device_hours!r}"
            )
        if self.max_failed is not None and (not _is_int(self.max_failed) or self.max_failed < 1):
            raise ValueError(f"budget.max_failed: expected None or an int >= 1, got {self.max_failed!r}")

    @classmethod
    def coerce(cls, value: Budget | int | Mapping[str, Any]) -> Budget:
        """A Budget from a Budget, an int (members) or a dict (``{"members": 4}``)."""
        if isinstance(value, Budget):
            return value
        if _is_int(value):
            return cls(members=int(value))
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"members", "device_hours", "max_failed"})
            if unknown:
                raise ValueError(
                    f"budget.{unknown[0]}: unknown field (known: members, device_hours, max_failed)"
                )
            return cls(**dict(value))
        raise ValueError(
            f"budget: expected a Budget, an int (members) or a dict, got {value!r}"
        )

    @property
    def failure_limit(self) -> int:
        if self.max_failed is not None:
            return self.max_failed
        return max(3, self.members) if self.members is not None else 20

    def spent(self, members: int, device_seconds: float) -> bool:
        if self.members is not None:
            return members >= self.members
        return device_seconds / 3600.0 >= float(self.device_hours)  # type: ignore[arg-type]

    def describe(self, members: int, device_seconds: float) -> str:
        if self.members is not None:
            return f"{members}/{self.members} members"
        return f"{device_seconds / 3600:.4f}/{self.device_hours:g} device-h ({members} members)"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("members", self.members), ("device_hours", self.device_hours),
                                  ("max_failed", self.max_failed)) if v is not None}


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------ jobs


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (np.ndarray, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def job_key(job: Mapping[str, Any]) -> str:
    """The job's canonical JSON: equal jobs have equal keys (the ledger's key)."""
    return json.dumps(job, sort_keys=True, separators=(",", ":"), default=_json_default)


def _normalise_job(job: Any) -> dict[str, Any]:
    """A plain-JSON copy of a strategy's job; ``ValueError`` says what is wrong with it."""
    if not isinstance(job, Mapping):
        raise ValueError(f"job: expected a dict, 'wait' or 'finished', got {job!r}")
    try:
        plain = json.loads(job_key(job))
    except (TypeError, ValueError) as e:
        raise ValueError(f"job: not JSON-serialisable ({e})") from None
    kind = plain.get("kind")
    if kind not in ("member", "search"):
        raise ValueError(f"job.kind: expected 'member' or 'search', got {kind!r}")
    if kind == "member" and "genotype" not in plain:
        raise ValueError("job.genotype: a member job needs a genotype")
    if kind == "search" and "method" not in plain:
        raise ValueError("job.method: a search job needs a method")
    return plain


# ------------------------------------------------------------------------------------ ledger


class Ledger:
    """Append-only record of the finished jobs of one (strategy, seed), as JSON lines.

    Each entry: ``key`` (the job's canonical JSON), ``job``, ``trial_id``, ``kind``, ``ok``,
    ``error``, ``path`` (the directory holding the job's stored outputs), ``metrics``,
    ``device_seconds``, ``node_id``, ``hostname``, ``finished_at``, ``session``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries: list[dict[str, Any]] = []
        if self.path.exists():
            for i, line in enumerate(self.path.read_text().splitlines()):
                if not line.strip():
                    continue
                try:
                    self.entries.append(json.loads(line))
                except json.JSONDecodeError:
                    # A line cut short by a crash mid-write: that job is simply not finished.
                    log.warning("ledger %s: line %d unreadable, ignored", self.path, i + 1)

    def append(self, entry: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry, sort_keys=True, default=_json_default)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)

    def ok(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e.get("ok")]

    def members(self) -> list[dict[str, Any]]:
        """Finished member jobs, in the order they finished."""
        return [e for e in self.entries if e.get("ok") and e.get("kind") == "member"]

    def totals(self) -> tuple[int, float, int]:
        """(members trained, device-seconds spent, failed jobs)."""
        members = sum(1 for e in self.entries if e.get("ok") and e.get("kind") == "member")
        seconds = sum(float(e.get("device_seconds") or 0.0) for e in self.entries)
        failed = sum(1 for e in self.entries if not e.get("ok"))
        return members, seconds, failed

    def counts(self) -> Counter[str]:
        return Counter(e["key"] for e in self.entries if e.get("ok"))


def load_outputs(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """The arrays and JSON a job stored in ``path`` (a member's probabilities, a search's
    genotype, extra and arrays)."""
    d = Path(path)
    out: dict[str, Any] = {}
    if (d / "genotype.json").is_file():
        out["genotype"] = (d / "genotype.json").read_text()
    if kind == "member":
        out["val_probs"] = np.load(d / "val_probs.npy", allow_pickle=False).astype(np.float32)
        out["test_probs"] = np.load(d / "test_probs.npy", allow_pickle=False).astype(np.float32)
    else:
        if (d / "search.json").is_file():
            out["extra"] = json.loads((d / "search.json").read_text()).get("extra", {})
        if (d / "arrays.npz").is_file():
            with np.load(d / "arrays.npz", allow_pickle=False) as z:
                out["arrays"] = {k: z[k] for k in z.files}
    return out


# ------------------------------------------------------------------------------------ searcher


Listener = Callable[["StrategySearcher", dict[str, Any], dict[str, Any]], None]


class StrategySearcher(Searcher):
    """A :class:`~nestune.platform.strategy.Strategy` as a Ray Tune ``Searcher``.

    ``suggest`` asks the strategy for a job (``None`` while it waits, ``FINISHED`` when it is
    finished or the budget is spent); ``on_trial_complete`` reads the job's outputs back from
    the trial's checkpoint (or from ``result["member_dir"]``), appends the job to the ledger,
    tells the strategy and calls the listeners (the study's scoring and MLflow logging, in the
    driver). ``save``/``restore`` pickle the strategy's ``state_dict`` with the bookkeeping.

    Args:
        strategy: the strategy, not yet set up.
        context: what ``strategy.setup`` is given.
        budget: when to stop asking.
        env: the static part of every trial config (data, training and search defaults,
            resources); :func:`run_job` reads it.
        ledger: the finished jobs of this (strategy, seed), possibly from earlier runs.
        state_path: where the state is written after every event (``None``: nowhere).
        download_dir: where outputs stored on a remote filesystem are copied to.
        listeners: ``fn(searcher, entry, outputs)`` called after each newly finished job.
        storage_path: the Tune runs' storage (a path or a bucket URI): where a job that was
            in flight when an earlier run stopped is looked for before it is run again.
    """

    def __init__(
        self,
        strategy: Strategy,
        context: StrategyContext,
        budget: Budget,
        *,
        env: Mapping[str, Any] | None = None,
        ledger: Ledger | None = None,
        state_path: str | os.PathLike | None = None,
        download_dir: str | os.PathLike | None = None,
        listeners: Iterable[Listener] = (),
        storage_path: str | None = None,
        metric: str = METRIC,
        mode: str = "min",
    ) -> None:
        # metric/mode go to the constructor: Tune calls set_search_properties only when the
        # Tuner has a param_space, and ours is empty (the strategy makes every config).
        super().__init__(metric=metric, mode=mode)
        if not isinstance(strategy, Strategy):
            raise ValueError(f"strategy: expected a Strategy instance, got {strategy!r}")
        self.strategy = strategy
        self.context = context
        self.budget = Budget.coerce(budget)
        self.env = dict(env or {})
        if ledger is None:
            ledger = Ledger(Path(tempfile.mkdtemp(prefix="nestune-ledger-")) / "ledger.jsonl")
        self.ledger = ledger
        self.state_path = Path(state_path) if state_path is not None else None
        self.download_dir = Path(download_dir) if download_dir is not None else None
        self.listeners: list[Listener] = list(listeners)
        self.storage_path = str(storage_path) if storage_path is not None else None
        self.session = 1
        self.strategy.setup(context)

        self._live: dict[str, dict[str, Any]] = {}  # trial_id -> job (in flight)
        # Jobs in flight when a run stopped, each with the [trial_id, experiment path] pairs it
        # ran as: its trial may have stored its outputs before the driver heard of them.
        self._requeue: list[tuple[dict[str, Any], list[list[str | None]]]] = []
        self._live_tried: dict[str, list[list[str | None]]] = {}  # trial_id -> earlier tries
        self._started: dict[str, float] = {}  # trial_id -> when it first started (wall clock)
        self._told: Counter[str] = Counter()  # job key -> results told to the strategy
        self._finished = False
        self.finish_reason: str | None = None
        self.strategy_error: str | None = None
        # Filled by the Tune callback (see callback()): trial_id -> checkpoint / Trial.
        self._checkpoints: dict[str, Any] = {}
        self._trials: dict[str, Any] = {}
        self.experiment_path: str | None = None
        self._experiment_fs: Any = None

    # -------------------------------------------------------------- bookkeeping

    @property
    def label(self) -> str:
        return str(self.env.get("label") or self.strategy.name)

    def totals(self) -> tuple[int, float, int]:
        """(members trained, device-seconds spent, failed jobs), over every run so far."""
        return self.ledger.totals()

    @property
    def is_finished(self) -> bool:
        """True once the searcher has told Tune it will suggest nothing more."""
        return self._finished

    @property
    def live_jobs(self) -> list[dict[str, Any]]:
        return list(self._live.values())

    def _finish(self, reason: str) -> str:
        if not self._finished:
            self._finished = True
            self.finish_reason = reason
            log.info("%s: finished (%s)", self.label, reason)
        return Searcher.FINISHED

    # -------------------------------------------------------------- Searcher API

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._finished:
            return Searcher.FINISHED
        for _ in range(_MAX_ASKS_PER_SUGGEST):
            members, seconds, failed = self.totals()
            if self.budget.spent(members, seconds):
                return self._finish("budget spent")
            if failed >= self.budget.failure_limit:
                return self._finish(f"{failed} failed jobs")
            if self.budget.members is not None:
                live_members = sum(1 for j in self._live.values() if j["kind"] == "member")
                if members + live_members >= self.budget.members:
                    return None  # in-flight members may use up the budget; wait for them
            tried: list[list[str | None]] = []
            if self._requeue:
                job, tried = self._requeue.pop(0)
                if self._recover(job, tried):
                    continue
            else:
                try:
                    asked = self.strategy.ask()
                except Exception:
                    self.strategy_error = traceback.format_exc()
                    log.error("%s: strategy.ask() raised:\n%s", self.label, self.strategy_error)
                    return self._finish("strategy.ask() raised")
                if isinstance(asked, str) and asked == FINISHED:
                    return self._finish("strategy finished")
                if isinstance(asked, str) and asked == WAIT:
                    if not self._live:
                        # Nothing in flight can change the strategy's mind: a deadlock.
                        return self._finish("strategy waits with nothing in flight")
                    return None
                try:
                    job = _normalise_job(asked)
                except ValueError as e:
                    self._fail_without_trial(asked, str(e))
                    continue
            key = job_key(job)
            if self._serve_from_ledger(job, key):
                continue
            self._live[trial_id] = job
            if tried:
                self._live_tried[trial_id] = tried
            self._save_state()
            return {"job": job, "env": self.env}
        return self._finish("strategy asked for too many jobs in a row that needed no trial")

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        job = self._live.pop(trial_id, None)
        tried = self._live_tried.pop(trial_id, [])
        if job is None:
            return
        if not error and (result is None or not ({"kind", "member_dir", "error"} & set(result))):
            # Stopped before the driver saw the job's report (the run was interrupted, or the
            # trial removed before it ran; run_job always reports "kind"): still to be done,
            # unless its trial stored its outputs first (see _recover).
            self._requeue.append((job, [*tried, [trial_id, self.experiment_path]]))
            self._save_state()
            return
        result = dict(result or {})
        entry = self._entry(job, trial_id, result)
        outputs: dict[str, Any] = {}
        if error:
            entry["error"] = self._trial_error_text(trial_id)
            started = self._started.get(trial_id)
            if started is not None:
                # A crashed trial's process reported nothing: the wall time since it first
                # started (its retries included) is what it cost the budget.
                entry["device_seconds"] = max(entry["device_seconds"], time.time() - started)
        elif result.get("error"):
            entry["error"] = str(result["error"])
        else:
            try:
                path = self._outputs_dir(trial_id, result)
                outputs = load_outputs(path, job["kind"])
                entry["path"] = str(path)
                entry["ok"] = True
            except Exception as e:  # a checkpoint that cannot be read is a failed job
                entry["error"] = f"reading the trial's stored outputs failed: {type(e).__name__}: {e}"
        self._record(job, entry, outputs)

    def _entry(self, job: dict[str, Any], trial_id: str, result: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "key": job_key(job),
            "job": job,
            "trial_id": trial_id,
            "kind": job["kind"],
            "ok": False,
            "error": None,
            "path": None,
            "metrics": _numeric(result),
            "device_seconds": float(result.get("device_seconds") or 0.0),
            "node_id": result.get("node_id"),
            "hostname": result.get("hostname"),
            "finished_at": time.time(),
            "session": self.session,
            "experiment": self.experiment_path,
        }

    def _record(self, job: dict[str, Any], entry: dict[str, Any], outputs: dict[str, Any]) -> None:
        """A finished (or failed) job: into the ledger, told to the strategy, to the listeners."""
        self.ledger.append(entry)
        self._tell(job, self._result_for_strategy(entry, outputs))
        self._save_state()
        for fn in self.listeners:
            try:
                fn(self, entry, outputs)
            except Exception:
                log.exception("%s: listener %r failed on trial %s", self.label, fn,
                              entry.get("trial_id"))

    def _recover(self, job: dict[str, Any], tried: list[list[str | None]]) -> bool:
        """Record a job that was in flight when an earlier run stopped, from the outputs one of
        its trials stored, if any did. A trial persists its checkpoint before the driver
        processes its report, so a run stopped in between leaves a finished member that the
        ledger does not know; without this it would be trained again."""
        key = job_key(job)
        for trial_id, experiment in reversed(tried):
            if not trial_id or not experiment:
                continue
            try:
                found = self._stored_checkpoint(experiment, trial_id, key)
            except Exception as e:
                log.warning("%s: looking for the stored outputs of trial %s failed (%s)",
                            self.label, trial_id, e)
                continue
            if found is None:
                continue
            path, report = found
            try:
                outputs = load_outputs(path, job["kind"])
            except Exception as e:
                log.warning("%s: stored outputs of trial %s unreadable (%s); running it again",
                            self.label, trial_id, e)
                continue
            entry = self._entry(job, trial_id, report)
            entry.update(ok=True, path=str(path), experiment=experiment, recovered=True)
            log.info("%s: job of interrupted trial %s recovered from storage", self.label, trial_id)
            self._record(job, entry, outputs)
            return True
        return False

    def _stored_checkpoint(self, experiment: str, trial_id: str,
                           key: str) -> tuple[Path, dict[str, Any]] | None:
        """The local directory of the checkpoint ``trial_id`` stored for the job ``key`` under
        ``experiment`` (copied here from remote storage) and the metrics it reported; ``None``
        when it stored none (or only part of one)."""
        import pyarrow.fs

        fs = self._experiment_fs or self._storage_filesystem()
        trial_dir = f"{experiment.rstrip('/')}/{trial_dirname_for(trial_id)}"
        infos = fs.get_file_info(pyarrow.fs.FileSelector(trial_dir, allow_not_found=True))
        names = sorted((i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                        and i.base_name.startswith("checkpoint_")), reverse=True)
        for name in names:
            ckpt = tune.Checkpoint(f"{trial_dir}/{name}", filesystem=fs)
            if isinstance(fs, pyarrow.fs.LocalFileSystem):
                local = Path(ckpt.path)
            else:
                target = (self.download_dir or Path(tempfile.mkdtemp(prefix="nestune-dl-"))) / trial_id
                if target.exists():
                    shutil.rmtree(target)
                local = Path(ckpt.to_directory(str(target)))
            if not (local / "job.json").is_file() or (local / "job.json").read_text() != key:
                continue
            if not (local / REPORT_FILE).is_file():
                continue  # a checkpoint stored only in part (the caller's load checks the rest)
            return local, json.loads((local / REPORT_FILE).read_text())
        return None

    def _storage_filesystem(self) -> Any:
        import pyarrow.fs

        if self.storage_path and "://" in self.storage_path:
            return pyarrow.fs.FileSystem.from_uri(self.storage_path)[0]
        return pyarrow.fs.LocalFileSystem()

    def save(self, checkpoint_path: str) -> None:
        tmp = f"{checkpoint_path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            pickle.dump(self.get_state(), f)
        os.replace(tmp, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.set_state(state)

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "strategy": self.strategy.name,
            "strategy_class": f"{type(self.strategy).__module__}.{type(self.strategy).__qualname__}",
            "hparams": _jsonable(self.strategy.hparams()),
            "seed": self.context.seed,
            "ensemble_size": self.context.ensemble_size,
            "strategy_state": self.strategy.state_dict(),
            # Jobs in flight are not finished: a later run recovers their stored outputs or
            # issues them again.
            "pending": [*(job for job, _ in self._requeue), *self._live.values()],
            "pending_tried": [*(tried for _, tried in self._requeue),
                              *([*self._live_tried.get(tid, []), [tid, self.experiment_path]]
                                for tid in self._live)],
            "told": dict(self._told),
            "session": self.session,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"searcher state: unknown version {state.get('version')!r}")
        mine = (self.strategy.name, _jsonable(self.strategy.hparams()), self.context.seed)
        theirs = (state["strategy"], state["hparams"], state["seed"])
        if json.dumps(mine, sort_keys=True) != json.dumps(theirs, sort_keys=True):
            raise ValueError(
                f"resume: the stored state belongs to strategy {theirs[0]!r} with hyperparameters "
                f"{theirs[1]} and seed {theirs[2]}, not {mine[0]!r} with {mine[1]} and seed "
                f"{mine[2]}; use a new study name or output_dir to run a changed study"
            )
        self.strategy.load_state_dict(state["strategy_state"])
        pending = state.get("pending", [])
        tried = state.get("pending_tried") or [[] for _ in pending]
        self._requeue = [(dict(j), [list(t) for t in ts]) for j, ts in zip(pending, tried, strict=True)]
        self._told = Counter(state.get("told", {}))
        self.session = int(state.get("session", 1)) + 1
        self._live = {}
        self._live_tried = {}
        self._finished = False

    # -------------------------------------------------------------- Tune callback

    def callback(self) -> tune.Callback:
        """The Tune callback that hands this searcher each trial's checkpoint and Trial."""
        return _SearcherCallback(self)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its search_alg into the experiment folder. The driver-side listeners
        # (MLflow client, the study), live Trial objects and the filesystem stay out of that
        # copy, and the strategy travels as class + hyperparameters + state_dict, since a live
        # strategy may hold objects that do not pickle (an Optuna study's locks).
        state = self.__dict__.copy()
        state["listeners"] = []
        state["_trials"] = {}
        state["_checkpoints"] = {}
        state["_experiment_fs"] = None
        strategy = state.pop("strategy")
        state["_strategy_pickle"] = (type(strategy), strategy.hparams(), strategy.state_dict())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        cls, hparams, strategy_state = state.pop("_strategy_pickle")
        self.__dict__.update(state)
        self.strategy = cls(**hparams)
        self.strategy.setup(self.context)
        self.strategy.load_state_dict(strategy_state)

    # -------------------------------------------------------------- internals

    def _tell(self, job: dict[str, Any], result: dict[str, Any]) -> None:
        try:
            self.strategy.tell(copy.deepcopy(job), result)
        except Exception:
            self.strategy_error = traceback.format_exc()
            log.error("%s: strategy.tell() raised:\n%s", self.label, self.strategy_error)
            self._finish("strategy.tell() raised")
        if not result.get("error"):
            self._told[job_key(job)] += 1

    def _fail_without_trial(self, job: Any, message: str) -> None:
        log.warning("%s: invalid job, not run: %s", self.label, message)
        try:
            key, plain = job_key(job), json.loads(job_key(job))
        except (TypeError, ValueError):
            key = plain = repr(job)
        entry = {
            "key": key,
            "job": plain,
            "trial_id": None,
            "kind": job.get("kind") if isinstance(job, Mapping) else None,
            "ok": False,
            "error": message,
            "path": None,
            "metrics": {},
            "device_seconds": 0.0,
            "finished_at": time.time(),
            "session": self.session,
        }
        self.ledger.append(entry)
        if isinstance(job, Mapping):
            self._tell(dict(job), {"kind": job.get("kind"), "error": message, "device_seconds": 0.0})
        for fn in self.listeners:
            try:
                fn(self, entry, {})
            except Exception:
                log.exception("%s: listener %r failed", self.label, fn)

    def _serve_from_ledger(self, job: dict[str, Any], key: str) -> bool:
        """Tell the strategy a stored result of ``job`` if the ledger holds one it has not been
        told yet (a finished job asked again after a restart is not trained again)."""
        stored = [e for e in self.ledger.entries if e.get("ok") and e["key"] == key]
        if len(stored) <= self._told[key]:
            return False
        entry = stored[self._told[key]]
        try:
            outputs = load_outputs(entry["path"], entry["kind"])
        except Exception as e:
            log.warning("%s: stored outputs of trial %s unreadable (%s); training again",
                        self.label, entry.get("trial_id"), e)
            return False
        log.info("%s: job served from storage (trial %s)", self.label, entry.get("trial_id"))
        self._tell(job, self._result_for_strategy(entry, outputs))
        self._save_state()
        return True

    def _result_for_strategy(self, entry: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        job = entry["job"]
        base = {
            "kind": entry["kind"],
            "trial_id": entry["trial_id"],
            "device_seconds": entry["device_seconds"],
            # Strategies select on validation data only: test metrics stay with the study.
            "metrics": {k: v for k, v in (entry.get("metrics") or {}).items()
                        if not k.startswith("test_")},
        }
        if not entry["ok"]:
            return {**base, "error": entry["error"] or "failed"}
        if entry["kind"] == "member":
            return {**base, "genotype": outputs.get("genotype", job.get("genotype")),
                    "val_probs": outputs["val_probs"], "seed": job.get("seed")}
        return {**base, "genotype": outputs.get("genotype"), "method": job.get("method"),
                "extra": outputs.get("extra", {}), "arrays": outputs.get("arrays", {})}

    def _outputs_dir(self, trial_id: str, result: Mapping[str, Any]) -> Path:
        """A local directory with the trial's stored outputs."""
        if result.get("member_dir"):
            return Path(str(result["member_dir"]))
        ckpt = self._checkpoints.get(trial_id)
        if ckpt is None and self.experiment_path and result.get("checkpoint_dir_name"):
            # The callback missed it: the checkpoint sits at a known place under storage.
            ckpt = tune.Checkpoint(
                f"{self.experiment_path.rstrip('/')}/{trial_dirname_for(trial_id)}/"
                f"{result['checkpoint_dir_name']}",
                filesystem=self._experiment_fs,
            )
        if ckpt is None:
            raise FileNotFoundError(f"trial {trial_id} reported no checkpoint")
        import pyarrow.fs

        if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem) and Path(ckpt.path).is_dir():
            return Path(ckpt.path)
        # Remote storage (a bucket URI): copy the outputs next to the study.
        target = (self.download_dir or Path(tempfile.mkdtemp(prefix="nestune-dl-"))) / trial_id
        if target.exists():
            shutil.rmtree(target)
        return Path(ckpt.to_directory(str(target)))

    def _trial_error_text(self, trial_id: str) -> str:
        trial = self._trials.get(trial_id)
        path = getattr(trial, "error_file", None) if trial is not None else None
        if path and os.path.exists(path):
            text = Path(path).read_text().strip()
            return text[-4000:] if text else "trial failed"
        return "trial failed (its process crashed or was lost)"

    def _save_state(self) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.save(str(self.state_path))


class _SearcherCallback(tune.Callback):
    """Driver-side: record each trial's Trial object and persisted checkpoint for the searcher
    (Tune delivers the checkpoint before it tells the searcher that the trial completed)."""

    def __init__(self, searcher: StrategySearcher) -> None:
        self.searcher = searcher

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.searcher._trials[trial.trial_id] = trial
        self.searcher._started.setdefault(trial.trial_id, time.time())
        if self.searcher.experiment_path is None:
            storage = getattr(trial, "storage", None)
            if storage is not None:
                self.searcher.experiment_path = storage.experiment_fs_path
                self.searcher._experiment_fs = storage.storage_filesystem

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        self.searcher._checkpoints[trial.trial_id] = checkpoint


def _numeric(result: Mapping[str, Any]) -> dict[str, float]:
    """The job's own numeric metrics from a Tune result (Tune's bookkeeping left out)."""
    skip = {
        "training_iteration", "timestamp", "time_this_iter_s", "time_since_restore",
        "iterations_since_restore", "pid", "done", "should_checkpoint", "trial_id", "date",
        "hostname", "node_ip", "experiment_tag", "checkpoint_dir_name",
    }
    out = {}
    for k, v in result.items():
        if k in skip or k.startswith("config/") or not _is_number(v):
            continue
        out[k] = float(v)
    return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def trial_dirname_for(trial_id: str) -> str:
    return trial_id


def trial_dirname(trial: Any) -> str:
    """Tune's trial directory name: the trial id, so stored outputs have a short known path."""
    return trial_dirname_for(trial.trial_id)


# ------------------------------------------------------------------------------------ trainable

_DATA_CACHE: dict[str, Any] = {}


def _load_data_cached(spec: Mapping[str, Any]) -> Any:
    """Decoded data, kept per process: Tune reuses trial actors, so later trials skip it."""
    from nestune.platform.data import load_data

    key = json.dumps(spec, sort_keys=True)
    if key not in _DATA_CACHE:
        if len(_DATA_CACHE) >= 2:
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
        _DATA_CACHE[key] = load_data(**spec)
    return _DATA_CACHE[key]


def _train_fields() -> set[str]:
    import dataclasses

    from nestune.platform.training import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def execute_job(job: Mapping[str, Any], env: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Run one job in this process and store its outputs in ``out_dir``; return its metrics.

    A member job trains ``job["genotype"]`` with the study's training settings, overridden by
    any TrainConfig field the job carries (and by ``job["train"]``), and with ``env["shift"]``
    also stores its predictions on corrupted test (and validation) data; a search job runs
    ``run_search`` with the study's search defaults under the job's own keys.
    """
    import torch

    out = Path(out_dir)
    kind = job.get("kind")
    if kind not in ("member", "search"):
        raise ValueError(f"job.kind: expected 'member' or 'search', got {kind!r}")
    (out / "job.json").write_text(job_key(job))
    if int(env.get("workers") or 1) > 1:
        return _execute_distributed(job, env, out)
    data = _load_data_cached(env.get("data") or {"name": "digits"})
    use_gpu = float(env.get("gpu") or 0) > 0 and torch.cuda.is_available()
    device = "cuda" if use_gpu else "cpu"
    if kind == "member":
        from nestune.platform.training import train_member

        fields = _train_fields()
        config = dict(env.get("train") or {})
        config.update({k: v for k, v in job.items() if k in fields})
        config.update(job.get("train") or {})
        if "seed" not in job:
            raise ValueError("job.seed: a member job needs a seed")
        member = train_member(job["genotype"], data, config, seed=job["seed"], device=device)
        metrics = _store_member(member, out)
        if env.get("shift"):
            from nestune.platform.shift import store_member_shift

            cuda = device == "cuda"
            # Scoring under shift is measurement, the same for every strategy: its seconds are
            # reported beside the member's device-seconds, not in them, so budgets stay as
            # they are with shift off.
            metrics["shift_seconds"] = store_member_shift(
                member.model, data, out, env["shift"], device,
                amp=cuda and bool(member.config.get("amp")),
                channels_last=cuda and bool(member.config.get("channels_last")))
        return metrics
    from nestune.platform.search import run_search

    merged = {**(env.get("search") or {}), **job}
    return _store_search(run_search(merged, data, device), out)


def _store_member(member: Any, out: Path) -> dict[str, Any]:
    member.save(out)
    metrics = {k: float(v) for k, v in member.metrics.items() if _is_number(v)}
    metrics.update(device_seconds=float(member.device_seconds), num_params=float(member.num_params))
    return metrics


def _store_search(result: Mapping[str, Any], out: Path) -> dict[str, Any]:
    (out / "genotype.json").write_text(str(result["genotype"]))
    extra = result.get("extra") or {}
    (out / "search.json").write_text(json.dumps(
        {"method": result.get("method"), "genotype": result["genotype"],
         "device_seconds": float(result["device_seconds"]), "extra": extra},
        default=_json_default))
    arrays = result.get("arrays") or {}
    if arrays:
        np.savez(out / "arrays.npz", **{k: np.asarray(v) for k, v in arrays.items()})
    metrics = {k: float(v) for k, v in extra.items() if _is_number(v)}
    metrics["device_seconds"] = float(result["device_seconds"])
    return metrics


def _execute_distributed(job: Mapping[str, Any], env: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """A job data-parallel on ``env["workers"]`` Ray Train workers started from this trial
    (:mod:`nestune.platform.distributed`); whole GPUs per worker when the study asks for any."""
    from nestune.platform.distributed import run_job_distributed

    result = run_job_distributed(
        job, dict(env.get("data") or {"name": "digits"}), int(env["workers"]),
        use_gpu=float(env.get("gpu") or 0) > 0,
        cpus_per_worker=float(env.get("cpu") or 1),
        search_defaults=env.get("search") or {},
        train_defaults=env.get("train") or {},
        report_defaults={METRIC: float("nan")},
        storage_path=env.get("train_storage_path"),
        shift=env.get("shift") if job["kind"] == "member" else None,
    )
    if job["kind"] == "member":
        from nestune.platform.shift import save_shifted

        for split, probs in (result.get("shifted") or {}).items():
            save_shifted(out, probs, split)
        return _store_member(result["member"], out)
    return _store_search(result, out)


def run_job(config: dict[str, Any]) -> None:
    """The Tune function trainable: run ``config["job"]`` and report it with its checkpoint.

    A job that raises is reported as a result with ``error`` set (and no checkpoint), so the
    strategy is told why and the study goes on; only a crashed process surfaces as a Tune
    trial error.
    """
    import ray
    import torch

    job, env = config["job"], config.get("env") or {}
    # A data-parallel job's trial only coordinates (its Train workers hold the CPUs).
    cpus = 1.0 if int(env.get("workers") or 1) > 1 else float(env.get("cpu") or 1)
    threads = max(1, int(math.floor(cpus)))
    torch.set_num_threads(threads)
    metrics: dict[str, Any] = {
        "kind": job.get("kind"),
        METRIC: float("nan"),
        "device_seconds": 0.0,
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "threads": threads,
    }
    out = tempfile.mkdtemp(prefix="nestune-job-")
    started = time.perf_counter()
    try:
        metrics.update(execute_job(job, env, out))
        (Path(out) / "trial.json").write_text(json.dumps(
            {"node_id": metrics["node_id"], "hostname": metrics["hostname"], "pid": os.getpid()}))
        (Path(out) / REPORT_FILE).write_text(json.dumps(metrics, default=_json_default))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(out))
    except Exception as e:
        metrics["error"] = f"{type(e).__name__}: {e}"
        metrics["traceback"] = traceback.format_exc()[-4000:]
        metrics["device_seconds"] = time.perf_counter() - started
        tune.report(metrics)
    finally:
        shutil.rmtree(out, ignore_errors=True)
