"""``edgenes``: differentiable neural ensemble search with diversity control (Babkin 2023–24).

Job sequence (each job is a Ray Tune trial, so the runner counts its device-seconds):

1. ``{"kind": "search", "method": "darts", ...}`` — a DARTS search; its derived genotype is α*.
   Skipped when the strategy is given ``alpha_star``.
2. ``{"kind": "search", "method": "edgenes", "alpha_star": ..., ...}`` — trains the
   hypernetwork α(λ) and the supernet (:mod:`nestune.edgenes.search`); it returns the
   genotypes derived at ``num_samples`` values of λ (uniform draws or a grid), the diversity
   curve, its Spearman correlation and a PNG of shared edges against λ.
3. One ``{"kind": "member", ...}`` job per *distinct* sampled genotype (duplicates dropped,
   the first λ kept), with ``lambda`` and ``shared_edges`` (with α*) as keys, so each member's
   λ and diversity are logged as its trial's params. All are issued at once (concurrent
   trials).
4. :meth:`EdgeNES.select` — the best size-n ensemble by validation NLL of the averaged
   probabilities: exhaustive over all C(K, n) subsets of the K members when that is at most
   ``exhaustive_limit``, ForwardSelect otherwise. It is given validation predictions only.

A failed search is run again with a new seed, at most ``max_retries`` times per search; a
failed member is dropped. :meth:`EdgeNES.cost_split` gives the device-seconds of the DARTS
search, the hypernetwork search and the members; :meth:`EdgeNES.artifacts` the PNG.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from nestune.platform.strategy import (
    FINISHED,
    WAIT,
    Job,
    Result,
    Strategy,
    StrategyContext,
    register,
)
from nestune.search_spaces.darts import PRIMITIVES, DartsSpace

__all__ = ["EdgeNES", "exhaustive_select", "member_disagreement"]

log = logging.getLogger(__name__)

_SEED_HIGH = 2**31 - 1
_EPS = 1e-12  # as nestune.metrics: probabilities are clipped here before the log


def _space_keys(space: DartsSpace) -> dict[str, Any]:
    # Search jobs name a non-default space by these keys (as the DARTS search reads them).
    out: dict[str, Any] = {}
    if space.nodes != 4:
        out["nodes"] = space.nodes
    if space.ops != PRIMITIVES:
        out["ops"] = list(space.ops)
    return out


def _true_class_probs(val_probs: Any, labels: Any) -> np.ndarray:
    p = np.asarray(val_probs)
    if p.ndim != 3 or min(p.shape) < 1:
        raise ValueError(f"val_probs: expected shape (K, N, C) with K, N, C >= 1, got {p.shape}")
    y = np.asarray(labels)
    if y.shape != (p.shape[1],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels: expected {p.shape[1]} integer labels, got shape {y.shape} ({y.dtype})")
    if y.min() < 0 or y.max() >= p.shape[2]:
        raise ValueError(f"labels: expected values in [0, {p.shape[2] - 1}]")
    return p[:, np.arange(p.shape[1]), y].astype(np.float64)


def exhaustive_select(val_probs: Any, labels: Any, size: int, chunk: int = 4096) -> list[int]:
    """The size-``size`` subset of the pool whose averaged probabilities have the smallest NLL
    on ``labels``, over all C(K, size) subsets (ties: the first in lexicographic order).
    Returns its indices, ascending."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size: expected an int >= 1, got {size!r}")
    p = _true_class_probs(val_probs, labels)
    k = p.shape[0]
    size = min(int(size), k)
    best, best_nll = None, math.inf
    combos = itertools.combinations(range(k), size)
    while True:
        block = np.array(list(itertools.islice(combos, chunk)), dtype=np.int64)
        if block.size == 0:
            break
        mean = p[block].mean(axis=1)  # (S, N): only the true class enters the NLL
        nlls = -np.log(np.clip(mean, _EPS, None)).mean(axis=1)
        i = int(np.argmin(nlls))
        if nlls[i] < best_nll:
            best, best_nll = block[i], float(nlls[i])
    return [int(j) for j in best]


def member_disagreement(member_probs: Any) -> np.ndarray:
    """For each member, the mean over the other members of the fraction of samples on which
    the two predict different classes (argmax, ties to the lowest index), shape (M,). The
    per-member view of ``nestune.metrics.disagreement``, for logging each member's diversity
    next to its λ."""
    p = np.asarray(member_probs)
    if p.ndim != 3:
        raise ValueError(f"member_probs: expected shape (M, N, C), got {p.shape}")
    m = p.shape[0]
    if m < 2:
        return np.zeros(m)
    preds = p.argmax(axis=-1)
    # One member against all at a time: O(M·N) memory, not O(M²·N).
    return np.array([(preds != preds[i]).mean(axis=1).sum() / (m - 1) for i in range(m)])


