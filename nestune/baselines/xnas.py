"""XNAS: neural architecture search with expert advice (Nayman et al., NeurIPS 2019).

No official search code was published; this follows the paper's Algorithm 1, reproduced here
with numbered lines, for one forecaster (one edge of a cell type):

    Algorithm 1  XNAS for a single forecaster
     1: Input: learning rate η, loss-gradient bound L, experts' predictions {f_{t,i}}, i = 1..N,
        for t = 1..T
     2: Init: I_0 = {1, ..., N};  v_{0,i} ← 1 for all i ∈ I_0
     3: for rounds t = 1, ..., T do
     4:     predict p_t ← Σ_{i∈I_{t−1}} v_{t−1,i} f_{t,i} / Σ_{i∈I_{t−1}} v_{t−1,i}
     5:     {the loss gradient ∇ℓ_t(p_t) is revealed}
     6:     for i ∈ I_{t−1} do
     7:         R_{t,i} ← −⟨∇ℓ_t(p_t), f_{t,i}⟩
     8:         v_{t,i} ← v_{t−1,i} · exp(η R_{t,i})
     9:     end for
    10:     θ_t ← max_{i∈I_{t−1}} v_{t,i} · exp(−2ηL(T − t))
    11:     I_t ← I_{t−1} \\ {i : v_{t,i} < θ_t}
    12: end for

with η = sqrt(2 ln N / (T L²)). In the search every edge of the DARTS cell is a forecaster whose
experts are the edge's ops (all cells of one type share their forecasters, as DARTS' α are
shared), ℓ is the loss on the architecture half of the train split, and the network weights ω
train on the other half with SGD exactly as in DARTS (:mod:`nestune.baselines.darts`),
alternating one expert update and one ω step.

Where each line lives in the code:

- line 2: :meth:`ExpertAdvice.__init__` (``log_v = 0``, every op active).
- line 4: :meth:`ExpertAdvice.weights`: w = v / Σv over the active set (a softmax of log v with
  removed ops at −inf, so their weight is exactly 0), passed as ``weights`` to
  ``Supernet.forward``, which mixes linearly, p = Σ w_i f_i, and does not compute ops whose
  weight is exactly 0.
- lines 5 and 7: the reward, :func:`xnas_search`'s step, by the identity below.
- line 8: :func:`eg_update`, in log space: log v ← log v + ηR.
- lines 10–11: :func:`wipeout`, in log space: remove i when log v_i < max_j log v_j − 2ηL(T − t).
- η: :func:`xnas_learning_rate`; T = epochs × steps per epoch.

The reward by autograd. The supernet computes p = Σ_i w_i f_i at every edge of every cell of a
type, and w (the normalised v) is a leaf tensor shared by those cells, so

    ∂ℓ/∂w_i = Σ_{cells} ⟨∇_p ℓ, f_i⟩,

the inner product running over the batch and every feature-map entry. ``w.grad`` after one
backward pass is therefore −R for every expert at once; R is the gradient with respect to the
mixing coefficients w (not v, whose normalisation would add a term common to all experts).

The bound L is enforced by clipping each reward to [−L, L]. With η as above, ηL =
sqrt(2 ln N / T) whatever L is, so an op that loses every round by the full 2L can be wiped out
no earlier than halfway through the search (its deficit after t rounds, 2ηLt, must exceed
the threshold's 2ηL(T − t)); the speed-up of wipeout is a second-half effect by design. More
generally an op that trails the leader by δ per round on average is wiped at
t ≈ 2LT / (2L + δ): δ = L/2 gives 0.8 T. L trades the regret guarantee's scale against how
early typical rewards can wipe an op: the default 0.05 is the scale of the rewards of a small
supernet on digits (median |∂ℓ/∂w| ≈ 0.04, about 40 % of rewards clipped), where the first op
goes at about 0.8 T and most go in the last tenth of the search (``bench/xnas_wipeout.py``).
Wipeout never removes the op with the largest v (its log v equals the maximum, never below it),
and a removed op never comes back (its log v is −inf). ``none`` is an expert like the others
when the space has it: its output is zero, so its reward is always 0 and it is never computed;
the other ops rise or fall relative to it, and ``derive`` never picks it.

Derivation: DARTS' rule (two strongest incoming edges per node, the argmax op of each,
``none`` excluded) on the final v / Σv, where an edge whose survivors are all ``none`` falls
back to the real op that was wiped out last (:meth:`ExpertAdvice.derive_weights`).

Speed-up: the search logs, per epoch, the mean step time and the number of ops still active,
and its result's ``extra`` holds the wipeout log and step times (``arrays`` the per-step ones).

The ``xnas`` strategy runs ``k`` XNAS searches with different seeds and trains each derived
genotype (``k`` defaults to the study's ensemble size), like ``darts_ens``: an ensemble
strategy must end with an ensemble of the same size as the others in a comparison, and
independent seeds are the one-shot analogue of the deep-ensemble recipe.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from nestune.baselines.darts import (
    DARTS_DEFAULTS,
    Progress,
    SearchBatches,
    SearchResult,
    SearchThenTrain,
    check_setting,
    cosine_lr,
    device_seconds,
    job_settings,
    make_weight_optimizer,
    seed_everything,
    space_from_job,
    sync_start,
    weight_step,
    weights_as_lists,
)
from nestune.platform.data import DataBundle
from nestune.platform.distributed import Replicas
from nestune.platform.search import register_search
from nestune.platform.strategy import register
from nestune.search_spaces.darts import DartsSpace

__all__ = [
    "XNAS_DEFAULTS",
    "ExpertAdvice",
    "Xnas",
    "eg_update",
    "wipeout",
    "xnas_job",
    "xnas_learning_rate",
    "xnas_search",
]

log = logging.getLogger(__name__)

CELLS = ("normal", "reduce")

# Defaults of an XNAS search job. XNAS searched in DARTS' set-up (the paper's values are
# DARTS_DEFAULTS' comments); ω trains with DARTS' SGD settings.
XNAS_DEFAULTS: dict[str, Any] = {
    "epochs": DARTS_DEFAULTS["epochs"],
    "C": DARTS_DEFAULTS["C"],
    "layers": DARTS_DEFAULTS["layers"],
    "batch_size": DARTS_DEFAULTS["batch_size"],
    "L": 0.05,
    "lr": DARTS_DEFAULTS["lr"],
    "lr_min": DARTS_DEFAULTS["lr_min"],
    "momentum": DARTS_DEFAULTS["momentum"],
    "weight_decay": DARTS_DEFAULTS["weight_decay"],
    "grad_clip": DARTS_DEFAULTS["grad_clip"],
    "train_portion": DARTS_DEFAULTS["train_portion"],
}


def xnas_learning_rate(num_experts: int, T: int, L: float) -> float:
    """η = sqrt(2 ln N / (T L²)), the EG learning rate of the regret bound."""
    if num_experts < 1 or T < 1 or not L > 0:
        raise ValueError(f"xnas_learning_rate: need N >= 1, T >= 1, L > 0; got {num_experts}, {T}, {L}")
    return math.sqrt(2.0 * math.log(max(num_experts, 2)) / (T * L * L))


def eg_update(log_v: torch.Tensor, reward: torch.Tensor, eta: float) -> torch.Tensor:
    """Line 8 in log space: log v + η R; removed experts (−inf) stay removed."""
    if not torch.isfinite(reward).all():
        raise FloatingPointError("XNAS: a reward is not finite (did the supernet diverge?)")
    return log_v + eta * reward


def wipeout(log_v: torch.Tensor, active: torch.Tensor, eta: float, L: float, T: int,
            t: int) -> torch.Tensor:
    """Lines 10–11 in log space, per row (one row = one forecaster): the experts still active
    after round ``t`` of ``T``.

    An expert goes when log v_i < max_j log v_j − 2ηL(T − t). The row's maximum is never
    below itself, so the expert with the largest weight always stays (ties stay together).
    """
    masked = log_v.masked_fill(~active, -math.inf)
    best = masked.max(dim=-1, keepdim=True).values
    threshold = best - 2.0 * eta * L * max(T - t, 0)
    keep = active & ~(masked < threshold)
    # Redundant while the gap is >= 0, and kept so no rounding can ever drop the leader.
    return keep | (active & (masked == best))


class ExpertAdvice:
    """The forecasters of both cell types: log v and the active sets, (num_edges, num_ops) each.

    ``weights()`` gives the normalised mixing weights (line 4); ``update(grads)`` takes the
    gradients of the loss with respect to those weights and does lines 7–11 for every edge.
    """

    def __init__(self, num_edges: int, num_ops: int, T: int, L: float,
                 device: str | torch.device = "cpu") -> None:
        self.T = int(T)
        self.L = float(L)
        self.num_ops = num_ops
        self.eta = xnas_learning_rate(num_ops, self.T, self.L)
        self.t = 0
        self.log_v = [torch.zeros(num_edges, num_ops, device=device) for _ in CELLS]
        self.active = [torch.ones(num_edges, num_ops, dtype=torch.bool, device=device) for _ in CELLS]
        # For derive only: the round each expert was removed in (0 = active) and its log v
        # below the leader's at that moment.
        self.removed_at = [torch.zeros(num_edges, num_ops, dtype=torch.long, device=device)
                           for _ in CELLS]
        self.removed_gap = [torch.zeros(num_edges, num_ops, device=device) for _ in CELLS]

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """v / Σv per edge over its active experts; exactly 0 for removed ones."""
        out = []
        for log_v, act in zip(self.log_v, self.active, strict=True):
            out.append(torch.softmax(log_v.masked_fill(~act, -math.inf), dim=-1))
        return out[0], out[1]

    def update(self, grads: Sequence[torch.Tensor]) -> list[tuple[str, int, int]]:
        """One round: rewards R = −clip(∂ℓ/∂w, −L, L), the EG step, then wipeout. Returns the
        (cell, edge, op) removed in this round."""
        self.t += 1
        removed = []
        for c, (cell, g) in enumerate(zip(CELLS, grads, strict=True)):
            reward = -g.detach().clamp(-self.L, self.L)
            act = self.active[c]
            log_v = eg_update(self.log_v[c], torch.where(act, reward, torch.zeros_like(reward)), self.eta)
            keep = wipeout(log_v, act, self.eta, self.L, self.T, self.t)
            gone = act & ~keep
            if gone.any():
                best = log_v.masked_fill(~act, -math.inf).max(dim=-1, keepdim=True).values
                self.removed_at[c] = self.removed_at[c].masked_fill(gone, self.t)
                self.removed_gap[c] = torch.where(gone, log_v - best, self.removed_gap[c])
                for e, i in gone.nonzero().tolist():
                    removed.append((cell, e, i))
            self.log_v[c] = log_v.masked_fill(~keep, -math.inf)
            self.active[c] = keep
        return removed

    def derive_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights the genotype is derived from: ``weights()`` for active experts (> 0),
        and for removed ones a score in (−1, 0) that orders them by the round they were
        removed in, then by how far below the leader they were then.

        It matters only where an edge's survivors are all ``none``, which happens when every
        real op on it lost to the zero op: DARTS' rule skips ``none``, and with every other
        weight at 0 its argmax would be the first op in the space's order. With these
        scores such an edge ranks below every edge with a live op, and gives the op that
        survived longest.
        """
        out = []
        horizon = max(self.T, self.t) + 1
        for w, act, at, gap in zip(self.weights(), self.active, self.removed_at, self.removed_gap,
                                   strict=True):
            score = (at.float() - 1.0 + gap.exp()) / horizon - 1.0
            out.append(torch.where(act, w, score))
        return out[0], out[1]

    def remaining(self) -> dict[str, int]:
        return {cell: int(a.sum()) for cell, a in zip(CELLS, self.active, strict=True)}

    def computed(self, space: DartsSpace) -> dict[str, int]:
        """Active ops the supernet actually computes (``none`` never is)."""
        real = torch.tensor([op != "none" for op in space.ops], device=self.active[0].device)
        return {cell: int((a & real).sum()) for cell, a in zip(CELLS, self.active, strict=True)}


