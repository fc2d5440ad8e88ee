"""The Study driver: run ensemble search strategies side by side on Ray Tune, track them in
MLflow, and score every strategy's ensemble on equal budgets.

A study is a list of strategies x a list of seeds. Each (strategy, seed) is one Ray Tune run
(:mod:`nestune.platform.runner`); after every finished member the strategy's current ensemble
(``strategy.select`` over its pool so far, on the validation split) is scored on the test
split, which gives the anytime curves. Everything a study produces lives in its
``output_dir``::

    <output_dir>/
      study.json                the study's settings
      mlflow.db, mlartifacts/   the default MLflow store (MLFLOW_TRACKING_URI overrides)
      ray/                      Ray Tune's storage (default storage_path): one experiment per
                                (strategy, seed, session); each trial's checkpoint holds the
                                member's val/test probabilities (float16) and genotype
      state/<label>-s<seed>/    ledger.jsonl (finished jobs) and searcher.pkl (resume state)
      results/                  table.csv, curves.csv, members.csv, failures.csv,
                                labels_val.npy, labels_test.npy

Running the same study again (same name and output_dir) continues where it stopped: the
strategies' states are restored and no finished job is trained again. A larger budget
extends a finished study.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nestune.platform.runner import Budget, Ledger, StrategySearcher, load_outputs
from nestune.platform.strategy import Strategy, StrategyContext, get_strategy, make_strategy

__all__ = ["Study", "StudyInterrupted", "StudyResult"]

log = logging.getLogger(__name__)

TABLE_COLUMNS = [
    "strategy", "seed", "accuracy", "nll", "ece", "brier", "oracle_nll", "disagreement",
    "best_member_accuracy", "avg_member_nll", "members", "device_hours",
]
CURVE_COLUMNS = ["strategy", "seed", "members", "device_hours", "nll", "error", "ece", "brier"]
MEMBER_COLUMNS = [
    "strategy", "seed", "trial_id", "kind", "genotype", "device_seconds", "val_nll", "val_error",
    "test_nll", "test_error", "path",
]
DATA_OPTIONS = ("root", "val_fraction", "seed", "download", "subset", "cache_dir")
RESOURCE_KEYS = ("cpu", "gpu", "memory", "workers")
STUDY_FIELDS = (
    "name", "data", "strategies", "seeds", "budget", "ensemble_size", "train", "search",
    "resources", "tracking_uri", "storage_path", "output_dir", "data_options", "ray_address",
    "max_concurrent", "num_cpus", "verbose", "shift",
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StudyInterrupted(RuntimeError):
    """A study's Tune run stopped before its budget was spent (Ctrl-C); run it again to resume."""


# ------------------------------------------------------------------------------------ result


class StudyResult:
    """What a study produced, as pandas DataFrames, read back from its ``output_dir``.

    - :meth:`table`: one row per (strategy, seed): the final ensemble's test ``accuracy``,
      ``nll``, ``ece``, ``brier``, ``oracle_nll``, ``disagreement``; ``best_member_accuracy``
      (test accuracy of the pool's member with the best validation NLL: the network a
      single-model search would keep); ``avg_member_nll`` (mean test NLL of the ensemble's
      members); ``members`` trained and ``device_hours`` spent, searches included.
    - :attr:`curves`: one row per finished member: the ensemble at that point, on test.
    - :attr:`members`: one row per finished job, with ``path`` to its stored probabilities.
    - :attr:`failures`: one row per failed job, with its error.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        table: pd.DataFrame,
        curves: pd.DataFrame,
        members: pd.DataFrame,
        failures: pd.DataFrame,
        labels: Mapping[str, np.ndarray],
        settings: Mapping[str, Any],
    ) -> None:
        self.output_dir = str(Path(output_dir).resolve())
        self._table = table
        self.curves = curves
        self.members = members
        self.failures = failures
        self._labels = {k: np.asarray(v) for k, v in labels.items()}
        self.settings = dict(settings)

    @property
    def name(self) -> str:
        return str(self.settings.get("name", Path(self.output_dir).name))

    @property
    def tracking_uri(self) -> str | None:
        return self.settings.get("tracking_uri")

    def table(self) -> pd.DataFrame:
        """One row per (strategy, seed) (a copy)."""
        return self._table.copy()

    def labels(self, split: str) -> np.ndarray:
        """The ``"val"`` or ``"test"`` labels the stored probabilities are scored against."""
        if split not in self._labels:
            raise ValueError(f"labels.split: expected 'val' or 'test', got {split!r}")
        return self._labels[split].copy()

    def probs(self, trial_id: str, split: str = "test") -> np.ndarray:
        """The stored probabilities (float32) of one member, by trial id."""
        if split not in ("val", "test"):
            raise ValueError(f"probs.split: expected 'val' or 'test', got {split!r}")
        rows = self.members[self.members["trial_id"] == trial_id]
        if rows.empty:
            raise ValueError(f"probs.trial_id: no member with trial id {trial_id!r}")
        return np.load(Path(rows.iloc[0]["path"]) / f"{split}_probs.npy").astype(np.float32)

    def save(self) -> Path:
        d = Path(self.output_dir) / "results"
        d.mkdir(parents=True, exist_ok=True)
        self._table.to_csv(d / "table.csv", index=False)
        self.curves.to_csv(d / "curves.csv", index=False)
        self.members.to_csv(d / "members.csv", index=False)
        self.failures.to_csv(d / "failures.csv", index=False)
        for split, y in self._labels.items():
            np.save(d / f"labels_{split}.npy", y)
        return d

    @classmethod
    def load(cls, output_dir: str | os.PathLike) -> StudyResult:
        """Read a study's results back from its output folder (as written by ``Study.run``)."""
        out = Path(output_dir).expanduser().resolve()
        d = out / "results"
        if not (d / "table.csv").is_file():
            raise ValueError(f"output_dir: {out} holds no study results (no results/table.csv)")

        def csv(name: str, columns: list[str]) -> pd.DataFrame:
            p = d / name
            if not p.is_file() or p.stat().st_size == 0:
                return pd.DataFrame(columns=columns)
            try:
                return pd.read_csv(p)
            except pd.errors.EmptyDataError:
                return pd.DataFrame(columns=columns)

        labels = {s: np.load(d / f"labels_{s}.npy") for s in ("val", "test")
                  if (d / f"labels_{s}.npy").is_file()}
        settings = json.loads((out / "study.json").read_text()) if (out / "study.json").is_file() else {}
        return cls(out, csv("table.csv", TABLE_COLUMNS), csv("curves.csv", CURVE_COLUMNS),
                   csv("members.csv", MEMBER_COLUMNS), csv("failures.csv", []), labels, settings)

    def __repr__(self) -> str:
        return f"StudyResult({self.name!r}, {len(self._table)} runs, output_dir={self.output_dir!r})"


