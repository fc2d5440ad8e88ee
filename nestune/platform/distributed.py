"""Data-parallel search and member jobs on Ray Train, inside a Ray Tune trial.

A job that asks for ``n > 1`` workers runs as a ``ray.train.torch.TorchTrainer`` (Ray Train V2)
started from inside the Tune trial that owns the job; the workers' reports reach Tune through
``ray.tune.integration.ray_train.TuneReportCallback``. The process group is gloo on CPU and
nccl on GPU (TorchTrainer's default for ``use_gpu``).

How the work is split (the same on every method):

- Every worker builds the same network from the same seed, and rank 0's parameters and buffers
  are broadcast once, so the replicas start identical.
- Each worker reads its own shard of every data split (``rank::world``), with a per-worker batch
  of ``batch_size // world``, so a step sees the same global batch as the single-process job.
- Gradients are averaged across workers (one flat all-reduce per gradient list) for the network
  weights *and* for the architecture, so the architecture update (DARTS' Adam step, its
  unrolled second-order step, XNAS' exponentiated-gradient step and wipeout) is computed from
  identical numbers and runs identically on every worker. Batch-norm statistics stay per worker,
  as with DDP without SyncBatchNorm (which gloo cannot run).
- Rank 0 writes the job's result (the same dict the single-process job returns) into a Ray
  Train checkpoint; :func:`run_job_distributed` reads it back for the trial.

``device_seconds`` of a data-parallel job is the sum over workers (n devices held for the wall
time), so budgets stay honest; ``extra["wall_seconds"]`` and ``extra["workers"]`` say how it
was spent.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Replicas", "TorchReplicas", "run_job_distributed", "distributed_search_methods"]


class Replicas:
    """How a job sees its data-parallel peers. This base class is the single-process case:
    rank 0 of 1, and every collective is a no-op."""

    rank: int = 0
    world_size: int = 1

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average the tensors over workers, in place. Every worker must pass tensors of the
        same shapes in the same order (use zeros for a gradient that is absent)."""

    def all_reduce_sum(self, value: float) -> float:
        """The sum of a float over workers."""
        return value

    def broadcast(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite the tensors with rank 0's values, in place."""

    def shard(self, n: int) -> torch.Tensor:
        """This worker's indices of ``n`` items: ``rank::world_size``."""
        return torch.arange(self.rank, n, self.world_size)


class TorchReplicas(Replicas):
    """Collectives over the default ``torch.distributed`` process group (set up by Ray Train)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchReplicas: torch.distributed is not initialised")
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor]) -> None:
        present = list(tensors)
        if not present:
            return
        # One flat buffer: a collective per tensor would cost a round trip per parameter.
        flat = torch.cat([t.reshape(-1) for t in present])
        self._dist.all_reduce(flat, op=self._dist.ReduceOp.SUM)
        flat.div_(self.world_size)
        offset = 0
        for t in present:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n

    def all_reduce_sum(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64)
        if self._dist.get_backend() == "nccl":
            t = t.cuda()
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM)
        return float(t.item())

    def broadcast(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            self._dist.broadcast(t, src=0)


# ------------------------------------------------------------------------------------ jobs


def distributed_search_methods() -> dict[str, Callable[..., dict[str, Any]]]:
    """Search methods that can run data-parallel: ``fn(job, data, device, *, replicas,
    progress) -> result dict`` (the single-process job's format)."""
    from nestune.baselines.darts import darts_job
    from nestune.baselines.xnas import xnas_job

    return {"darts": darts_job, "xnas": xnas_job}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _check_agreement(tensors: Sequence[torch.Tensor], replicas: Replicas) -> float:
    """The largest difference between this worker's tensors and the workers' mean, summed over
    workers: 0.0 when every replica holds the same numbers."""
    if not tensors:
        return 0.0
    mine = [t.detach().clone().float().masked_fill(~torch.isfinite(t), 0.0) for t in tensors]
    mean = [t.clone() for t in mine]
    replicas.all_reduce_mean(mean)
    deviation = max(float((a - b).abs().max()) for a, b in zip(mine, mean, strict=True))
    return replicas.all_reduce_sum(deviation)


def _train_member_replicated(job: Mapping[str, Any], data: Any, device: torch.device,
                             replicas: Replicas, train_defaults: Mapping[str, Any]) -> Any:
    """``train_member``'s recipe, data-parallel: DDP over the member network, every worker on
    its shard of the train split with ``batch_size // world`` samples per step. Rank 0
    predicts val/test and returns the MemberResult (other ranks return None)."""
    import dataclasses

    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from nestune.platform import metrics
    from nestune.platform.data import DeviceBatches, Split, predict_probs
    from nestune.platform.training import MemberResult, TrainConfig, TrainingDiverged, _as_genotype
    from nestune.search_spaces import DartsSpace

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = dict(train_defaults)
    config.update({k: v for k, v in job.items() if k in fields})
    config.update(job.get("train") or {})
    config = TrainConfig.from_dict(config)
    genotype = _as_genotype(job["genotype"])
    if "seed" not in job:
        raise ValueError("job.seed: a member job needs a seed")
    seed = int(job["seed"])
    cuda = device.type == "cuda"

    start = time.perf_counter()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model = DartsSpace().network(genotype, C=config.C, layers=config.layers,
                                 num_classes=data.num_classes, in_channels=data.in_channels,
                                 drop_path=config.drop_path)
    num_params = sum(p.numel() for p in model.parameters())
    model.to(device)
    channels_last = cuda and config.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp = cuda and config.amp
    # DDP broadcasts rank 0's parameters on construction, and averages gradients in backward.
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

    mine = replicas.shard(len(data.train))
    shard = Split(data.train.x[mine], data.train.y[mine])
    per_worker = max(1, config.batch_size // replicas.world_size)
    smallest = len(data.train) // replicas.world_size
    batches = DeviceBatches(shard, min(per_worker, smallest), shuffle=True, augment=data.augment,
                            device=device, generator=torch.Generator().manual_seed(seed * 1_000_003 + 1),
                            drop_last=True)
    # Every worker takes the same number of steps, set by the smallest shard.
    steps = max(1, smallest // batches.batch_size)
    total = config.epochs * steps
    optimizer = torch.optim.SGD(ddp.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    history: list[dict[str, float]] = []
    step = 0
    ddp.train()
    for epoch in range(config.epochs):
        model.drop_path = config.drop_path * epoch / config.epochs
        losses = torch.zeros(steps, device=device)
        it = iter(batches)
        for i in range(steps):
            xb, yb = next(it)
            lr = config.lr_min + 0.5 * (config.lr - config.lr_min) * (1 + math.cos(math.pi * step / total))
            for group in optimizer.param_groups:
                group["lr"] = lr
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                logits = ddp(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), config.grad_clip)
            optimizer.step()
            losses[i] = loss.detach()
            step += 1
        replicas.all_reduce_mean([losses])
        if not bool(torch.isfinite(losses).all()):
            bad = int((~torch.isfinite(losses)).nonzero()[0, 0])
            raise TrainingDiverged(
                f"training diverged: non-finite loss at epoch {epoch + 1}/{config.epochs}, "
                f"step {bad + 1}/{steps}", epoch=epoch, step=epoch * steps + bad)
        history.append({"epoch": epoch + 1, "train_loss": float(losses.mean()), "lr": lr})
    if cuda:
        torch.cuda.synchronize(device)
    train_seconds = replicas.all_reduce_sum(time.perf_counter() - start)
    if replicas.rank != 0:
        return None
    t_pred = time.perf_counter()
    kw = {"amp": amp, "channels_last": channels_last}
    val = predict_probs(model, data.val, device, **kw).numpy()
    test = predict_probs(model, data.test, device, **kw).numpy()
    if cuda:
        torch.cuda.synchronize(device)
    # Prediction runs on rank 0 alone while the other workers wait for it.
    seconds = train_seconds + replicas.world_size * (time.perf_counter() - t_pred)
    val_y, test_y = data.val.y.numpy(), data.test.y.numpy()
    results = {
        "val_nll": metrics.nll(val, val_y), "val_error": metrics.error(val, val_y),
        "test_nll": metrics.nll(test, test_y), "test_error": metrics.error(test, test_y),
        "test_ece": metrics.ece(test, test_y), "test_brier": metrics.brier(test, test_y),
        "train_loss": history[-1]["train_loss"],
    }
    return MemberResult(genotype=genotype, seed=seed, val_probs=val.astype(np.float16),
                        test_probs=test.astype(np.float16), metrics=results,
                        device_seconds=seconds, num_params=num_params,
                        config={**config.to_dict(), "workers": replicas.world_size},
                        history=history, model=model.eval())


def _worker_loop(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs: one job, data-parallel."""
    import ray
    import ray.train

    job = config["job"]
    defaults = dict(config.get("report_defaults") or {})
    threads = config.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    if config["use_gpu"]:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    data = config["data"]
    if isinstance(data, Mapping):
        from nestune.platform.data import load_data

        data = load_data(**data)
    else:
        data = ray.get(data)
    replicas = TorchReplicas()

    def progress(metrics: dict[str, Any]) -> None:
        ray.train.report({**defaults, **metrics, "workers": replicas.world_size})

    out = Path(tempfile.mkdtemp(prefix="nestune-dp-"))
    final: dict[str, Any] = {**defaults, "kind": job.get("kind"), "workers": replicas.world_size}
    if job.get("kind") == "search":
        methods = distributed_search_methods()
        method = job.get("method")
        if method not in methods:
            raise ValueError(f"search job.method: {method!r} cannot run data-parallel; "
                             f"data-parallel methods: {sorted(methods)}")
        merged = {**(config.get("search_defaults") or {}), **job}
        result = methods[method](merged, data, device, replicas=replicas, progress=progress)
        arch = [torch.as_tensor(result["arrays"][k]) for k in ("alpha_normal", "alpha_reduce")]
        result["extra"]["replica_max_deviation"] = _check_agreement(arch, replicas)
        final["device_seconds"] = float(result["device_seconds"])
        if replicas.rank == 0:
            arrays = result.pop("arrays", {}) or {}
            if arrays:
                np.savez(out / "arrays.npz", **{k: np.asarray(v) for k, v in arrays.items()})
            (out / "result.json").write_text(json.dumps({"method": method, **result},
                                                        default=_json_default))
    elif job.get("kind") == "member":
        member = _train_member_replicated(job, data, device, replicas,
                                          config.get("train_defaults") or {})
        if replicas.rank == 0:
            member.save(out)
            final["device_seconds"] = float(member.device_seconds)
            final.update({k: float(v) for k, v in member.metrics.items()})
            if config.get("shift"):
                from nestune.platform.shift import store_member_shift

                cuda = device.type == "cuda"
                final["shift_seconds"] = store_member_shift(
                    member.model, data, out, config["shift"], device,
                    amp=cuda and bool(member.config.get("amp")),
                    channels_last=cuda and bool(member.config.get("channels_last")))
    else:
        raise ValueError(f"job.kind: expected 'member' or 'search', got {job.get('kind')!r}")
    if replicas.rank == 0:
        # A synchronous upload: the directory has been copied to storage when report returns.
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(str(out)))
    else:
        ray.train.report(final)
    shutil.rmtree(out, ignore_errors=True)


def run_job_distributed(
    job: Mapping[str, Any],
    data_spec: Mapping[str, Any] | Any,
    workers: int,
    use_gpu: bool,
    *,
    cpus_per_worker: float = 1.0,
    search_defaults: Mapping[str, Any] | None = None,
    train_defaults: Mapping[str, Any] | None = None,
    report_defaults: Mapping[str, Any] | None = None,
    storage_path: str | None = None,
    shift: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a search or member job data-parallel on ``workers`` Ray Train workers.

    Call it from a Ray Tune trial (the runner's trainable, when ``resources["workers"] > 1``):
    the workers' per-epoch reports then reach the trial through ``TuneReportCallback``. Outside
    Tune it runs the same, without that callback.

    Args:
        job: a search job (``method`` "darts" or "xnas") or a member job, as strategies ask.
        data_spec: keyword arguments of ``load_data`` (every worker loads the data itself), or
            a ``DataBundle`` (shipped through Ray's object store).
        workers: number of Ray Train workers (processes), each on its own shard of the data.
        use_gpu: one GPU per worker and the nccl backend; gloo on CPU otherwise.
        cpus_per_worker: CPUs each worker asks Ray for (and its torch thread count, rounded
            down, at least 1). The trial that calls this holds its own resources too: leave
            room for both, or Ray waits for CPUs that never free up.
        search_defaults: the study's search settings, under the job's own keys.
        train_defaults: the study's TrainConfig fields, under the job's own keys.
        report_defaults: keys added to every report (Tune's searcher metric, e.g.
            ``{"val_nll": nan}``, must be in every result a trial reports).
        storage_path: where Ray Train persists the run (absolute path or URI; shared storage
            on a multi-node cluster). Default: a fresh local temporary directory.
        shift: a member job's dataset-shift options (:func:`nestune.platform.shift.shift_options`):
            rank 0 also predicts the corrupted copies, returned as ``shifted``.

    Returns:
        For a search job, the dict ``run_search`` returns (``kind``, ``method``, ``genotype``,
        ``device_seconds``, ``extra``, ``arrays``). For a member job, ``kind``, ``genotype``,
        ``val_probs``, ``test_probs``, ``metrics``, ``device_seconds``, ``num_params`` and the
        ``MemberResult`` as ``member`` (without its model), and ``shifted``: the shifted
        predictions by split (``{"test": {(name, severity): probs}, ...}``; empty without
        ``shift``). ``device_seconds`` is summed over the workers.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    from nestune.platform.data import DataBundle

    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers: expected an int >= 1, got {workers!r}")
    if not isinstance(job, Mapping) or job.get("kind") not in ("search", "member"):
        raise ValueError(f"job: expected a search or member job dict, got {job!r}")
    if not cpus_per_worker > 0:
        raise ValueError(f"cpus_per_worker: expected a number > 0, got {cpus_per_worker!r}")
    if isinstance(data_spec, DataBundle):
        data: Any = ray.put(data_spec)
    elif isinstance(data_spec, Mapping):
        data = dict(data_spec)
    else:
        raise ValueError(f"data_spec: expected load_data keyword arguments or a DataBundle, "
                         f"got {type(data_spec).__name__}")

    callbacks = []
    name = f"nestune-dp-{uuid.uuid4().hex[:8]}"
    if _in_tune_session():
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
        name = f"dp-{tune.get_context().get_trial_id()}-{uuid.uuid4().hex[:6]}"
    own_storage = storage_path is None
    storage = storage_path or tempfile.mkdtemp(prefix="nestune-train-")
    resources = {"CPU": float(cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "job": json.loads(json.dumps(dict(job), default=_json_default)),
            "data": data,
            "use_gpu": bool(use_gpu),
            "threads": max(1, int(math.floor(cpus_per_worker))),
            "search_defaults": dict(search_defaults or {}),
            "train_defaults": dict(train_defaults or {}),
            "report_defaults": dict(report_defaults or {}),
            "shift": dict(shift) if shift else None,
        },
        scaling_config=ScalingConfig(num_workers=int(workers), use_gpu=bool(use_gpu),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=callbacks),
    )
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"data-parallel job {job.get('kind')}: the workers stored no result")
        return _read_result(job["kind"], result.checkpoint)
    finally:
        if own_storage:
            shutil.rmtree(storage, ignore_errors=True)


def _read_result(kind: str, checkpoint: Any) -> dict[str, Any]:
    """The job result rank 0 stored in the run's checkpoint."""
    with tempfile.TemporaryDirectory(prefix="nestune-dp-result-") as tmp:
        d = Path(checkpoint.to_directory(tmp))
        if kind == "search":
            out = json.loads((d / "result.json").read_text())
            arrays = {}
            if (d / "arrays.npz").is_file():
                with np.load(d / "arrays.npz", allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            out["arrays"] = arrays
            out["kind"] = "search"
            return out
        from nestune.platform.shift import load_shifted
        from nestune.platform.training import MemberResult

        member = MemberResult.load(d)
        shifted = {split: load_shifted(d, split) for split in ("test", "val")}
    return {
        "kind": "member",
        "genotype": member.genotype.to_json(),
        "val_probs": member.val_probs,
        "test_probs": member.test_probs,
        "metrics": dict(member.metrics),
        "device_seconds": float(member.device_seconds),
        "num_params": int(member.num_params),
        "member": member,
        "shifted": {split: probs for split, probs in shifted.items() if probs},
    }
