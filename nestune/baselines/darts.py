"""DARTS search (Liu et al. 2018) and the ``darts`` / ``darts_ens`` strategies.

The search (after quark0/darts ``train_search.py`` and ``architect.py``) is bi-level:

- The study's *train* split is cut in two seeded halves (``train_portion`` = 0.5): the network
  weights ω train on the first, the architecture α on the second. The study's *val* split is
  kept for member selection (ForwardSelect) and is not used by the search; the test split is
  never touched.
- Each step first updates α on a batch of the architecture half, then ω on a batch of the
  weight half (the order of the reference code).
- First order (``order=1``): α follows ∇_α L_arch(ω, α).
- Second order (``order=2``): α follows the gradient at the unrolled weights
  ω' = ω − ξ (μ·m + ∇_ω L_train(ω, α) + λω), i.e. the SGD step the weights are about to take
  (ξ the current weight learning rate, m the momentum buffer, λ the weight decay):
  ∇_α L_arch(ω', α) − ξ ∇²_{α,ω} L_train(ω, α) ∇_{ω'} L_arch(ω', α), the Hessian-vector product
  by finite differences: (∇_α L_train(ω⁺, α) − ∇_α L_train(ω⁻, α)) / 2ε with
  ω± = ω ± ε ∇_{ω'} L_arch(ω', α) and ε = 0.01 / ‖∇_{ω'} L_arch(ω', α)‖ (the paper's eq. 7–8).
- Optimisers as in the paper: α with Adam (lr 3e-4, betas (0.5, 0.999), weight decay 1e-3);
  ω with SGD (lr 0.025 cosine-annealed per epoch to 0.001, momentum 0.9, weight decay 3e-4,
  gradient norm clipped at 5).

Sizes and length come from the search job (the study scales them); the defaults are small
enough for a CPU, and the paper's CIFAR-10 values are given beside each.

Reuse: :func:`darts_search` is the plain function (EdgeNES takes its α* from it); its
signature is stable. Search jobs (``{"kind": "search", "method": "darts", ...}``) run through
:func:`darts_job`, registered as search method ``"darts"``.

Strategies:

- ``darts_ens``: ``k`` DARTS searches with different seeds, issued together so the runner
  runs them as concurrent trials; each derived genotype is then trained as a member. With
  ``k <= M`` (the study's ensemble size) the ensemble is the k members; with ``k > M`` the k
  members are the pool and ForwardSelect picks M.
- ``darts``: one search, one member, the single-architecture row of a comparison.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from nestune.platform.data import DataBundle, DeviceBatches, Split
from nestune.platform.distributed import Replicas
from nestune.platform.search import register_search
from nestune.platform.strategy import (
    FINISHED,
    WAIT,
    Job,
    Result,
    Strategy,
    StrategyContext,
    register,
)
from nestune.search_spaces.darts import PRIMITIVES, DartsSpace, Genotype, Supernet

__all__ = [
    "DARTS_DEFAULTS",
    "Darts",
    "DartsEnsemble",
    "SearchResult",
    "darts_job",
    "darts_search",
]

Progress = Callable[[dict[str, Any]], None]

# Defaults of a DARTS search job. Comments give the paper's CIFAR-10 values where they differ.
DARTS_DEFAULTS: dict[str, Any] = {
    "epochs": 10,  # paper: 50
    "C": 8,  # paper: 16
    "layers": 5,  # paper: 8
    "batch_size": 64,  # paper: 64
    "order": 1,  # paper: 1 and 2 (second order is its best result)
    "lr": 0.025,
    "lr_min": 0.001,
    "momentum": 0.9,
    "weight_decay": 3e-4,
    "grad_clip": 5.0,
    "arch_lr": 3e-4,
    "arch_betas": (0.5, 0.999),
    "arch_weight_decay": 1e-3,
    "unrolled_eps": 0.01,
    "train_portion": 0.5,
}


@dataclass
class SearchResult:
    """What a supernet search returns.

    ``alpha_normal`` / ``alpha_reduce`` are the final architecture parameters, (num_edges,
    num_ops) on the CPU (DARTS: α, whose softmax mixes the ops; XNAS: log v, ``-inf`` for
    wiped-out ops). ``weights_normal`` / ``weights_reduce`` are the op mixing weights the
    genotype was derived from. ``extra`` is JSON-able: the per-epoch history (mixing weights,
    losses, genotypes, step times) and the settings used; ``arrays`` holds optional longer
    numpy records (per-step times, ...).
    """

    genotype: Genotype
    alpha_normal: torch.Tensor
    alpha_reduce: torch.Tensor
    weights_normal: torch.Tensor
    weights_reduce: torch.Tensor
    device_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def alphas(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alpha_normal, self.alpha_reduce

    @property
    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weights_normal, self.weights_reduce

    @property
    def history(self) -> dict[str, Any]:
        return self.extra.get("history", {})

    def to_job_result(self) -> dict[str, Any]:
        """The search job result format of ``nestune.platform.search``."""
        return {
            "genotype": self.genotype.to_json(),
            "device_seconds": float(self.device_seconds),
            "extra": self.extra,
            "arrays": {
                "alpha_normal": self.alpha_normal.numpy(),
                "alpha_reduce": self.alpha_reduce.numpy(),
                "weights_normal": self.weights_normal.numpy(),
                "weights_reduce": self.weights_reduce.numpy(),
                **self.arrays,
            },
        }


# ------------------------------------------------------------------------------------- helpers
# Shared with the XNAS search, which trains ω the same way.


def check_setting(name: str, value: Any, kind: type, low: float | None = None,
                  high: float | None = None, where: str = "search") -> Any:
    """Return ``value`` if it is a ``kind`` within [low, high]; else ``ValueError`` naming it."""
    ok = not isinstance(value, bool)
    if kind is float:
        ok = ok and isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)
        value = float(value) if ok else value
    elif kind is int:
        ok = ok and isinstance(value, (int, np.integer))
        value = int(value) if ok else value
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bounds = ""
        if low is not None or high is not None:
            bounds = f" in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{where}.{name}: expected {kind.__name__}{bounds}, got {value!r}")
    return value


def space_from_job(job: dict[str, Any]) -> DartsSpace:
    """The search space of a job: ``nodes`` and ``ops`` keys, DARTS' cell space by default."""
    nodes = job.get("nodes", 4)
    ops = job.get("ops", PRIMITIVES)
    if isinstance(ops, str) or not isinstance(ops, (list, tuple)):
        raise ValueError(f"search job.ops: expected a list of op names, got {ops!r}")
    return DartsSpace(nodes=check_setting("nodes", nodes, int, 1, where="search job"), ops=tuple(ops))