# ------------------------------------------------------------------------------------ scoring


def score_ensemble(
    strategy: Strategy,
    val_probs: np.ndarray,
    test_probs: Sequence[np.ndarray],
    val_labels: np.ndarray,
    test_labels: np.ndarray,
    size: int,
    *,
    member_val_nll: Sequence[float] | None = None,
    member_test_error: Sequence[float] | None = None,
) -> tuple[list[int], dict[str, float]]:
    """The strategy's ensemble over a pool (``strategy.select`` on the (K, N, C) validation
    probabilities) and its test metrics. ``test_probs`` is indexed by member (a list will do:
    only the chosen members' are stacked); the members' own val NLL and test error may be
    given when already known."""
    from nestune.platform import metrics as M

    chosen = [int(i) for i in strategy.select(val_probs, val_labels, size)]
    if not chosen:
        raise ValueError(f"{strategy.name}.select returned an empty ensemble")
    members = np.stack([np.asarray(test_probs[i], dtype=np.float32) for i in chosen])
    ens = members.mean(axis=0)
    scores = {
        "nll": M.nll(ens, test_labels),
        "error": M.error(ens, test_labels),
        "ece": M.ece(ens, test_labels),
        "brier": M.brier(ens, test_labels),
        "oracle_nll": M.oracle_nll(members, test_labels),
        "disagreement": M.disagreement(members) if len(chosen) > 1 else 0.0,
        "avg_member_nll": float(np.mean([M.nll(p, test_labels) for p in members])),
    }
    scores["accuracy"] = 1.0 - scores["error"]
    if member_val_nll is None:
        member_val_nll = [M.nll(p, val_labels) for p in val_probs]
    best = int(np.argmin(member_val_nll))
    best_error = (member_test_error[best] if member_test_error is not None
                  else M.error(np.asarray(test_probs[best], dtype=np.float32), test_labels))
    scores["best_member_accuracy"] = 1.0 - float(best_error)
    return chosen, {k: float(v) for k, v in scores.items()}


# ------------------------------------------------------------------------------------ study


@dataclass
class _Spec:
    label: str
    name: str
    hparams: dict[str, Any]
    prototype: Strategy

    def instance(self) -> Strategy:
        return copy.deepcopy(self.prototype)


