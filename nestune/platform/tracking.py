"""MLflow tracking of a study, written by the driver only.

Layout in MLflow:

- one **experiment** per study (its name);
- one **parent run** per (strategy, seed): the strategy's hyperparameters, the data, the
  budget and the training settings as params; the ensemble's test metrics logged with
  ``step`` = members trained after every finished member (the anytime curves in MLflow's chart
  view); at the end the final metrics, and the ensemble's member list and genotypes as
  artifacts (``ensemble.json``, ``ensemble_genotypes.txt``);
- one nested **child run** per trial (tag ``mlflow.parentRunId``): the job as params (the
  genotype among them), ``genotype.json`` as an artifact, the trial's metrics and
  ``device_seconds``; a failed trial ends FAILED with its error as a tag and an artifact.

Trials never talk to MLflow: they report to Ray Tune and the driver writes here, so
concurrent trials cannot lock a SQLite store. The default store is a SQLite file in the
study's output folder (``sqlite:///<output_dir>/mlflow.db``, artifacts beside it in
``mlartifacts/``); ``MLFLOW_TRACKING_URI`` or ``Study(tracking_uri=...)`` move it to a
server. Models are not logged with ``mlflow.pytorch.log_model`` (its torch.export default
fails on supernets): the genotype and stored probabilities are the durable outputs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Tracker", "default_tracking_uri", "flatten_params", "is_local_store"]

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_BATCH = 100  # MLflow's limit on params/tags per log_batch call


def default_tracking_uri(output_dir: str | os.PathLike) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite file in ``output_dir``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def is_local_store(uri: str) -> bool:
    """True for a store this process writes directly (a SQLite file or a local path)."""
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as ``a.b`` keys, values as strings cut to MLflow's length limit."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, key + "."))
            continue
        if isinstance(v, str):
            text = v
        else:
            try:
                text = json.dumps(v, default=str)
            except (TypeError, ValueError):
                text = str(v)
        out[key] = text[:_MAX_PARAM_LEN]
    return out


def _chunks(items: list, n: int = _BATCH) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class Tracker:
    """Writes one study to MLflow (see the module docstring for the layout).

    Args:
        tracking_uri: where MLflow lives (``sqlite:///...``, ``http://host:port``, ...).
        experiment: the experiment's name (the study's name).
        artifact_location: artifact root for a newly created experiment; ``None`` lets the
            store decide (a tracking server's own artifact store).
        tags: tags of a newly created experiment.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        *,
        artifact_location: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        # alembic and MLflow announce the SQLite schema set-up at INFO on first use.
        for name in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            self.experiment_id = self.client.create_experiment(
                experiment,
                artifact_location=artifact_location,
                tags={k: str(v) for k, v in (tags or {}).items()},
            )
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id
        self.experiment = experiment

    # ---------------------------------------------------------------- parent runs

    def start_parent(
        self,
        label: str,
        seed: int,
        params: Mapping[str, Any],
        tags: Mapping[str, Any] | None = None,
    ) -> str:
        """The parent run of (``label``, ``seed``): the existing one when the study resumes
        (its params stay as first logged; MLflow params are immutable), else a new one."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                "tags.`nestune.role` = 'parent' and "
                f"tags.`nestune.strategy` = '{label}' and tags.`nestune.seed` = '{seed}'"
            ),
            max_results=1,
        )
        all_tags = {"nestune.role": "parent", "nestune.strategy": label, "nestune.seed": str(seed)}
        all_tags.update({k: str(v) for k, v in (tags or {}).items()})
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            self._log(run_id, tags=all_tags)
            return run_id
        run = self.client.create_run(
            self.experiment_id, run_name=f"{label} seed {seed}", tags=all_tags
        )
        self._log(run.info.run_id, params=flatten_params(params))
        return run.info.run_id

    def log_ensemble(self, parent_id: str, step: int, metrics: Mapping[str, float]) -> None:
        """The current ensemble's metrics at ``step`` = members trained (an anytime point)."""
        self._log(parent_id, metrics=metrics, step=step)

    def log_final(
        self,
        parent_id: str,
        metrics: Mapping[str, float],
        ensemble: list[Mapping[str, Any]],
        *,
        step: int,
    ) -> None:
        """The final ensemble: its metrics, its member list and genotypes as artifacts."""
        self._log(parent_id, metrics={f"final_{k}": v for k, v in metrics.items()}, step=step)
        self.client.log_dict(parent_id, {"members": list(ensemble)}, "ensemble.json")
        lines = []
        for m in ensemble:
            lines.append(f"# trial {m.get('trial_id')} seed {m.get('job_seed')}")
            lines.append(str(m.get("genotype_repr") or m.get("genotype")))
        self.client.log_text(parent_id, "\n".join(lines) + "\n", "ensemble_genotypes.txt")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    # ---------------------------------------------------------------- trial runs

    def log_trial(
        self,
        parent_id: str,
        entry: Mapping[str, Any],
        *,
        label: str,
        seed: int,
        genotype: str | None = None,
    ) -> str:
        """A child run for one finished (or failed) job, from its ledger entry."""
        job = entry.get("job") if isinstance(entry.get("job"), Mapping) else {"job": entry.get("job")}
        kind = entry.get("kind") or "job"
        trial_id = entry.get("trial_id") or "none"
        tags = {
            "mlflow.parentRunId": parent_id,
            "nestune.role": "trial",
            "nestune.strategy": label,
            "nestune.seed": str(seed),
            "nestune.kind": str(kind),
            "nestune.trial_id": str(trial_id),
        }
        for key in ("node_id", "hostname", "path"):
            if entry.get(key):
                tags[f"nestune.{key}"] = str(entry[key])
        if entry.get("error"):
            tags["nestune.error"] = str(entry["error"]).strip().splitlines()[-1][:5000]
        finished = float(entry.get("finished_at") or time.time())
        seconds = float(entry.get("metrics", {}).get("time_total_s", 0.0) or 0.0)
        run = self.client.create_run(
            self.experiment_id,
            start_time=int((finished - seconds) * 1000),
            run_name=f"{label} s{seed} {kind} {trial_id}",
            tags=tags,
        )
        run_id = run.info.run_id
        params = dict(job)
        if genotype and kind == "search":
            params["derived_genotype"] = genotype
        metrics = {k: v for k, v in (entry.get("metrics") or {}).items() if k != "time_total_s"}
        metrics["device_seconds"] = float(entry.get("device_seconds") or 0.0)
        self._log(run_id, params=flatten_params(params), metrics=metrics, step=0)
        geno = genotype or job.get("genotype")
        if geno:
            try:
                doc = json.loads(geno) if isinstance(geno, str) else geno
            except json.JSONDecodeError:
                doc = {"genotype": geno}
            self.client.log_dict(run_id, doc, "genotype.json")
        if entry.get("error"):
            self.client.log_text(run_id, str(entry["error"]), "error.txt")
        self.client.set_terminated(
            run_id, status="FINISHED" if entry.get("ok") else "FAILED", end_time=int(finished * 1000)
        )
        return run_id

    # ---------------------------------------------------------------- internals

    def _log(
        self,
        run_id: str,
        *,
        params: Mapping[str, str] | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
        step: int = 0,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        m = [
            Metric(k, float(v), now, int(step))
            for k, v in (metrics or {}).items()
            if v is not None and v == v  # NaN: MLflow stores it, but charts break on it
        ]
        p = [Param(k, v) for k, v in (params or {}).items()]
        t = [RunTag(k, v) for k, v in (tags or {}).items()]
        for chunk in _chunks(p):
            self.client.log_batch(run_id, params=chunk)
        for chunk in _chunks(t):
            self.client.log_batch(run_id, tags=chunk)
        for chunk in _chunks(m, 1000):
            self.client.log_batch(run_id, metrics=chunk)
