"""MLflow tracking of a study, written by the driver only.

Layout in MLflow:

- one **experiment** per study (its name);
- one **parent run** per (strategy, seed): the strategy's hyperparameters, the data, the
  budget and the training settings as params; the ensemble's test metrics logged with
  ``step`` = members trained after every finished member (the anytime curves in MLflow's chart
  view); at the end the final metrics, and the ensemble's member list and genotypes as
  artifacts (``ensemble.json``, ``ensemble_genotypes.txt``); the device-seconds split by
  job kind (``cost_members_seconds``, ``cost_search_<method>_seconds``); the strategy's own
  files, if it has an ``artifacts()`` method (EdgeNES: ``shared_edges_vs_lambda.png``); and
  ``members.csv``, one row per pooled member (its scalar job keys, e.g. EdgeNES' ``lambda``
  and ``shared_edges``, its val NLL, test error, disagreement with the other members);
- one nested **child run** per trial (tag ``mlflow.parentRunId``): the job as params (the
  genotype among them), ``genotype.json`` as an artifact, the trial's metrics and
  ``device_seconds``; a failed trial ends FAILED with its error as a tag and an artifact.
  Once the pool is complete, a member's run also gets ``test_disagreement`` /
  ``val_disagreement`` (mean over the other pooled members of the share of samples the two
  classify differently) and ``in_ensemble`` (1 if selected).

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
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MlflowServer", "Tracker", "default_tracking_uri", "flatten_params", "free_port", "is_local_store"]

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

    def log_files(self, run_id: str, files: Mapping[str, bytes]) -> None:
        """Files given as bytes (a strategy's own plots), as artifacts of the run under their
        names; a file logged again replaces the old one."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                rel = Path(name)
                if rel.is_absolute() or ".." in rel.parts or not rel.name:
                    raise ValueError(f"log_files: expected a relative file name, got {name!r}")
                path = Path(tmp) / rel.name
                path.write_bytes(data)
                folder = rel.parent.as_posix()
                self.client.log_artifact(run_id, str(path), None if folder == "." else folder)

    def log_member_metrics(self, parent_id: str, metrics: Mapping[str, Mapping[str, float]]) -> None:
        """Metrics known only once the pool is complete (a member's disagreement with the
        others, whether it made the ensemble), added to the child runs of ``parent_id`` whose
        tag ``nestune.trial_id`` is a key of ``metrics``."""
        runs: dict[str, str] = {}
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`nestune.role` = 'trial'",
                max_results=1000, page_token=token,
            )
            runs.update({r.data.tags.get("nestune.trial_id", ""): r.info.run_id for r in page})
            token = page.token
            if not token:
                break
        for trial_id, values in metrics.items():
            if str(trial_id) in runs:
                self._log(runs[str(trial_id)], metrics=values)

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
        curves: Mapping[str, Sequence[float]] | None = None,
    ) -> str:
        """A child run for one finished (or failed) job, from its ledger entry; ``curves``
        (a search's per-epoch series, see :func:`search_curves`) are logged as metric
        histories with ``step`` = epoch, so MLflow charts them."""
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
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        series = [Metric(f"epoch/{name}", float(v), now, epoch)
                  for name, values in (curves or {}).items()
                  for epoch, v in enumerate(values, start=1) if v == v]
        for chunk in _chunks(series, 1000):
            self.client.log_batch(run_id, metrics=chunk)
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


def search_curves(extra: Mapping[str, Any] | None) -> dict[str, list[float]]:
    """A search result's per-epoch series, as MLflow metric histories: every numeric list in
    ``extra["history"]`` (losses, step and epoch seconds, learning rate, EdgeNES' C, t and
    Spearman ρ), and from XNAS' ``extra["wipeout"]`` the ops left and computed per cell, so a
    search's log shows ops being wiped out while its step time falls."""
    out: dict[str, list[float]] = {}
    if not isinstance(extra, Mapping):
        return out
    history = extra.get("history")
    if isinstance(history, Mapping):
        for name, values in history.items():
            if (isinstance(values, list) and values
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
                out[str(name)] = [float(v) for v in values]
    wipeout = extra.get("wipeout")
    if isinstance(wipeout, list) and wipeout and all(isinstance(e, Mapping) for e in wipeout):
        for key in ("ops_remaining", "ops_computed"):
            cells = [e.get(key) for e in wipeout]
            if all(isinstance(c, Mapping) for c in cells):
                for cell in cells[0]:
                    out[f"{key}_{cell}"] = [float(c.get(cell, math.nan)) for c in cells]
        out["ops_wiped"] = [float(len(e.get("removed") or ())) for e in wipeout]
    return out


# ------------------------------------------------------------------------------------ server


class MlflowServer:
    """An ``mlflow server`` on ``host:port`` over a backend store, started in its own process
    group (``mlflow server`` spawns workers that outlive a SIGTERM to its own PID) and stopped
    as a group. Use as a context manager, or call :meth:`stop`.

    Args:
        backend_store_uri: e.g. ``sqlite:////abs/path/mlflow.db``.
        artifacts_destination: where the server stores artifacts it is sent (proxied
            artifact serving); ``None``: MLflow's default.
        host, port: where it listens (``port=0``: a free port).
        workers: server worker processes.
    """

    def __init__(
        self,
        backend_store_uri: str,
        *,
        artifacts_destination: str | os.PathLike | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        workers: int = 1,
        quiet: bool = True,
    ) -> None:
        import shutil
        import subprocess
        import sys

        self.host = host
        self.port = port or free_port(host)
        exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
        cmd = [exe] if exe else [sys.executable, "-m", "mlflow"]
        cmd += ["server", "--backend-store-uri", backend_store_uri, "--host", host,
                "--port", str(self.port), "--workers", str(workers)]
        if artifacts_destination is not None:
            dest = str(artifacts_destination)
            if "://" not in dest:
                dest = Path(dest).resolve().as_uri()
            cmd += ["--artifacts-destination", dest]
        out = subprocess.DEVNULL if quiet else None
        env = dict(os.environ)
        # The server's job runner (a pool of huey consumers, for GenAI evaluation jobs) is of
        # no use to a study and costs seconds and processes: off unless asked for.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        self.process = subprocess.Popen(cmd, stdout=out, stderr=out, env=env, start_new_session=True)
        self.pgid = self.process.pid  # start_new_session: the group id is the leader's pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> MlflowServer:
        """Block until the server answers ``/health``; ``RuntimeError`` if it exits or times out."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.url} within {timeout:.0f}s")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left."""
        import signal

        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.alive():
                time.sleep(0.1)
            if not self.alive():
                break

    def alive(self) -> bool:
        """True while any process of the server's group is left."""
        self.process.poll()  # reap the group leader if it exited, or killpg still finds it
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __enter__(self) -> MlflowServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