class Study:
    """A comparative study: ``strategies`` x ``seeds`` on ``data``, each (strategy, seed) given
    the same ``budget``, its ensemble of ``ensemble_size`` built by the strategy's ``select``.

    Args:
        name: the study's name: its MLflow experiment and output folder (letters, digits,
            ``_ . -``).
        data: a data set name for :func:`nestune.platform.data.load_data`.
        strategies: registered names, ``(name, hparams)`` or ``(name, hparams, label)``
            tuples, or Strategy instances. Labels must be unique.
        seeds: one Tune run per strategy per seed.
        budget: ``Budget(members=N)`` / ``Budget(device_hours=H)``, an int (members) or a dict.
        ensemble_size: the size M of each strategy's ensemble.
        train: :class:`~nestune.platform.training.TrainConfig` or a dict of its fields: how
            members are trained (a job may override fields).
        search: defaults merged into every search job (the job's own keys win).
        resources: per trial, ``{"cpu": 1, "gpu": 0.25, "memory": bytes}``; a fractional GPU
            lets several small trials share one device. ``workers = n > 1`` runs every job
            data-parallel on n Ray Train workers of ``cpu`` CPUs (and one GPU if ``gpu``) each.
        max_concurrent: bound on concurrent trials (default: what the resources fit, capped by
            memory at about 1 GiB per trial, since each trial process holds torch).
        tracking_uri: MLflow store (default ``MLFLOW_TRACKING_URI`` or ``<output_dir>/mlflow.db``).
        storage_path: Ray Tune's storage: a path every node sees or a bucket URI (default
            ``<output_dir>/ray``; a given one gets a ``<name>/`` subfolder).
        output_dir: the study's folder (default ``./nestune_runs/<name>``).
        data_options: more ``load_data`` arguments (``root``, ``val_fraction``, ``seed``,
            ``download``, ``subset``, ``cache_dir``).
        ray_address: attach to this Ray cluster (default ``RAY_ADDRESS``; none: start Ray
            in this process).
        num_cpus: CPUs of an in-process Ray (default ``os.cpu_count()``).
        verbose: print one progress line per finished job.
        shift: score members under dataset shift: ``True``, or a dict of
            :func:`nestune.platform.shift.shift_options` (``corruptions``, ``severities``,
            ``subset``, ``val``, ...). Each member then also stores its predictions on the
            corrupted test (and validation) splits, and the report scores every ensemble on
            them. Default off. Its seconds are reported per trial (``shift_seconds``) and are
            not charged to the budget.
    """

    def __init__(
        self,
        name: str,
        data: str = "digits",
        strategies: Sequence[Any] = ("random",),
        seeds: Sequence[int] = (0,),
        budget: Budget | int | Mapping[str, Any] = 10,
        ensemble_size: int = 3,
        train: Any = None,
        search: Mapping[str, Any] | None = None,
        resources: Mapping[str, Any] | None = None,
        tracking_uri: str | None = None,
        storage_path: str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
        data_options: Mapping[str, Any] | None = None,
        ray_address: str | None = None,
        max_concurrent: int | None = None,
        num_cpus: int | None = None,
        verbose: bool = True,
        shift: bool | Mapping[str, Any] | None = None,
    ) -> None:
        from nestune.platform.data import DATASETS
        from nestune.platform.training import TrainConfig

        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"name: expected letters, digits, '_', '.' or '-' (starting with a letter or "
                f"digit), got {name!r}"
            )
        self.name = name
        if not isinstance(data, str) or data.lower().replace("-", "_") not in DATASETS:
            raise ValueError(f"data: expected one of {', '.join(DATASETS)}, got {data!r}")
        self.data = data.lower().replace("-", "_")
        self.specs = _parse_strategies(strategies)
        if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
            seeds = [int(seeds)]
        if (
            not isinstance(seeds, Sequence)
            or isinstance(seeds, str)
            or not seeds
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0
                       for s in seeds)
        ):
            raise ValueError(f"seeds: expected a non-empty list of ints >= 0, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {list(seeds)}")
        self.seeds = [int(s) for s in seeds]
        try:
            self.budget = Budget.coerce(budget)
        except TypeError as e:
            raise ValueError(f"budget: {e}") from None
        if not _is_int(ensemble_size) or ensemble_size < 1:
            raise ValueError(f"ensemble_size: expected an int >= 1, got {ensemble_size!r}")
        self.ensemble_size = int(ensemble_size)
        if train is None:
            self.train = TrainConfig()
        elif isinstance(train, TrainConfig):
            self.train = train
        elif isinstance(train, Mapping):
            try:
                self.train = TrainConfig.from_dict(dict(train))
            except ValueError as e:
                raise ValueError(f"train: {e}") from None
        else:
            raise ValueError(f"train: expected a TrainConfig or a dict, got {train!r}")
        self.search = _json_dict(search, "search")
        from nestune.platform.search import check_search_defaults

        check_search_defaults(self.search)
        self.resources = _parse_resources(resources)
        if max_concurrent is not None and (not _is_int(max_concurrent) or max_concurrent < 1):
            raise ValueError(f"max_concurrent: expected None or an int >= 1, got {max_concurrent!r}")
        self.max_concurrent = max_concurrent
        if num_cpus is not None and (not _is_int(num_cpus) or num_cpus < 1):
            raise ValueError(f"num_cpus: expected None or an int >= 1, got {num_cpus!r}")
        self.num_cpus = num_cpus
        if output_dir is None:
            output_dir = Path.cwd() / "nestune_runs" / name
        elif not isinstance(output_dir, (str, os.PathLike)) or str(output_dir) == "":
            raise ValueError(f"output_dir: expected a path, got {output_dir!r}")
        self.output_dir = Path(output_dir).expanduser().resolve()
        if storage_path is None:
            self.storage_path = str(self.output_dir / "ray")
        elif isinstance(storage_path, (str, os.PathLike)) and str(storage_path):
            sp = str(storage_path)
            if "://" in sp:
                self.storage_path = f"{sp.rstrip('/')}/{name}"
            else:
                # Trials run in Ray's working directories: the path must be absolute.
                self.storage_path = str(Path(sp).expanduser().resolve() / name)
        else:
            raise ValueError(f"storage_path: expected a path or a URI, got {storage_path!r}")
        if tracking_uri is not None and (not isinstance(tracking_uri, str) or not tracking_uri):
            raise ValueError(f"tracking_uri: expected a URI string, got {tracking_uri!r}")
        self._tracking_uri = tracking_uri
        self.data_options = _parse_data_options(data_options)
        if ray_address is not None and (not isinstance(ray_address, str) or not ray_address):
            raise ValueError(f"ray_address: expected an address string, got {ray_address!r}")
        self.ray_address = ray_address
        if not isinstance(verbose, bool):
            raise ValueError(f"verbose: expected a bool, got {verbose!r}")
        self.verbose = verbose
        from nestune.platform.shift import shift_options

        self.shift = shift_options(shift)

    # ---------------------------------------------------------------- study files

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, where: str = "study file",
                    **overrides: Any) -> Study:
        """A Study from a dict shaped like a study file (see ``runs/quickstart.toml``):
        the Study's arguments at the top level, ``[[strategies]]`` tables with ``name``, an
        optional ``label``, ``optional = true`` (skip it when no such strategy is registered)
        and the hyperparameters. Every unknown or ill-typed field is a ``ValueError`` that names
        it. ``overrides`` replace top-level fields."""
        if not isinstance(config, Mapping):
            raise ValueError(f"{where}: expected a table of study settings, got {config!r}")
        config = {**config, **{k: v for k, v in overrides.items() if v is not None}}
        unknown = sorted(set(config) - set(STUDY_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(STUDY_FIELDS)})")
        if "name" not in config:
            raise ValueError(f"{where}: field 'name' is required")
        entries = config.get("strategies")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{where}: 'strategies' must be a non-empty list of [[strategies]] tables")
        strategies: list[Any] = []
        for i, entry in enumerate(entries):
            at = f"{where}: strategies[{i}]"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{at}: expected a table with a 'name', got {entry!r}")
            entry = dict(entry)
            name = entry.pop("name", None)
            if not isinstance(name, str):
                raise ValueError(f"{at}.name: expected a strategy name, got {name!r}")
            label = entry.pop("label", name)
            optional = entry.pop("optional", False)
            if not isinstance(optional, bool):
                raise ValueError(f"{at}.optional: expected true or false, got {optional!r}")
            try:
                get_strategy(name)
            except ValueError:
                if optional:
                    continue
                raise ValueError(f"{at}.name: {name!r} is not a registered strategy "
                                 "(set optional = true to skip it when absent)") from None
            try:
                make_strategy(name, **entry)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{at}: {e}") from None
            strategies.append((name, entry, label))
        if not strategies:
            raise ValueError(f"{where}: none of the strategies is registered")
        kwargs = {k: v for k, v in config.items() if k != "strategies"}
        kwargs["strategies"] = strategies
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> Study:
        """A Study from a TOML study file (relative paths in it are relative to the current
        directory, like the command line's)."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]

        p = Path(path)
        if not p.is_file():
            raise ValueError(f"study file: {p} does not exist")
        try:
            config = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"study file {p}: not valid TOML ({e})") from None
        return cls.from_config(config, where=f"study file {p}", **overrides)

    # ---------------------------------------------------------------- settings

    @property
    def tracking_uri(self) -> str:
        from nestune.platform.tracking import default_tracking_uri

        return self._tracking_uri or default_tracking_uri(self.output_dir)

    @property
    def data_spec(self) -> dict[str, Any]:
        return {"name": self.data, **self.data_options}

    def settings(self) -> dict[str, Any]:
        """The study's settings, as written to ``study.json`` and logged to MLflow."""
        return {
            "name": self.name,
            "data": self.data_spec,
            "strategies": [{"label": s.label, "name": s.name, "hparams": _jsonable(s.hparams)}
                           for s in self.specs],
            "seeds": self.seeds,
            "budget": self.budget.to_dict(),
            "ensemble_size": self.ensemble_size,
            "train": self.train.to_dict(),
            "search": self.search,
            "resources": self.resources,
            "shift": self.shift,
            "output_dir": str(self.output_dir),
            "storage_path": self.storage_path,
            "tracking_uri": self.tracking_uri,
        }

    # ---------------------------------------------------------------- run

    def run(self) -> StudyResult:
        """Run every (strategy, seed) to its budget (continuing a stored run) and score them."""
        from nestune.platform.data import load_data
        from nestune.platform.tracking import Tracker, is_local_store

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._check_stored_settings()
        (self.output_dir / "study.json").write_text(json.dumps(self.settings(), indent=1))
        data = load_data(**self.data_spec)
        labels = {"val": data.val.y.numpy().copy(), "test": data.test.y.numpy().copy()}
        del data

        uri = self.tracking_uri
        artifacts = (self.output_dir / "mlartifacts").as_uri() if is_local_store(uri) else None
        tracker = Tracker(uri, self.name, artifact_location=artifacts,
                          tags={"nestune.output_dir": str(self.output_dir)})
        started_ray = _ensure_ray(self.ray_address, self.num_cpus, self.resources)
        # The legacy reporter at verbose=0 prints nothing; the new one still draws its boxes.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        runs: list[_RunRecord] = []
        try:
            concurrency = self.max_concurrent or _default_concurrency(self.resources)
            self._say(f"study {self.name!r}: {len(self.specs)} strategies x {len(self.seeds)} "
                      f"seeds, budget {self.budget.to_dict()}, up to {concurrency} concurrent trials; "
                      f"output in {self.output_dir}")
            for spec in self.specs:
                for seed in self.seeds:
                    rec = _RunRecord(self, spec, seed, labels, tracker)
                    runs.append(rec)
                    rec.run(concurrency)
                    self._collect(runs, labels).save()
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        result = self._collect(runs, labels)
        result.save()
        return result

    def _check_stored_settings(self) -> None:
        """A study continued in its output_dir must keep what its stored members depend on."""
        stored_file = self.output_dir / "study.json"
        if not stored_file.is_file():
            return
        try:
            stored = json.loads(stored_file.read_text())
        except json.JSONDecodeError:
            return
        mine = self.settings()
        for key in ("data", "train", "storage_path"):
            if key in stored and stored[key] != mine[key]:
                raise ValueError(
                    f"{key}: the study in {self.output_dir} was run with {key} = {stored[key]}, "
                    f"not {mine[key]}; its stored members depend on it. Use a new study name "
                    "or output_dir for the changed study"
                )

    def _collect(self, runs: list[_RunRecord], labels: Mapping[str, np.ndarray]) -> StudyResult:
        table = pd.DataFrame([r.table_row() for r in runs], columns=TABLE_COLUMNS)
        curves = pd.DataFrame([row for r in runs for row in r.curve], columns=CURVE_COLUMNS)
        member_rows = [row for r in runs for row in r.member_rows()]
        members = pd.DataFrame(member_rows)
        if members.empty:
            members = pd.DataFrame(columns=MEMBER_COLUMNS)
        else:
            extra = [c for c in members.columns if c not in MEMBER_COLUMNS]
            members = members[MEMBER_COLUMNS + extra]
        failures = pd.DataFrame([row for r in runs for row in r.failure_rows()],
                                columns=["strategy", "seed", "trial_id", "kind", "error", "job"])
        return StudyResult(self.output_dir, table, curves, members, failures, labels,
                           self.settings())

    def _say(self, text: str) -> None:
        if self.verbose:
            print(f"[{self.name}] {text}", flush=True)