def space_to_job(space: DartsSpace) -> dict[str, Any]:
    """The job keys that name ``space`` (empty for DARTS' own cell space)."""
    out: dict[str, Any] = {}
    if space.nodes != 4:
        out["nodes"] = space.nodes
    if space.ops != PRIMITIVES:
        out["ops"] = list(space.ops)
    return out


def cosine_lr(epoch: int, epochs: int, lr: float, lr_min: float) -> float:
    """The weights' learning rate in ``epoch`` (0-based): cosine from ``lr`` to ``lr_min``."""
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


class SearchBatches:
    """The two halves of the train split as on-device batch streams, sharded per worker.

    The split is a seeded permutation of the train split (the same on every worker); each
    worker then takes its shard of both halves with a batch of ``batch_size // world_size``.
    Every worker runs the same number of steps per epoch (``steps``), set by the smallest
    shard, so collectives stay in lockstep.
    """

    def __init__(self, data: DataBundle, batch_size: int, seed: int, device: str | torch.device,
                 replicas: Replicas, train_portion: float = 0.5) -> None:
        n = len(data.train)
        world = replicas.world_size
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        cut = int(round(n * train_portion))
        halves = (perm[:cut], perm[cut:])
        smallest = min(len(h) for h in halves) // world
        if smallest < 2:
            raise ValueError(
                f"search: the train split ({n} samples) is too small to halve over {world} "
                "worker(s); need at least 2 samples per half and worker"
            )
        per_worker = max(1, batch_size // world)
        # A batch of 1 breaks batch norm; tiny splits get a smaller batch rather than an error.
        self.batch_size = max(2, min(per_worker, smallest))
        self.steps = smallest // self.batch_size
        self.streams = []
        for k, idx in enumerate(halves):
            mine = idx[replicas.shard(len(idx))]
            split = Split(data.train.x[mine], data.train.y[mine])
            self.streams.append(DeviceBatches(
                split, self.batch_size, shuffle=True, augment=data.augment, device=device,
                seed=seed * 2 + k + 1, drop_last=True,
            ))

    def epoch(self):
        """Yield ``steps`` pairs ((x_weights, y_weights), (x_arch, y_arch))."""
        it_w, it_a = iter(self.streams[0]), iter(self.streams[1])
        for _ in range(self.steps):
            yield next(it_w), next(it_a)


def weight_step(model: Supernet, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                weights: tuple[torch.Tensor, torch.Tensor] | None, grad_clip: float,
                replicas: Replicas) -> tuple[float, float]:
    """One SGD step of ω on the training loss; returns (loss, accuracy) of the batch."""
    params = model.weight_parameters()
    optimizer.zero_grad(set_to_none=True)
    logits = model(x, weights)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    # Params of skipped ops have no gradient on every worker alike (same architecture state),
    # so the gradients that exist line up across workers.
    replicas.all_reduce_mean([p.grad for p in params if p.grad is not None])
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return float(loss.detach()), float((logits.detach().argmax(1) == y).float().mean())


def make_weight_optimizer(model: Supernet, lr: float, momentum: float,
                          weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.weight_parameters(), lr, momentum=momentum,
                           weight_decay=weight_decay)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def sync_start(model: Supernet, replicas: Replicas) -> None:
    """Start every replica from rank 0's parameters and buffers (seeded init already agrees on
    one machine; this makes it hold across machines and devices too)."""
    if replicas.world_size > 1:
        replicas.broadcast([p.data for p in model.parameters()] + list(model.buffers()))


def device_seconds(start: float, device: torch.device, replicas: Replicas) -> tuple[float, float]:
    """(device-seconds summed over workers, this worker's wall seconds) since ``start``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    return replicas.all_reduce_sum(wall), wall


def weights_as_lists(weights: tuple[torch.Tensor, torch.Tensor]) -> dict[str, list]:
    return {cell: w.detach().float().cpu().tolist() for cell, w in zip(("normal", "reduce"), weights,
                                                                        strict=True)}


# ------------------------------------------------------------------------------------- DARTS


def _arch_step_first_order(model: Supernet, x: torch.Tensor, y: torch.Tensor,
                           replicas: Replicas) -> tuple[float, float]:
    alphas = model.arch_parameters()
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    # With fewer than 3 layers there is no normal cell and its α get no gradient.
    grads = _grads_or_zeros(loss, alphas)
    replicas.all_reduce_mean(grads)
    for a, g in zip(alphas, grads, strict=True):
        a.grad = g
    return float(loss.detach()), float((logits.detach().argmax(1) == y).float().mean())


def _grads_or_zeros(loss: torch.Tensor, inputs: Sequence[torch.Tensor],
                    retain_graph: bool = False) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]


def _arch_step_second_order(model: Supernet, optimizer: torch.optim.SGD, x_train: torch.Tensor,
                            y_train: torch.Tensor, x_arch: torch.Tensor, y_arch: torch.Tensor,
                            xi: float, momentum: float, weight_decay: float, eps_scale: float,
                            replicas: Replicas) -> tuple[float, float]:
    alphas = model.arch_parameters()
    arch_ids = {id(a) for a in alphas}
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in arch_ids]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    # The extra forwards must not move the real running statistics: they get copies.
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss_at(ws: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        state = dict(zip(names, ws, strict=True))
        state.update(buffers)
        logits = functional_call(model, state, (x,))
        return F.cross_entropy(logits, y), logits

    # ω' = ω − ξ (μ m + ∇ω L_train + λ ω): the step SGD is about to take.
    loss_train, _ = loss_at(params, x_train, y_train)
    g_train = _grads_or_zeros(loss_train, params)
    replicas.all_reduce_mean(g_train)
    with torch.no_grad():
        unrolled = []
        for p, g in zip(params, g_train, strict=True):
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            step = g + weight_decay * p
            if buf is not None:
                step = step + momentum * buf
            unrolled.append((p - xi * step).requires_grad_(True))
    loss_arch, logits = loss_at(unrolled, x_arch, y_arch)
    grads = _grads_or_zeros(loss_arch, list(alphas) + unrolled)
    replicas.all_reduce_mean(grads)
    d_alpha, d_w = grads[: len(alphas)], grads[len(alphas):]
    # Finite-difference Hessian-vector product at ω with the vector ∇ω' L_arch(ω', α).
    norm = torch.sqrt(sum((v * v).sum() for v in d_w))
    eps = eps_scale / float(norm.clamp_min(1e-12))
    with torch.no_grad():
        plus = [p + eps * v for p, v in zip(params, d_w, strict=True)]
        minus = [p - eps * v for p, v in zip(params, d_w, strict=True)]
    g_plus = _grads_or_zeros(loss_at(plus, x_train, y_train)[0], alphas)
    g_minus = _grads_or_zeros(loss_at(minus, x_train, y_train)[0], alphas)
    hvp = g_plus + g_minus
    replicas.all_reduce_mean(hvp)
    for a, da, gp, gm in zip(alphas, d_alpha, hvp[: len(alphas)], hvp[len(alphas):], strict=True):
        a.grad = da - xi * (gp - gm) / (2 * eps)
    return float(loss_arch.detach()), float((logits.detach().argmax(1) == y_arch).float().mean())


def darts_search(
    data: DataBundle,
    *,
    epochs: int = DARTS_DEFAULTS["epochs"],
    C: int = DARTS_DEFAULTS["C"],
    layers: int = DARTS_DEFAULTS["layers"],
    order: int = DARTS_DEFAULTS["order"],
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = DARTS_DEFAULTS["batch_size"],
    space: DartsSpace | None = None,
    lr: float = DARTS_DEFAULTS["lr"],
    lr_min: float = DARTS_DEFAULTS["lr_min"],
    momentum: float = DARTS_DEFAULTS["momentum"],
    weight_decay: float = DARTS_DEFAULTS["weight_decay"],
    grad_clip: float = DARTS_DEFAULTS["grad_clip"],
    arch_lr: float = DARTS_DEFAULTS["arch_lr"],
    arch_betas: tuple[float, float] = DARTS_DEFAULTS["arch_betas"],
    arch_weight_decay: float = DARTS_DEFAULTS["arch_weight_decay"],
    unrolled_eps: float = DARTS_DEFAULTS["unrolled_eps"],
    train_portion: float = DARTS_DEFAULTS["train_portion"],
    progress: Progress | None = None,
    replicas: Replicas | None = None,
) -> SearchResult:
    """Run a DARTS search on ``data``'s train split and return its :class:`SearchResult`.

    Args:
        data: the study's data; only ``data.train`` is read (halved into weight and
            architecture data).
        epochs, C, layers, batch_size: length and size of the search (paper: 50, 16, 8, 64).
        order: 1 (first-order DARTS) or 2 (the unrolled second-order step).
        seed: seeds the supernet, the halving of the train split and the batch order.
        device: where the search runs.
        space: the cell space (DARTS' own by default).
        lr, lr_min, momentum, weight_decay, grad_clip: ω's SGD with cosine annealing.
        arch_lr, arch_betas, arch_weight_decay: α's Adam.
        unrolled_eps: ε = unrolled_eps / ‖∇ω' L_arch‖ in the finite-difference Hessian-vector
            product (order 2).
        train_portion: share of the train split that trains ω (the rest trains α).
        progress: called after every epoch with that epoch's numbers (a dict).
        replicas: data-parallel peers (``nestune.platform.distributed``); single process by
            default.

    Returns:
        The derived genotype, the final α (``alpha_normal``, ``alpha_reduce``) and their
        softmax, the device-seconds, and ``extra`` with the per-epoch ``history`` of the
        softmaxed α (index 0 = before the first epoch), losses, genotypes and step times.
    """
    replicas = replicas or Replicas()
    where = "darts_search"
    epochs = check_setting("epochs", epochs, int, 1, where=where)
    order = check_setting("order", order, int, 1, 2, where=where)
    batch_size = check_setting("batch_size", batch_size, int, 2, where=where)
    lr = check_setting("lr", lr, float, 0.0, where=where)
    lr_min = check_setting("lr_min", lr_min, float, 0.0, lr, where=where)
    momentum = check_setting("momentum", momentum, float, 0.0, 1.0, where=where)
    weight_decay = check_setting("weight_decay", weight_decay, float, 0.0, where=where)
    grad_clip = check_setting("grad_clip", grad_clip, float, 0.0, where=where)
    arch_lr = check_setting("arch_lr", arch_lr, float, 0.0, where=where)
    arch_weight_decay = check_setting("arch_weight_decay", arch_weight_decay, float, 0.0, where=where)
    unrolled_eps = check_setting("unrolled_eps", unrolled_eps, float, 0.0, where=where)
    train_portion = check_setting("train_portion", train_portion, float, 0.05, 0.95, where=where)
    if (not isinstance(arch_betas, (list, tuple)) or len(arch_betas) != 2
            or not all(0.0 <= float(b) < 1.0 for b in arch_betas)):
        raise ValueError(f"{where}.arch_betas: expected two floats in [0, 1), got {arch_betas!r}")
    space = space or DartsSpace()
    device = torch.device(device)

    start = time.perf_counter()
    seed_everything(seed)
    model = space.supernet(C=C, layers=layers, num_classes=data.num_classes,
                           in_channels=data.in_channels).to(device)
    sync_start(model, replicas)
    batches = SearchBatches(data, batch_size, seed, device, replicas, train_portion)
    w_opt = make_weight_optimizer(model, lr, momentum, weight_decay)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=arch_lr, betas=tuple(arch_betas),
                             weight_decay=arch_weight_decay)

    history: dict[str, Any] = {
        "weights": [weights_as_lists(model.default_weights())],
        "genotype": [],
        "train_loss": [], "train_acc": [], "arch_loss": [], "arch_acc": [],
        "lr": [], "step_seconds": [], "epoch_seconds": [],
    }
    model.train()
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        xi = cosine_lr(epoch, epochs, lr, lr_min)
        for group in w_opt.param_groups:
            group["lr"] = xi
        sums = np.zeros(4)
        for (xw, yw), (xa, ya) in batches.epoch():
            a_opt.zero_grad(set_to_none=True)
            if order == 1:
                a_loss, a_acc = _arch_step_first_order(model, xa, ya, replicas)
            else:
                a_loss, a_acc = _arch_step_second_order(
                    model, w_opt, xw, yw, xa, ya, xi, momentum, weight_decay, unrolled_eps, replicas
                )
            a_opt.step()
            # Detached: the ω step has no use for a train-loss gradient of α.
            fixed = tuple(w.detach() for w in model.default_weights())
            w_loss, w_acc = weight_step(model, w_opt, xw, yw, fixed, grad_clip, replicas)
            sums += (w_loss, w_acc, a_loss, a_acc)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t_epoch
        means = sums / batches.steps
        genotype = model.derive()
        history["weights"].append(weights_as_lists(model.default_weights()))
        history["genotype"].append(genotype.to_json())
        for key, value in zip(("train_loss", "train_acc", "arch_loss", "arch_acc"), means, strict=True):
            history[key].append(float(value))
        history["lr"].append(xi)
        history["epoch_seconds"].append(seconds)
        history["step_seconds"].append(seconds / batches.steps)
        if progress is not None:
            progress({"epoch": epoch + 1, "train_loss": float(means[0]), "train_acc": float(means[1]),
                      "arch_loss": float(means[2]), "arch_acc": float(means[3]),
                      "step_seconds": seconds / batches.steps})

    genotype = model.derive()
    total, wall = device_seconds(start, device, replicas)
    w_normal, w_reduce = (w.detach().cpu() for w in model.default_weights())
    extra = {
        "method": "darts",
        "history": history,
        "settings": {
            "epochs": epochs, "C": C, "layers": layers, "order": order, "seed": seed,
            "batch_size": batch_size, "lr": lr, "lr_min": lr_min, "momentum": momentum,
            "weight_decay": weight_decay, "grad_clip": grad_clip, "arch_lr": arch_lr,
            "arch_betas": list(arch_betas), "arch_weight_decay": arch_weight_decay,
            "unrolled_eps": unrolled_eps, "train_portion": train_portion,
            "nodes": space.nodes, "ops": list(space.ops),
        },
        "steps_per_epoch": batches.steps,
        "per_worker_batch_size": batches.batch_size,
        "workers": replicas.world_size,
        "wall_seconds": wall,
    }
    return SearchResult(
        genotype=space.validate(genotype),
        alpha_normal=model.alpha_normal.detach().cpu().clone(),
        alpha_reduce=model.alpha_reduce.detach().cpu().clone(),
        weights_normal=w_normal,
        weights_reduce=w_reduce,
        device_seconds=total,
        extra=extra,
    )


def job_settings(job: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``defaults`` read from ``job`` (absent keys take the default)."""
    out = {}
    for key, default in defaults.items():
        value = job.get(key, default)
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)) or len(value) != len(default):
                raise ValueError(f"search job.{key}: expected {len(default)} numbers, got {value!r}")
            value = tuple(check_setting(key, v, float, where="search job") for v in value)
        else:
            value = check_setting(key, value, type(default), where="search job")
        out[key] = value
    return out