def xnas_search(
    data: DataBundle,
    *,
    epochs: int = XNAS_DEFAULTS["epochs"],
    C: int = XNAS_DEFAULTS["C"],
    layers: int = XNAS_DEFAULTS["layers"],
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = XNAS_DEFAULTS["batch_size"],
    L: float = XNAS_DEFAULTS["L"],
    space: DartsSpace | None = None,
    lr: float = XNAS_DEFAULTS["lr"],
    lr_min: float = XNAS_DEFAULTS["lr_min"],
    momentum: float = XNAS_DEFAULTS["momentum"],
    weight_decay: float = XNAS_DEFAULTS["weight_decay"],
    grad_clip: float = XNAS_DEFAULTS["grad_clip"],
    train_portion: float = XNAS_DEFAULTS["train_portion"],
    progress: Progress | None = None,
    replicas: Replicas | None = None,
) -> SearchResult:
    """Run an XNAS search on ``data``'s train split (halved as in DARTS) and return its
    :class:`~nestune.baselines.darts.SearchResult`: ``alpha_*`` are log v (−inf = wiped out),
    ``weights_*`` the normalised v, ``extra`` the wipeout log, step times and history."""
    replicas = replicas or Replicas()
    where = "xnas_search"
    epochs = check_setting("epochs", epochs, int, 1, where=where)
    batch_size = check_setting("batch_size", batch_size, int, 2, where=where)
    L = check_setting("L", L, float, 1e-12, where=where)
    lr = check_setting("lr", lr, float, 0.0, where=where)
    lr_min = check_setting("lr_min", lr_min, float, 0.0, lr, where=where)
    momentum = check_setting("momentum", momentum, float, 0.0, 1.0, where=where)
    weight_decay = check_setting("weight_decay", weight_decay, float, 0.0, where=where)
    grad_clip = check_setting("grad_clip", grad_clip, float, 0.0, where=where)
    train_portion = check_setting("train_portion", train_portion, float, 0.05, 0.95, where=where)
    space = space or DartsSpace()
    device = torch.device(device)

    start = time.perf_counter()
    seed_everything(seed)
    model = space.supernet(C=C, layers=layers, num_classes=data.num_classes,
                           in_channels=data.in_channels).to(device)
    # XNAS' architecture state is the experts' weights; the supernet's own α are unused.
    model.alpha_normal.requires_grad_(False)
    model.alpha_reduce.requires_grad_(False)
    sync_start(model, replicas)
    batches = SearchBatches(data, batch_size, seed, device, replicas, train_portion)
    T = epochs * batches.steps
    experts = ExpertAdvice(space.num_edges, space.num_ops, T, L, device)
    w_opt = make_weight_optimizer(model, lr, momentum, weight_decay)

    total_ops = space.num_edges * space.num_ops
    history: dict[str, Any] = {
        "weights": [weights_as_lists(experts.weights())], "genotype": [],
        "train_loss": [], "train_acc": [], "arch_loss": [], "arch_acc": [], "lr": [],
        "step_seconds": [], "epoch_seconds": [],
    }
    wipeout_log: list[dict[str, Any]] = []
    step_times: list[float] = []
    active_per_step: list[int] = []
    model.train()
    first_step = None
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        lr_now = cosine_lr(epoch, epochs, lr, lr_min)
        for group in w_opt.param_groups:
            group["lr"] = lr_now
        sums = np.zeros(4)
        removed_epoch: list[list[Any]] = []
        for (xw, yw), (xa, ya) in batches.epoch():
            t_step = time.perf_counter()
            # Lines 4–5: predict with the normalised weights, reveal the loss gradient.
            w = tuple(t.detach().requires_grad_(True) for t in experts.weights())
            logits = model(xa, w)
            a_loss = F.cross_entropy(logits, ya)
            grads = torch.autograd.grad(a_loss, w, allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for t, g in zip(w, grads, strict=True)]
            replicas.all_reduce_mean(grads)
            # Lines 7–11 for every edge.
            for cell, e, i in experts.update(grads):
                removed_epoch.append([experts.t, cell, e, space.ops[i]])
            w_loss, w_acc = weight_step(model, w_opt, xw, yw, experts.weights(), grad_clip, replicas)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - t_step)
            active_per_step.append(sum(experts.computed(space).values()))
            a_acc = float((logits.detach().argmax(1) == ya).float().mean())
            sums += (w_loss, w_acc, float(a_loss.detach()), a_acc)
        seconds = time.perf_counter() - t_epoch
        means = sums / batches.steps
        epoch_steps = step_times[-batches.steps:]
        step_mean = float(np.mean(epoch_steps))
        first_step = first_step or step_mean
        remaining, computed = experts.remaining(), experts.computed(space)
        wipeout_log.append({"epoch": epoch + 1, "step": experts.t, "ops_remaining": remaining,
                            "ops_computed": computed, "removed": removed_epoch,
                            "step_seconds": step_mean})
        genotype = model.derive(experts.derive_weights())
        history["weights"].append(weights_as_lists(experts.weights()))
        history["genotype"].append(genotype.to_json())
        for key, value in zip(("train_loss", "train_acc", "arch_loss", "arch_acc"), means, strict=True):
            history[key].append(float(value))
        history["lr"].append(lr_now)
        history["step_seconds"].append(step_mean)
        history["epoch_seconds"].append(seconds)
        log.info(
            "xnas epoch %d/%d: ops remaining normal %d/%d reduce %d/%d (computed %d+%d), "
            "%d wiped this epoch, step %.3f s (%.0f%% of epoch 1), arch loss %.3f",
            epoch + 1, epochs, remaining["normal"], total_ops, remaining["reduce"], total_ops,
            computed["normal"], computed["reduce"], len(removed_epoch), step_mean,
            100.0 * step_mean / first_step, means[2],
        )
        if progress is not None:
            progress({"epoch": epoch + 1, "train_loss": float(means[0]), "train_acc": float(means[1]),
                      "arch_loss": float(means[2]), "arch_acc": float(means[3]),
                      "step_seconds": step_mean,
                      "ops_remaining": remaining["normal"] + remaining["reduce"]})

    w_normal, w_reduce = (t.detach().cpu() for t in experts.weights())
    genotype = space.validate(space.derive(*experts.derive_weights()))
    total, wall = device_seconds(start, device, replicas)
    extra = {
        "method": "xnas",
        "history": history,
        "wipeout": wipeout_log,
        "step_seconds": history["step_seconds"],
        "speedup": first_step / history["step_seconds"][-1] if history["step_seconds"][-1] > 0 else 1.0,
        "eta": experts.eta,
        "T": T,
        # The round of the first removal (None: nothing was wiped out).
        "first_wipeout_step": next((e["removed"][0][0] for e in wipeout_log if e["removed"]), None),
        "settings": {
            "epochs": epochs, "C": C, "layers": layers, "seed": seed, "batch_size": batch_size,
            "L": L, "lr": lr, "lr_min": lr_min, "momentum": momentum, "weight_decay": weight_decay,
            "grad_clip": grad_clip, "train_portion": train_portion,
            "nodes": space.nodes, "ops": list(space.ops),
        },
        "steps_per_epoch": batches.steps,
        "per_worker_batch_size": batches.batch_size,
        "workers": replicas.world_size,
        "wall_seconds": wall,
    }
    return SearchResult(
        genotype=genotype,
        alpha_normal=experts.log_v[0].detach().cpu().clone(),
        alpha_reduce=experts.log_v[1].detach().cpu().clone(),
        weights_normal=w_normal,
        weights_reduce=w_reduce,
        device_seconds=total,
        extra=extra,
        arrays={"step_seconds": np.asarray(step_times, dtype=np.float64),
                "computed_ops": np.asarray(active_per_step, dtype=np.int64)},
    )