class _RunRecord:
    """One (strategy, seed): its searcher, its pool of members, its curve and MLflow runs."""

    def __init__(self, study: Study, spec: _Spec, seed: int, labels: Mapping[str, np.ndarray],
                 tracker: Any) -> None:
        from nestune.search_spaces.darts import DartsSpace

        self.study, self.spec, self.seed, self.labels, self.tracker = study, spec, seed, labels, tracker
        self.state_dir = study.output_dir / "state" / f"{spec.label}-s{seed}"
        self.ledger = Ledger(self.state_dir / "ledger.jsonl")
        context = StrategyContext(space=DartsSpace(), seed=seed, ensemble_size=study.ensemble_size,
                                  val_labels=labels["val"])
        env = {
            "study": study.name,
            "label": spec.label,
            "seed": seed,
            "data": study.data_spec,
            "train": study.train.to_dict(),
            "search": study.search,
            # Where the Ray Train runs of data-parallel jobs persist (shared on a cluster).
            "train_storage_path": f"{study.storage_path.rstrip('/')}/train",
            "shift": study.shift,
            **study.resources,
        }
        self.searcher = StrategySearcher(
            spec.instance(), context, study.budget, env=env, ledger=self.ledger,
            state_path=self.state_dir / "searcher.pkl",
            download_dir=study.output_dir / "members" / f"{spec.label}-s{seed}",
            listeners=[self._on_entry], storage_path=study.storage_path,
        )
        state = self.state_dir / "searcher.pkl"
        if state.exists():
            self.searcher.restore(str(state))
        self.pool: list[dict[str, Any]] = []  # ledger entries of members, with test probs
        self._val: np.ndarray | None = None  # the pool's validation probabilities, (K, N, C)
        self.curve: list[dict[str, Any]] = []
        self.ensemble: list[int] = []
        self.final: dict[str, float] = {}
        self.parent_id: str | None = None
        # The members finished in earlier runs of the study, and their anytime curve.
        cumulative = 0.0
        for entry in self.ledger.entries:
            cumulative += float(entry.get("device_seconds") or 0.0)
            if entry.get("ok") and entry.get("kind") == "member":
                try:
                    arrays = load_outputs(entry["path"], "member")
                except Exception as e:
                    log.warning("%s: stored member %s unreadable (%s); left out",
                                spec.label, entry.get("trial_id"), e)
                    continue
                self._add(entry, arrays, cumulative, log_it=False)

    # ---------------------------------------------------------------- running

    def run(self, concurrency: int) -> None:
        from ray import tune

        from nestune.platform.runner import run_job, trial_dirname

        study, spec, seed = self.study, self.spec, self.seed
        params = {
            "strategy": spec.name,
            "label": spec.label,
            "seed": seed,
            "hp": _jsonable(spec.hparams),
            "data": study.data_spec,
            "budget": study.budget.to_dict(),
            "ensemble_size": study.ensemble_size,
            "train": study.train.to_dict(),
            "resources": study.resources,
        }
        if study.search:
            params["search"] = study.search
        self.parent_id = self.tracker.start_parent(
            spec.label, seed, params,
            tags={"nestune.study": study.name, "nestune.budget": json.dumps(study.budget.to_dict())},
        )
        members, seconds, _ = self.searcher.totals()
        status = "FINISHED"
        try:
            if study.budget.spent(members, seconds):
                study._say(f"{spec.label} seed {seed}: budget already spent "
                           f"({study.budget.describe(members, seconds)}); nothing to run")
            else:
                if members or seconds:
                    study._say(f"{spec.label} seed {seed}: resuming at "
                               f"{study.budget.describe(members, seconds)}")
                trainable = tune.with_resources(run_job, _ray_resources(study.resources))
                tuner = tune.Tuner(
                    trainable,
                    tune_config=tune.TuneConfig(
                        search_alg=self.searcher,
                        num_samples=-1,
                        max_concurrent_trials=concurrency,
                        reuse_actors=True,
                        trial_dirname_creator=trial_dirname,
                    ),
                    run_config=tune.RunConfig(
                        name=f"{spec.label}-s{seed}-r{self.searcher.session}",
                        storage_path=study.storage_path,
                        verbose=0,
                        callbacks=[self.searcher.callback()],
                        failure_config=tune.FailureConfig(max_failures=1),
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                    ),
                )
                tuner.fit()
                if not self.searcher.is_finished:
                    status = "KILLED"
                    raise StudyInterrupted(
                        f"{spec.label} seed {seed} stopped at "
                        f"{study.budget.describe(*self.searcher.totals()[:2])}; run the study "
                        "again to resume"
                    )
                if self.searcher.strategy_error:
                    study._say(f"{spec.label} seed {seed}: the strategy raised; stopped early:\n"
                               f"{self.searcher.strategy_error}")
        except BaseException:
            status = "KILLED"
            raise
        finally:
            self._finish(status)

    def _finish(self, status: str) -> None:
        members, seconds, failed = self.searcher.totals()
        row = self.table_row()
        if self.parent_id is not None:
            try:
                if self.pool:
                    ensemble = [self._member_doc(self.pool[i]) for i in self.ensemble]
                    metrics = {k: row[k] for k in TABLE_COLUMNS if k not in ("strategy", "seed")}
                    self.tracker.log_final(self.parent_id, metrics, ensemble, step=members)
                try:
                    self._log_outputs(step=members)
                except Exception:
                    log.exception("%s: MLflow logging of the cost split and member diversity failed",
                                  self.spec.label)
                self.tracker.end_run(self.parent_id, status)
            except Exception:
                log.exception("%s: MLflow logging of the final ensemble failed", self.spec.label)
        reason = self.searcher.finish_reason or ("interrupted" if status == "KILLED" else "stopped")
        self.study._say(
            f"{self.spec.label} seed {self.seed}: done ({reason}): "
            f"{self.study.budget.describe(members, seconds)}, {failed} failed; "
            + (f"ensemble test accuracy {row['accuracy']:.4f}, nll {row['nll']:.4f}"
               if self.pool else "no members")
        )

    def _log_outputs(self, step: int) -> None:
        """The parent run's cost split, the strategy's own files, and per-member diversity."""
        costs: dict[str, float] = {}
        for e in self.ledger.entries:  # failed jobs too: they were paid for
            job = e.get("job") if isinstance(e.get("job"), dict) else {}
            part = "members" if e.get("kind") == "member" else "_".join(
                str(x) for x in (e.get("kind") or "job", job.get("method")) if x)
            costs[f"cost_{part}_seconds"] = costs.get(f"cost_{part}_seconds", 0.0) + float(
                e.get("device_seconds") or 0.0)
        self.tracker.log_ensemble(self.parent_id, step, costs)
        files = getattr(self.searcher.strategy, "artifacts", None)
        if callable(files) and (got := files()):
            self.tracker.log_files(self.parent_id, got)
        if not self.pool:
            return
        k = len(self.pool)
        chosen = set(self.ensemble)
        disagree = {split: _member_disagreement(probs) for split, probs in (
            ("val", self._val[:k]), ("test", np.stack([m["test_probs"] for m in self.pool])))}
        rows, metrics = [], {}
        for i, m in enumerate(self.pool):
            job = m["job"] if isinstance(m.get("job"), dict) else {}
            values = {"test_disagreement": float(disagree["test"][i]),
                      "val_disagreement": float(disagree["val"][i]), "in_ensemble": float(i in chosen)}
            metrics[str(m.get("trial_id"))] = values
            rows.append({"trial_id": m.get("trial_id"),
                         **{key: v for key, v in job.items() if key not in ("kind", "genotype")
                            and isinstance(v, (int, float, str, bool))},
                         "val_nll": m["val_nll"], "test_error": m["test_error"], **values})
        self.tracker.log_member_metrics(self.parent_id, metrics)
        self.tracker.log_files(self.parent_id,
                               {"members.csv": pd.DataFrame(rows).to_csv(index=False).encode()})

    def _on_entry(self, searcher: StrategySearcher, entry: dict[str, Any], outputs: dict[str, Any]) -> None:
        """Listener: a job finished (or failed) in this session."""
        members, seconds, failed = searcher.totals()
        if entry.get("ok") and entry.get("kind") == "member":
            self._add(entry, outputs, seconds, log_it=True)
        if self.parent_id is not None:
            try:
                from nestune.platform.tracking import search_curves

                self.tracker.log_trial(self.parent_id, entry, label=self.spec.label, seed=self.seed,
                                       genotype=outputs.get("genotype"),
                                       curves=search_curves(outputs.get("extra")))
            except Exception:
                log.exception("%s: MLflow logging of trial %s failed", self.spec.label,
                              entry.get("trial_id"))
        where = f"{self.spec.label} seed {self.seed}: {self.study.budget.describe(members, seconds)}"
        if entry.get("ok"):
            tail = ""
            if self.curve and entry.get("kind") == "member":
                c = self.curve[-1]
                tail = f"; ensemble test error {c['error']:.4f}, nll {c['nll']:.4f}"
            cost = float(entry.get("device_seconds") or 0.0)
            self.study._say(f"{where} ({entry['kind']} {entry.get('trial_id')} done in {cost:.0f}s)"
                            f"{tail}")
        else:
            err = str(entry.get("error") or "failed").strip().splitlines()
            self.study._say(f"{where}; {entry.get('kind')} {entry.get('trial_id')} FAILED: "
                            f"{err[-1] if err else ''}")

    def _add(self, entry: dict[str, Any], arrays: dict[str, Any], cumulative_seconds: float,
             log_it: bool) -> None:
        from nestune.platform import metrics as M

        val = np.asarray(arrays["val_probs"], dtype=np.float32)
        test = np.asarray(arrays["test_probs"], dtype=np.float16)  # half the memory; scored in fp32
        k = len(self.pool)
        if self._val is None or k == len(self._val):
            # A growing (K, N, C) buffer: select() gets a view, not a restack of the whole pool.
            grown = np.empty((max(8, 2 * k), *val.shape), dtype=np.float32)
            if self._val is not None:
                grown[:k] = self._val[:k]
            self._val = grown
        self._val[k] = val
        self.pool.append({**entry, "test_probs": test,
                          "val_nll": M.nll(val, self.labels["val"]),
                          "test_error": M.error(test.astype(np.float32), self.labels["test"]),
                          "genotype_json": arrays.get("genotype") or entry["job"].get("genotype")})
        chosen, scores = self._score()
        self.ensemble = chosen
        self.final = scores
        point = {
            "strategy": self.spec.label,
            "seed": self.seed,
            "members": len(self.pool),
            "device_hours": cumulative_seconds / 3600.0,
            **{k: scores[k] for k in ("nll", "error", "ece", "brier")},
        }
        self.curve.append(point)
        if log_it and self.parent_id is not None:
            try:
                self.tracker.log_ensemble(
                    self.parent_id, len(self.pool),
                    {**{k: scores[k] for k in ("nll", "error", "accuracy", "ece", "brier")},
                     "device_hours": point["device_hours"]},
                )
            except Exception:
                log.exception("%s: MLflow logging of the ensemble failed", self.spec.label)

    def _score(self) -> tuple[list[int], dict[str, float]]:
        k = len(self.pool)
        return score_ensemble(
            self.searcher.strategy, self._val[:k], [m["test_probs"] for m in self.pool],
            self.labels["val"], self.labels["test"], self.study.ensemble_size,
            member_val_nll=[m["val_nll"] for m in self.pool],
            member_test_error=[m["test_error"] for m in self.pool],
        )

    # ---------------------------------------------------------------- rows

    def table_row(self) -> dict[str, Any]:
        members, seconds, _ = self.searcher.totals()
        row: dict[str, Any] = {"strategy": self.spec.label, "seed": self.seed}
        for k in TABLE_COLUMNS[2:-2]:
            row[k] = self.final.get(k, math.nan)
        row["members"] = members
        row["device_hours"] = seconds / 3600.0
        return row

    def member_rows(self) -> list[dict[str, Any]]:
        rows = []
        for e in self.ledger.entries:
            if not e.get("ok"):
                continue
            job = e["job"] if isinstance(e.get("job"), dict) else {}
            m = e.get("metrics") or {}
            row = {
                "strategy": self.spec.label,
                "seed": self.seed,
                "trial_id": e.get("trial_id"),
                "kind": e.get("kind"),
                "genotype": _genotype_of(e, job),
                "device_seconds": float(e.get("device_seconds") or 0.0),
                "val_nll": m.get("val_nll", math.nan),
                "val_error": m.get("val_error", math.nan),
                "test_nll": m.get("test_nll", math.nan),
                "test_error": m.get("test_error", math.nan),
                "shift_seconds": m.get("shift_seconds", math.nan),
                "path": e.get("path"),
                "node_id": e.get("node_id"),
                "hostname": e.get("hostname"),
            }
            for k, v in job.items():
                if k in ("kind", "genotype"):
                    continue
                col = f"job_{k}" if k in row else k
                row[col] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
            rows.append(row)
        return rows

    def failure_rows(self) -> list[dict[str, Any]]:
        return [
            {"strategy": self.spec.label, "seed": self.seed, "trial_id": e.get("trial_id"),
             "kind": e.get("kind"), "error": e.get("error"), "job": json.dumps(e.get("job"))}
            for e in self.ledger.entries if not e.get("ok")
        ]

    def _member_doc(self, m: dict[str, Any]) -> dict[str, Any]:
        from nestune.search_spaces.genotype import Genotype

        geno = m.get("genotype_json")
        try:
            g = Genotype.from_json(geno)
            doc, rep = g.to_dict(), str(g)
        except Exception:
            doc, rep = geno, geno
        return {"trial_id": m.get("trial_id"), "job_seed": m["job"].get("seed"), "genotype": doc,
                "genotype_repr": rep, "path": m.get("path"), "metrics": m.get("metrics"),
                "job": m["job"]}