def darts_job(job: dict[str, Any], data: DataBundle, device: str | torch.device = "cpu", *,
              replicas: Replicas | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Run the DARTS search job ``job`` (keys of :data:`DARTS_DEFAULTS`, ``seed``, and the
    space's ``nodes``/``ops``) and return its result dict."""
    settings = job_settings(job, DARTS_DEFAULTS)
    seed = check_setting("seed", job.get("seed", 0), int, where="search job")
    result = darts_search(data, seed=seed, device=device, space=space_from_job(job),
                          replicas=replicas, progress=progress, **settings)
    return result.to_job_result()


@register_search("darts", settings=DARTS_DEFAULTS)
def _darts_search_job(job: dict[str, Any], data: DataBundle, device: str) -> dict[str, Any]:
    return darts_job(job, data, device)


# ------------------------------------------------------------------------------- strategies


@dataclass
class SearchThenTrain(Strategy):
    """Shared by the one-shot ensembles: ``k`` searches with different seeds, all issued at
    once (concurrent trials), then each derived genotype trained as a member.

    ``k = None`` means the study's ensemble size, so the ensemble has that many members.
    A failed search is replaced by one with a new seed, up to ``k`` replacements in all.
    The ``search_*`` fields, when set, go into each search job (``epochs``, ``C``, ``layers``,
    ``batch_size``: :data:`DARTS_DEFAULTS`); left at ``None`` the study's search settings
    apply (the runner puts them under the job's keys), else the method's defaults.
    Member jobs carry the genotype and the search's seed; the study's training settings
    apply to them.
    """

    method: ClassVar[str] = "darts"

    k: int | None = None
    search_epochs: int | None = None
    search_C: int | None = None
    search_layers: int | None = None
    search_batch_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("k", "search_epochs", "search_C", "search_layers", "search_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{type(self).__name__}.{name}: expected None or an int >= 1, "
                                 f"got {value}")
        self._reset()

    def _reset(self) -> None:
        self.searches: list[dict[str, Any]] = []  # one per search issued: seed, state, genotype
        self.to_train: list[int] = []  # search indices whose genotype waits for a member job
        self.failures = 0

    def setup(self, context: StrategyContext) -> None:
        super().setup(context)
        self._reset()

    @property
    def num_searches(self) -> int:
        if self.k is not None:
            return self.k
        return self.context.ensemble_size if self.context is not None else 1

    def search_settings(self) -> dict[str, Any]:
        """The search job's settings that this strategy fixes (those not ``None``)."""
        settings = {"epochs": self.search_epochs, "C": self.search_C, "layers": self.search_layers,
                    "batch_size": self.search_batch_size}
        return {k: v for k, v in settings.items() if v is not None}

    def _search_job(self, index: int) -> Job:
        s = self.searches[index]
        return {"kind": "search", "method": self.method, "seed": s["seed"], "search_index": index,
                **self.search_settings(), **space_to_job(self.space)}

    def ask(self) -> Job | Literal["wait", "finished"]:
        if self.to_train:
            index = self.to_train.pop(0)
            s = self.searches[index]
            s["state"] = "training"
            return {"kind": "member", "genotype": s["genotype"], "seed": s["seed"],
                    "search_index": index, "searched_by": self.method}
        wanted = self.num_searches + self.failures
        if len(self.searches) < wanted:
            index = len(self.searches)
            self.searches.append({"seed": int(self.rng.integers(2**31 - 1)), "state": "searching",
                                  "genotype": None})
            return self._search_job(index)
        if any(s["state"] in ("searching", "training") for s in self.searches):
            return WAIT
        return FINISHED

    def tell(self, job: Job, result: Result) -> None:
        index = job.get("search_index")
        if not isinstance(index, int) or not 0 <= index < len(self.searches):
            return  # not one of this strategy's jobs
        s = self.searches[index]
        failed = bool(result.get("error"))
        if job.get("kind") == "search":
            if failed or not result.get("genotype"):
                s["state"] = "failed"
                if self.failures < self.num_searches:
                    self.failures += 1
                return
            s["genotype"] = result["genotype"]
            s["state"] = "searched"
            self.to_train.append(index)
        else:
            s["state"] = "failed" if failed else "done"

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(searches=[dict(s) for s in self.searches], to_train=list(self.to_train),
                     failures=self.failures)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.searches = [dict(s) for s in state["searches"]]
        self.to_train = list(state["to_train"])
        self.failures = int(state["failures"])
        # Jobs in flight when the state was saved stay in flight: a restored Tune run resumes
        # those trials and tells their results.


@register("darts_ens")
@dataclass
class DartsEnsemble(SearchThenTrain):
    """DARTS ensembling: ``k`` independent DARTS searches (first or second ``order``), each
    derived genotype trained once; the ensemble is the k members (ForwardSelect picks M of
    them when k > M)."""

    method: ClassVar[str] = "darts"

    order: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.order not in (None, 1, 2):
            raise ValueError(f"{type(self).__name__}.order: expected 1, 2 or None (the study's "
                             f"search setting, else 1), got {self.order}")

    def search_settings(self) -> dict[str, Any]:
        extra = {} if self.order is None else {"order": self.order}
        return {**super().search_settings(), **extra}


@register("darts")
@dataclass
class Darts(DartsEnsemble):
    """Single-architecture DARTS: one search, its genotype trained once."""

    k: int | None = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k != 1:
            raise ValueError(f"Darts.k: one search by definition; use darts_ens for k={self.k}")