def xnas_job(job: dict[str, Any], data: DataBundle, device: str | torch.device = "cpu", *,
             replicas: Replicas | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Run the XNAS search job ``job`` (keys of :data:`XNAS_DEFAULTS`, ``seed``, and the
    space's ``nodes``/``ops``) and return its result dict."""
    settings = job_settings(job, XNAS_DEFAULTS)
    seed = check_setting("seed", job.get("seed", 0), int, where="search job")
    result = xnas_search(data, seed=seed, device=device, space=space_from_job(job),
                         replicas=replicas, progress=progress, **settings)
    return result.to_job_result()


@register_search("xnas", settings=XNAS_DEFAULTS)
def _xnas_search_job(job: dict[str, Any], data: DataBundle, device: str) -> dict[str, Any]:
    return xnas_job(job, data, device)


@register("xnas")
@dataclass
class Xnas(SearchThenTrain):
    """XNAS ensembling: ``k`` XNAS searches with different seeds (``k`` = the study's ensemble
    size by default), each derived genotype trained once; ForwardSelect picks M when k > M."""

    method: ClassVar[str] = "xnas"

    L: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.L is not None and not self.L > 0:
            raise ValueError(f"Xnas.L: expected None or a float > 0, got {self.L}")

    def search_settings(self) -> dict[str, Any]:
        extra = {} if self.L is None else {"L": self.L}
        return {**super().search_settings(), **extra}