# ------------------------------------------------------------------------------------ helpers


def _member_disagreement(probs: np.ndarray) -> np.ndarray:
    """Per member, the mean over the other members of the share of samples on which the two
    predict different classes, (K, N, C) -> (K,); its mean is ``metrics.disagreement``."""
    preds = np.asarray(probs).argmax(axis=-1)
    k = len(preds)
    if k < 2:
        return np.zeros(k)
    # One member against all at a time: O(K·N) memory, not O(K²·N).
    return np.array([(preds != preds[i]).mean(axis=1).sum() / (k - 1) for i in range(k)])


def _genotype_of(entry: Mapping[str, Any], job: Mapping[str, Any]) -> str | None:
    path = entry.get("path")
    if path and (Path(path) / "genotype.json").is_file():
        return (Path(path) / "genotype.json").read_text()
    g = job.get("genotype")
    return g if isinstance(g, str) or g is None else json.dumps(g)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _json_dict(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{field}: expected a dict with string keys, got {value!r}")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{field}: expected JSON-serialisable values ({e})") from None


def _parse_strategies(strategies: Any) -> list[_Spec]:
    if isinstance(strategies, (str, Strategy)) or (
        isinstance(strategies, tuple) and len(strategies) in (2, 3) and isinstance(strategies[0], str)
        and isinstance(strategies[1], Mapping)
    ):
        strategies = [strategies]
    if not isinstance(strategies, Sequence) or not strategies:
        raise ValueError(f"strategies: expected a non-empty list, got {strategies!r}")
    specs: list[_Spec] = []
    for i, item in enumerate(strategies):
        where = f"strategies[{i}]"
        label = None
        if isinstance(item, Strategy):
            proto = copy.deepcopy(item)
            name = item.name or type(item).__name__
            hparams = item.hparams()
        else:
            if isinstance(item, str):
                name, hparams = item, {}
            elif isinstance(item, (tuple, list)) and len(item) in (2, 3) and isinstance(item[0], str):
                name, hparams = item[0], item[1]
                if len(item) == 3:
                    label = item[2]
                if not isinstance(hparams, Mapping):
                    raise ValueError(f"{where}: expected (name, hparams dict), got {item!r}")
            else:
                raise ValueError(
                    f"{where}: expected a name, (name, hparams), (name, hparams, label) or a "
                    f"Strategy instance, got {item!r}"
                )
            try:
                get_strategy(name)
                proto = make_strategy(name, **dict(hparams))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            hparams = proto.hparams()
        label = name if label is None else label
        if not isinstance(label, str) or not _NAME.match(label):
            raise ValueError(f"{where}: label must be letters, digits, '_', '.' or '-', got {label!r}")
        if any(s.label == label for s in specs):
            raise ValueError(
                f"{where}: strategy label {label!r} appears twice; give each a label: "
                "(name, hparams, label) in Python, label = \"...\" in a study file"
            )
        specs.append(_Spec(label, name, dict(hparams), proto))
    return specs