@register("edgenes")
@dataclass
class EdgeNES(Strategy):
    """EdgeNES: α* from DARTS, a hypernetwork α(λ) trained so the genotype at λ shares about λ
    edges with α*, genotypes derived at N values of λ trained as members, and the best size-n
    ensemble selected on validation (exhaustively when C(K, n) <= ``exhaustive_limit``).

    ``alpha_star``: a given α* (genotype JSON or DARTS repr) skips the DARTS search.
    ``darts_*``: the DARTS search job; ``search_*`` and the objective's settings: the EdgeNES
    search job (meanings: :class:`nestune.edgenes.search.EdgeNESConfig`); ``search_options``:
    any other EdgeNESConfig key for that job. ``num_samples`` (N) λ values, drawn uniformly
    from [0, Λ] or on a grid (``sampling``).
    """

    alpha_star: str | None = None
    darts_epochs: int = 10
    darts_C: int = 8
    darts_layers: int = 5
    darts_batch_size: int = 64
    darts_order: int = 1
    search_epochs: int = 10
    search_C: int = 8
    search_layers: int = 5
    search_batch_size: int = 64
    hypernet: Literal["piecewise", "mlp"] = "piecewise"
    pivots: int = 5
    arch_lr: float = 0.05
    reg_start: float = 0.3
    reg_end: float = 3.0
    reg_schedule: Literal["linear", "constant"] = "linear"
    temp_start: float = 1.0
    temp_end: float = 0.05
    temp_schedule: Literal["exponential", "linear", "constant"] = "exponential"
    mode_weight: float = 1.0
    num_samples: int = 10
    sampling: Literal["uniform", "grid"] = "uniform"
    exhaustive_limit: int = 5000
    max_retries: int = 2
    search_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        from nestune.edgenes.search import EdgeNESConfig, parse_genotype

        for name in ("darts_epochs", "darts_C", "darts_layers", "darts_batch_size", "search_epochs",
                     "search_C", "search_layers", "search_batch_size", "pivots", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"EdgeNES.{name}: expected an int >= 1, got {getattr(self, name)}")
        for name in ("darts_layers", "search_layers"):
            if getattr(self, name) < 3:
                raise ValueError(f"EdgeNES.{name}: expected an int >= 3 (a supernet with both normal "
                                 f"and reduction cells), got {getattr(self, name)}")
        if self.darts_order not in (1, 2):
            raise ValueError(f"EdgeNES.darts_order: expected 1 or 2, got {self.darts_order}")
        if self.exhaustive_limit < 0 or self.max_retries < 0:
            raise ValueError("EdgeNES.exhaustive_limit / max_retries: expected ints >= 0")
        if self.alpha_star is not None:
            parse_genotype(self.alpha_star, "EdgeNES.alpha_star")
        known = {f.name for f in dataclasses.fields(EdgeNESConfig)}
        unknown = set(self.search_options) - known
        if unknown:
            raise ValueError(f"EdgeNES.search_options: unknown key(s) {sorted(unknown)}; "
                             f"known: {sorted(known)}")
        # Check the whole EdgeNES search configuration now, not in a trial later.
        EdgeNESConfig.from_job(self._edgenes_settings())
        self._reset()

    def _reset(self) -> None:
        self.phase = "darts"  # darts -> edgenes -> members -> done
        self.alpha_star_json: str | None = None
        self.pending: dict[str, Job] = {}
        self.queue: list[Job] = []
        self.members: list[dict[str, Any]] = []
        self.retries = {"darts": 0, "edgenes": 0}
        self.costs = {"darts": 0.0, "edgenes": 0.0, "members": 0.0}
        self.diversity: dict[str, Any] = {}
        self.plot_png = ""
        self._next = 0

    def setup(self, context: StrategyContext) -> None:
        super().setup(context)
        self._reset()
        if self.alpha_star is not None:
            from nestune.edgenes.search import parse_genotype

            g = self.space.validate(parse_genotype(self.alpha_star, "EdgeNES.alpha_star"))
            self.alpha_star_json = g.to_json()
            self.phase = "edgenes"

    # -- jobs ---------------------------------------------------------------------------------

    def _edgenes_settings(self) -> dict[str, Any]:
        return {
            **self.search_options,
            "epochs": self.search_epochs, "C": self.search_C, "layers": self.search_layers,
            "batch_size": self.search_batch_size, "hypernet": self.hypernet, "pivots": self.pivots,
            "arch_lr": self.arch_lr, "reg_start": self.reg_start, "reg_end": self.reg_end,
            "reg_schedule": self.reg_schedule, "temp_start": self.temp_start,
            "temp_end": self.temp_end, "temp_schedule": self.temp_schedule,
            "mode_weight": self.mode_weight, "num_samples": self.num_samples,
            "sampling": self.sampling,
        }

    def _job_id(self, kind: str) -> str:
        self._next += 1
        return f"{kind}-{self._next}"

    def _issue(self, job: Job) -> Job:
        self.pending[job["job_id"]] = job
        return dict(job)

    def ask(self) -> Job | Literal["wait", "finished"]:
        if self.phase == "darts":
            self.phase = "darts_running"
            return self._issue({
                "kind": "search", "method": "darts", "job_id": self._job_id("darts"),
                "seed": int(self.rng.integers(_SEED_HIGH)), "epochs": self.darts_epochs,
                "C": self.darts_C, "layers": self.darts_layers, "batch_size": self.darts_batch_size,
                "order": self.darts_order, **_space_keys(self.space),
            })
        if self.phase == "edgenes":
            self.phase = "edgenes_running"
            return self._issue({
                "kind": "search", "method": "edgenes", "job_id": self._job_id("edgenes"),
                "seed": int(self.rng.integers(_SEED_HIGH)), "alpha_star": self.alpha_star_json,
                **self._edgenes_settings(), **_space_keys(self.space),
            })
        if self.phase == "members" and self.queue:
            return self._issue(self.queue.pop(0))
        if self.phase == "done" or (self.phase == "members" and not self.pending):
            self.phase = "done"
            return FINISHED
        return WAIT

    def tell(self, job: Job, result: Result) -> None:
        # Our own copy of the job, not the runner's (which may carry added keys).
        mine = self.pending.pop(str(job.get("job_id")), None)
        if mine is None:
            log.warning("EdgeNES.tell: job %r is not pending (never asked, or told twice); ignored",
                        job.get("job_id"))
            return
        failed = bool(result.get("error"))
        seconds = float(result.get("device_seconds") or 0.0)
        if mine["kind"] == "member":
            self.costs["members"] += seconds
            self.members.append({k: mine[k] for k in ("job_id", "genotype", "seed", "lambda",
                                                      "shared_edges")}
                                | {"status": "failed" if failed else "ok",
                                   "trial_id": result.get("trial_id")})
            return
        method = mine["method"]
        self.costs[method] += seconds
        if failed or not result.get("genotype"):
            if self.retries[method] >= self.max_retries:
                log.warning("EdgeNES: %s search failed %d times; giving up", method,
                            self.retries[method] + 1)
                self.phase = "done"
                return
            self.retries[method] += 1
            self.phase = method  # asked again, with a new seed
            return
        if method == "darts":
            self.alpha_star_json = result["genotype"]
            self.phase = "edgenes"
            return
        self._plan_members(result.get("extra") or {})

    def _plan_members(self, extra: dict[str, Any]) -> None:
        samples = extra.get("samples") or []
        if not samples:
            raise ValueError("EdgeNES: the edgenes search result has no extra['samples']")
        self.diversity = {key: extra.get(key) for key in ("lambdas", "shared_edges", "spearman",
                                                          "mean_abs_gap", "lambda_max")}
        self.diversity["samples"] = [dict(s) for s in samples]
        self.plot_png = str(extra.get("plot_png") or "")
        seen: set[str] = set()
        for s in samples:
            # Genotype JSON is canonical (Genotype.to_json), so equal strings = equal genotypes.
            if s["genotype"] in seen:
                continue
            seen.add(s["genotype"])
            self.queue.append({
                "kind": "member", "job_id": self._job_id("member"), "genotype": s["genotype"],
                "seed": int(self.rng.integers(_SEED_HIGH)), "lambda": float(s["lambda"]),
                "shared_edges": int(s["shared_edges"]),
            })
        self.diversity["distinct"] = len(self.queue)
        self.phase = "members"

    # -- selection ----------------------------------------------------------------------------

    def select(self, val_probs: np.ndarray, labels: np.ndarray, size: int) -> list[int]:
        """The best size-``size`` ensemble by validation NLL: exhaustive when C(K, size) <=
        ``exhaustive_limit``, ForwardSelect otherwise. Validation predictions only: the
        strategy never sees test data."""
        k = len(val_probs)
        size = min(int(size), k)
        if math.comb(k, size) <= self.exhaustive_limit:
            return exhaustive_select(val_probs, labels, size)
        return super().select(val_probs, labels, size)

    # -- reporting ----------------------------------------------------------------------------

    def cost_split(self) -> dict[str, float]:
        """Device-seconds told so far: the DARTS search, the EdgeNES (hypernetwork) search and
        the members (failed jobs included: they were paid for)."""
        return dict(self.costs)

    def artifacts(self) -> dict[str, bytes]:
        """Files for the (strategy, seed) run's MLflow artifacts: the shared-edges-vs-λ PNG."""
        if not self.plot_png:
            return {}
        return {"shared_edges_vs_lambda.png": base64.b64decode(self.plot_png)}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            phase=self.phase, alpha_star_json=self.alpha_star_json,
            pending={k: dict(v) for k, v in self.pending.items()},
            queue=[dict(j) for j in self.queue], members=[dict(m) for m in self.members],
            retries=dict(self.retries), costs=dict(self.costs), diversity=dict(self.diversity),
            plot_png=self.plot_png, next=self._next,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.phase = str(state["phase"])
        self.alpha_star_json = state["alpha_star_json"]
        self.pending = {str(k): dict(v) for k, v in state["pending"].items()}
        self.queue = [dict(j) for j in state["queue"]]
        self.members = [dict(m) for m in state["members"]]
        self.retries = {k: int(v) for k, v in state["retries"].items()}
        self.costs = {k: float(v) for k, v in state["costs"].items()}
        self.diversity = dict(state["diversity"])
        self.plot_png = str(state["plot_png"])
        self._next = int(state["next"])