def _parse_resources(resources: Any) -> dict[str, float]:
    if resources is None:
        return {"cpu": 1.0, "gpu": 0.0}
    if not isinstance(resources, Mapping):
        raise ValueError(f"resources: expected a dict like {{'cpu': 1, 'gpu': 0.25}}, got {resources!r}")
    unknown = sorted(set(resources) - set(RESOURCE_KEYS))
    if unknown:
        raise ValueError(f"resources.{unknown[0]}: unknown resource (known: {', '.join(RESOURCE_KEYS)})")
    out = {"cpu": 1.0, "gpu": 0.0}
    for k, v in resources.items():
        if not _is_number(v) or not math.isfinite(v) or v < 0:
            raise ValueError(f"resources.{k}: expected a number >= 0, got {v!r}")
        out[k] = float(v)
    if out["cpu"] <= 0:
        raise ValueError(f"resources.cpu: expected a number > 0, got {resources.get('cpu')!r}")
    if out["gpu"] > 1 and out["gpu"] != int(out["gpu"]):
        raise ValueError(f"resources.gpu: a fraction must be <= 1 (or a whole number), got {out['gpu']}")
    if "workers" in resources:
        w = resources["workers"]
        if not _is_int(w) or w < 1:
            raise ValueError(f"resources.workers: expected an int >= 1, got {w!r}")
        out["workers"] = int(w)
        if w > 1 and out["gpu"] and out["gpu"] != 1:
            raise ValueError("resources.gpu: data-parallel workers take one whole GPU each; "
                             f"use gpu = 1 or 0 with workers = {w}, got {out['gpu']}")
    return out


def _parse_data_options(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"data_options: expected a dict, got {options!r}")
    unknown = sorted(set(options) - set(DATA_OPTIONS))
    if unknown:
        raise ValueError(f"data_options.{unknown[0]}: unknown option (known: {', '.join(DATA_OPTIONS)})")
    out = dict(options)
    for k in ("root", "cache_dir"):
        if out.get(k) is not None:
            if not isinstance(out[k], (str, os.PathLike)):
                raise ValueError(f"data_options.{k}: expected a path, got {out[k]!r}")
            # Trials run in Ray's working directories: paths must be absolute.
            out[k] = str(Path(out[k]).expanduser().resolve())
    if "val_fraction" in out and (not _is_number(out["val_fraction"]) or not 0 < out["val_fraction"] < 1):
        raise ValueError(
            f"data_options.val_fraction: expected a float in (0, 1), got {out['val_fraction']!r}"
        )
    if "seed" in out and (not _is_int(out["seed"]) or out["seed"] < 0):
        raise ValueError(f"data_options.seed: expected an int >= 0, got {out['seed']!r}")
    if "subset" in out and out["subset"] is not None and (not _is_int(out["subset"]) or out["subset"] < 2):
        raise ValueError(f"data_options.subset: expected None or an int >= 2, got {out['subset']!r}")
    if "download" in out and not isinstance(out["download"], bool):
        raise ValueError(f"data_options.download: expected a bool, got {out['download']!r}")
    return _jsonable(out)


def _ray_resources(resources: Mapping[str, float]) -> dict[str, float]:
    if resources.get("workers", 1) > 1:
        # A data-parallel trial only starts its Ray Train workers, which ask for the CPUs (and
        # GPUs) themselves; holding them in the trial too would leave the workers waiting.
        return {"cpu": 0.01}
    out = {"cpu": resources["cpu"], "gpu": resources.get("gpu", 0.0)}
    if resources.get("memory"):
        out["memory"] = resources["memory"]
    return out


def _ensure_ray(address: str | None, num_cpus: int | None,
                resources: Mapping[str, float] | None = None) -> bool:
    """Attach to ``address`` (or ``RAY_ADDRESS``), or start Ray in this process; True when this
    call started it (and the study shuts it down again)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **quiet)
    else:
        if num_cpus is None:
            # Logical CPUs: at least one trial must fit, data-parallel workers and all.
            need = math.ceil(_trial_cpus(resources or {"cpu": 1.0}))
            num_cpus = max(os.cpu_count() or 1, need)
        # address="local": never attach by accident to another Ray on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    return True


def _trial_cpus(resources: Mapping[str, float]) -> float:
    workers = int(resources.get("workers", 1))
    return resources["cpu"] * workers + (0.01 if workers > 1 else 0.0)


def _default_concurrency(resources: Mapping[str, float]) -> int:
    """As many trials as the cluster's resources fit, and about 1 GiB of memory each."""
    import ray

    total = ray.cluster_resources()
    workers = int(resources.get("workers", 1))
    cpu = _trial_cpus(resources)
    gpu = resources.get("gpu", 0.0) * workers
    if cpu > total.get("CPU", 0) or gpu > total.get("GPU", 0):
        log.warning("one trial needs %.2f CPUs and %.2f GPUs; the cluster has %s CPUs and %s GPUs "
                    "now: trials wait until the cluster grows", cpu, gpu, total.get("CPU", 0),
                    total.get("GPU", 0))
    bounds = [int(total.get("CPU", 1) // cpu)]
    if gpu:
        bounds.append(int(total.get("GPU", 0) // gpu))
    if resources.get("memory"):
        bounds.append(int(total.get("memory", 0) // resources["memory"]))
    mem = total.get("memory")
    if mem:
        bounds.append(int(mem // 2**30))
    return max(1, min(bounds))

