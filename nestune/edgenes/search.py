"""The EdgeNES search: train a hypernetwork α(λ) so that the architecture at λ shares about λ
edges with α*, and the supernet under it, side by side (Babkin 2023–24).

Objective (λ ~ U(0, Λ), Λ = ``space.arch_edges``; W(λ) = relaxed architecture of α(λ), see
:mod:`nestune.edgenes.hypernet`)::

    min_a  E_λ [ L_val(w*, W(λ)) + C · (λ − ⟨α*, W(λ)⟩)² ]
    s.t.   w* = argmin_w E_λ L_train(w, W(λ))

plus, by default, a *mode term*: the same penalty on the noise-free relaxation at the same
temperature, C · mode_weight · (λ − ⟨α*, W₀(λ)⟩)², W₀ = ``relax(..., gumbel=False)``. Why:
the genotypes EdgeNES trains are *derived* (argmax) at λ, not sampled, and the Gumbel term
alone is content with a spread-out α(λ) whose samples share λ edges on average while its
argmax shares far more (every edge of α* slightly ahead of the rest: the mean count is right,
the mode is α*). Breaking that symmetry relies on the variance part of E[(λ − count)²] alone,
a weak signal. W₀ at temperature t interpolates between the two counts that matter: at t = 1
⟨α*, W₀⟩ is exactly the expected count of a sample (inclusion probabilities of the top-2
draw times op probabilities), and as t → 0 it is ``common_edges(α*, derive(α(λ)))``, the
count of the genotype that will be trained. On digits (C=4, 3 layers, 6 epochs) the Gumbel
term alone gave Spearman ≈ 0.95 with a curve that saturates at 16 shared edges from λ ≈ 9;
with the mode term the derived curve follows y = λ within one edge (ρ ≈ 0.999).
``mode_weight = 0`` restores the plain objective.

Solved as in first-order DARTS, alternating per step:

1. hypernetwork step (Adam) on a batch of the *architecture half* of the train split: one
   λ runs through the supernet for L_val; the regulariser (both terms) is averaged over that
   λ and ``reg_samples`` more λ ~ U(0, Λ), each with its own Gumbel noise. The regulariser
   needs no forward pass of the supernet, so the extra samples cost next to nothing and cut
   the variance of its gradient, which otherwise would reach each pivot only on the steps
   whose single λ falls next to it;
2. weight step (SGD, cosine learning rate per epoch, gradient clipping) on a batch of the
   *weight half*, under the relaxed architecture of a fresh λ (no gradient to the
   hypernetwork).

Only the study's train split is read (halved by a seeded permutation); its val split is left
for member selection and the test split is never touched.

Schedules, over the run's steps (progress p = step / (steps − 1)):

- C (``reg_*``): linear from ``reg_start`` (0.3) to ``reg_end`` (3) — early on accuracy
  shapes the architectures, later the count is enforced; ``reg_schedule="constant"`` holds
  ``reg_end`` throughout.
- t (``temp_*``): exponential from ``temp_start`` (1) to ``temp_end`` (0.05),
  t = t0 · (t1/t0)^p — a constant *ratio* per step, so the many late steps at low temperature
  (where samples are nearly discrete and the count is the one ``derive`` will see) are not
  squeezed into the last few percent as with a linear decay; ``"linear"`` and ``"constant"``
  (``temp_end`` throughout) are options.

The result's genotype is the one derived at λ = Λ. ``extra`` carries the evidence of
diversity control: the shared edges of the genotype derived at each λ of a grid, their
Spearman correlation with λ, the ensemble's λ samples with their genotypes, and
``plot_png`` — a PNG (base64) of shared edges against λ with the ideal line y = λ; a job key
``plot_path`` (absolute) also writes it there. The hypernetwork's parameters are in
``arrays`` (``hypernet.<name>``), its kind and config in ``extra["hypernet"]``.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from nestune.baselines.darts import space_from_job
from nestune.edgenes.hypernet import (
    Hypernet,
    derive_at,
    make_hypernet,
    relax,
    shared_edges_relaxed,
)
from nestune.platform.data import DataBundle, DeviceBatches, Split
from nestune.platform.search import register_search
from nestune.platform.strategy import check_fields
from nestune.search_spaces.darts import DartsSpace, Genotype

__all__ = [
    "EdgeNESConfig",
    "EdgeNESResult",
    "edgenes_job",
    "edgenes_search",
    "load_hypernet",
    "parse_genotype",
    "plot_shared_edges",
    "schedule",
]

Progress = Callable[[dict[str, Any]], None]


@dataclass
class EdgeNESConfig:
    """Settings of an EdgeNES search; a search job carries them as keys of the same names.

    Supernet and weight training (as the DARTS search, so both searches train alike):
    ``epochs``, ``C`` (channels), ``layers``, ``batch_size``, ``lr`` → ``lr_min`` (cosine),
    ``momentum``, ``weight_decay``, ``grad_clip``, ``train_portion`` (share of the train split
    for the weights; the rest trains the hypernetwork).

    Hypernetwork: ``hypernet`` ("piecewise" | "mlp"), ``pivots`` (K, piecewise), ``hidden`` /
    ``hidden_layers`` (mlp), Adam with ``arch_lr``, ``arch_betas``, ``arch_weight_decay``.

    Objective: ``reg_start`` → ``reg_end`` with ``reg_schedule`` (C), ``temp_start`` →
    ``temp_end`` with ``temp_schedule`` (Gumbel-softmax temperature), ``reg_samples`` extra λ
    per step for the regulariser, ``mode_weight`` of the noise-free (mode) count term.

    Speed: op weights below ``prune_below`` are set to exactly 0 in the supernet's forward, so
    those ops are not computed (the count regulariser still sees them). At low temperature a
    relaxed architecture is nearly discrete and most of the 14 x |ops| ops per cell fall
    below it; what is dropped changes a mixed edge's output by at most ``prune_below`` times an
    op's output, and those ops' gradients were as small. ``amp``: bf16 autocast of the
    supernet on CUDA.

    Outputs: ``num_samples`` λ values for the ensemble, ``sampling`` "uniform" (λ ~ U(0, Λ),
    seeded) or "grid" (evenly spaced from 0 to Λ); ``grid_points`` λ values of the diversity
    curve (and its Spearman correlation).
    """

    epochs: int = 10
    C: int = 8
    layers: int = 5
    batch_size: int = 64
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    train_portion: float = 0.5
    hypernet: Literal["piecewise", "mlp"] = "piecewise"
    pivots: int = 5
    hidden: int = 64
    hidden_layers: int = 2
    arch_lr: float = 0.05
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    reg_start: float = 0.3
    reg_end: float = 3.0
    reg_schedule: Literal["linear", "constant"] = "linear"
    temp_start: float = 1.0
    temp_end: float = 0.05
    temp_schedule: Literal["exponential", "linear", "constant"] = "exponential"
    reg_samples: int = 32
    mode_weight: float = 1.0
    num_samples: int = 10
    sampling: Literal["uniform", "grid"] = "uniform"
    grid_points: int = 33
    prune_below: float = 1e-3
    amp: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.arch_betas, list):
            self.arch_betas = tuple(self.arch_betas)
        check_fields(self)
        positive_ints = ("epochs", "C", "layers", "batch_size", "pivots", "hidden", "hidden_layers",
                         "num_samples")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"EdgeNESConfig.{name}: expected an int >= 1, got {getattr(self, name)}")
        if self.layers < 3:
            raise ValueError(
                f"EdgeNESConfig.layers: expected an int >= 3, got {self.layers} (DARTS reduces at "
                "1/3 and 2/3 of the depth: fewer layers leave the supernet no normal cell, so the "
                "normal half of α(λ) would never be trained for accuracy)"
            )
        if self.batch_size < 2:
            raise ValueError(f"EdgeNESConfig.batch_size: expected an int >= 2, got {self.batch_size}")
        if self.pivots < 2:
            raise ValueError(f"EdgeNESConfig.pivots: expected an int >= 2, got {self.pivots}")
        if self.grid_points < 3:
            raise ValueError(f"EdgeNESConfig.grid_points: expected an int >= 3, got {self.grid_points}")
        if self.reg_samples < 0:
            raise ValueError(f"EdgeNESConfig.reg_samples: expected an int >= 0, got {self.reg_samples}")
        for name in ("lr", "arch_lr", "temp_start", "temp_end"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"EdgeNESConfig.{name}: expected a positive number, got {getattr(self, name)}"
                )
        for name in ("lr_min", "momentum", "weight_decay", "grad_clip", "arch_weight_decay",
                     "reg_start", "reg_end", "prune_below", "mode_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"EdgeNESConfig.{name}: expected a number >= 0, got {getattr(self, name)}")
        if not 0.05 <= self.train_portion <= 0.95:
            raise ValueError(f"EdgeNESConfig.train_portion: expected a number in [0.05, 0.95], "
                             f"got {self.train_portion}")
        if not all(0.0 <= b < 1.0 for b in self.arch_betas):
            raise ValueError(
                f"EdgeNESConfig.arch_betas: expected two numbers in [0, 1), got {self.arch_betas}"
            )

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> EdgeNESConfig:
        """The settings among ``job``'s keys (other keys — kind, method, seed, alpha_star, the
        runner's own — are not settings and are left alone)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in job.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["arch_betas"] = list(self.arch_betas)
        return d


def schedule(kind: str, start: float, end: float, progress: float) -> float:
    """The value of a schedule at ``progress`` ∈ [0, 1]: "linear", "exponential" (geometric
    interpolation; needs positive ends) or "constant" (``end`` throughout)."""
    p = min(1.0, max(0.0, progress))
    if kind == "linear":
        return start + p * (end - start)
    if kind == "exponential":
        return start * (end / start) ** p
    if kind == "constant":
        return end
    raise ValueError(f"schedule: expected 'linear', 'exponential' or 'constant', got {kind!r}")


def parse_genotype(value: Any, name: str = "alpha_star") -> Genotype:
    """A Genotype from a Genotype, its JSON, its dict, or DARTS' repr string."""
    if isinstance(value, Genotype):
        return value
    if isinstance(value, dict):
        return Genotype.from_dict(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return Genotype.parse(text) if text.startswith("Genotype(") else Genotype.from_json(text)
        except ValueError as exc:
            raise ValueError(f"{name}: not a genotype ({exc})") from exc
    raise ValueError(f"{name}: expected a genotype (JSON or DARTS repr), got {type(value).__name__}")


@dataclass
class EdgeNESResult:
    """What an EdgeNES search returns (see the module docstring for ``extra``'s contents)."""

    genotype: Genotype
    hypernet: Hypernet
    lambdas: list[float]
    shared_edges: list[int]
    spearman: float | None
    samples: list[dict[str, Any]]
    device_seconds: float
    history: dict[str, list] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    plot_png: bytes = b""

    def to_job_result(self) -> dict[str, Any]:
        """The search job result format of ``nestune.platform.search``."""
        lam_max = self.hypernet.lambda_max
        gaps = [abs(s - lam) for lam, s in zip(self.lambdas, self.shared_edges, strict=True)]
        extra = {
            # Top-level numbers become the trial's metrics in MLflow.
            "spearman": self.spearman,
            "mean_abs_gap": float(np.mean(gaps)),
            "unique_samples": len({s["genotype"] for s in self.samples}),
            "lambda_max": lam_max,
            "lambdas": list(self.lambdas),
            "shared_edges": list(self.shared_edges),
            "samples": [dict(s) for s in self.samples],
            "hypernet": {"kind": self.hypernet.kind, "config": self.hypernet.config()},
            "history": self.history,
            "settings": self.settings,
            "plot_png": base64.b64encode(self.plot_png).decode("ascii"),
        }
        arrays = {f"hypernet.{k}": v.detach().cpu().numpy()
                  for k, v in self.hypernet.state_dict().items()}
        arrays["lambdas"] = np.asarray(self.lambdas, dtype=np.float64)
        arrays["shared_edges"] = np.asarray(self.shared_edges, dtype=np.int64)
        return {
            "genotype": self.genotype.to_json(),
            "device_seconds": float(self.device_seconds),
            "extra": extra,
            "arrays": arrays,
        }


def load_hypernet(extra: dict[str, Any], arrays: dict[str, np.ndarray], space: DartsSpace) -> Hypernet:
    """The trained hypernetwork of a stored EdgeNES search result (its ``extra`` and
    ``arrays``), to derive genotypes at any λ after the fact."""
    spec = extra["hypernet"]
    net = make_hypernet(spec["kind"], space, **spec["config"])
    state = {k[len("hypernet."):]: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()
             if k.startswith("hypernet.")}
    net.load_state_dict(state)
    return net


# ------------------------------------------------------------------------------------ helpers


class _Halves:
    """The train split cut in two seeded halves, streamed as on-device batches: the first
    trains the weights, the second the hypernetwork. Both yield the same number of full
    batches per epoch."""

    def __init__(self, data: DataBundle, batch_size: int, portion: float, seed: int,
                 device: torch.device) -> None:
        n = len(data.train)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        cut = int(round(n * portion))
        halves = (perm[:cut], perm[cut:])
        smallest = min(len(h) for h in halves)
        if smallest < 2:
            raise ValueError(f"edgenes search: the train split ({n} samples) is too small to halve")
        # A batch of 1 breaks batch norm; a tiny split gets a smaller batch, not an error.
        self.batch_size = max(2, min(batch_size, smallest))
        self.steps = smallest // self.batch_size
        self.streams = [
            DeviceBatches(Split(data.train.x[idx], data.train.y[idx]), self.batch_size, shuffle=True,
                          augment=data.augment, device=device, seed=seed * 2 + k + 1, drop_last=True)
            for k, idx in enumerate(halves)
        ]

    def epoch(self):
        it_w, it_a = iter(self.streams[0]), iter(self.streams[1])
        for _ in range(self.steps):
            yield next(it_w), next(it_a)


def _prune(weights: tuple[torch.Tensor, torch.Tensor], below: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    if below <= 0:
        return weights
    # A constant mask: kept weights keep their gradient, dropped ones become exactly 0.
    return tuple(w * (w.detach() >= below) for w in weights)  # type: ignore[return-value]


def _cosine(epoch: int, epochs: int, lr: float, lr_min: float) -> float:
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


def _uniform(n: int, lam_max: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64).float() * lam_max


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(set(y)) < 2 or len(set(x)) < 2:
        return None  # undefined for a constant sequence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = float(spearmanr(x, y).statistic)
    return rho if math.isfinite(rho) else None


def diversity_curve(hypernet: Hypernet, alpha_star: Genotype, lambdas: Sequence[float]
                    ) -> list[int]:
    """Edges that the genotype derived at each λ shares with α*."""
    space = hypernet.space
    return [space.common_edges(alpha_star, derive_at(hypernet, float(lam))) for lam in lambdas]


def plot_shared_edges(lambdas: Sequence[float], shared_edges: Sequence[int], lambda_max: float,
                      samples: Sequence[dict[str, Any]] = (), spearman: float | None = None,
                      title: str = "EdgeNES diversity control") -> bytes:
    """A PNG of the shared edges with α* of the genotype derived at λ, against λ, with the
    ideal line y = λ (and the ensemble's sampled λ, if given)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, lambda_max], [0, lambda_max], "--", color="grey", label="ideal: shared = λ")
    ax.step(lambdas, shared_edges, where="mid", color="C0", alpha=0.5)
    ax.plot(lambdas, shared_edges, "o", color="C0", markersize=4, label="derived at λ (grid)")
    if samples:
        ax.plot([s["lambda"] for s in samples], [s["shared_edges"] for s in samples], "x",
                color="C3", markersize=7, label="ensemble samples")
    ax.set_xlabel("λ (diversity parameter)")
    ax.set_ylabel("edges shared with α*")
    ax.set_xlim(-0.3, lambda_max + 0.3)
    ax.set_ylim(-0.3, lambda_max + 0.3)
    rho = "n/a" if spearman is None else f"{spearman:.3f}"
    ax.set_title(f"{title} (Spearman ρ = {rho})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------------------------ search


def edgenes_search(
    data: DataBundle,
    alpha_star: Genotype | str,
    config: EdgeNESConfig | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    space: DartsSpace | None = None,
    progress: Progress | None = None,
) -> EdgeNESResult:
    """Run the EdgeNES search for ``alpha_star`` on ``data``'s train split.

    Args:
        data: the study's data; only ``data.train`` is read.
        alpha_star: α*, the DARTS search's genotype (a Genotype, its JSON or DARTS repr).
        config: the settings (:class:`EdgeNESConfig` defaults when None).
        seed: seeds the supernet, the hypernetwork, the halving of the train split, the batch
            order, λ and the Gumbel noise.
        device: where the search runs.
        space: the cell space (DARTS' own by default).
        progress: called after every epoch with that epoch's numbers.
    """
    config = config or EdgeNESConfig()
    space = space or DartsSpace()
    alpha_star = space.validate(parse_genotype(alpha_star))
    device = torch.device(device)
    lam_max = float(space.arch_edges)

    start = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    gen = torch.Generator().manual_seed(seed + 7919)  # λ and Gumbel noise
    model = space.supernet(C=config.C, layers=config.layers, num_classes=data.num_classes,
                           in_channels=data.in_channels).to(device)
    # The full space: both cell types run in the supernet, so both halves of α(λ) (and of
    # the count against α*, whose Λ spans both cells) meet L_val.
    if {bool(cell.reduction) for cell in model.cells} != {False, True}:
        raise ValueError(f"edgenes search: a supernet of {config.layers} layers lacks a normal or a "
                         "reduction cell; EdgeNES searches both")
    hyper_kw: dict[str, Any] = (
        {"pivots": config.pivots} if config.hypernet == "piecewise"
        else {"hidden": config.hidden, "layers": config.hidden_layers}
    )
    hyper = make_hypernet(config.hypernet, space, lambda_max=lam_max, **hyper_kw).to(device)
    star = tuple(w.to(device) for w in space.genotype_weights(alpha_star))
    batches = _Halves(data, config.batch_size, config.train_portion, seed, device)
    weights = model.weight_parameters()
    w_opt = torch.optim.SGD(weights, config.lr, momentum=config.momentum,
                            weight_decay=config.weight_decay)
    h_params = list(hyper.parameters())
    h_opt = torch.optim.Adam(h_params, lr=config.arch_lr, betas=config.arch_betas,
                             weight_decay=config.arch_weight_decay)
    use_amp = config.amp and device.type == "cuda"
    grid = [float(x) for x in np.linspace(0.0, lam_max, config.grid_points)]

    history: dict[str, list] = {key: [] for key in (
        "train_loss", "train_acc", "val_loss", "val_acc", "reg", "reg_mode", "reg_weight", "temperature",
        "lr", "epoch_seconds", "spearman", "shared_edges")}
    total_steps = config.epochs * batches.steps
    step = 0
    model.train()
    for epoch in range(config.epochs):
        t_epoch = time.perf_counter()
        lr = _cosine(epoch, config.epochs, config.lr, config.lr_min)
        for group in w_opt.param_groups:
            group["lr"] = lr
        sums = np.zeros(6)
        for (xw, yw), (xa, ya) in batches.epoch():
            p = step / max(1, total_steps - 1)
            temp = schedule(config.temp_schedule, config.temp_start, config.temp_end, p)
            reg_weight = schedule(config.reg_schedule, config.reg_start, config.reg_end, p)

            # 1. hypernetwork: L_val at one λ, the count regulariser at 1 + reg_samples λ.
            lams = _uniform(1 + config.reg_samples, lam_max, gen).to(device)
            arch = hyper(lams)
            relaxed = relax(space, arch, temp, generator=gen)
            reg = ((lams - shared_edges_relaxed(star, relaxed)) ** 2).mean()
            reg_mode = torch.zeros((), device=device)
            if config.mode_weight > 0:
                mode = relax(space, arch, temp, gumbel=False)
                reg_mode = ((lams - shared_edges_relaxed(star, mode)) ** 2).mean()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(xa, _prune((relaxed[0][0], relaxed[1][0]), config.prune_below))
            val_loss = F.cross_entropy(logits.float(), ya)
            objective = val_loss + reg_weight * (reg + config.mode_weight * reg_mode)
            grads = torch.autograd.grad(objective, h_params)
            for prm, g in zip(h_params, grads, strict=True):
                prm.grad = g
            h_opt.step()

            # 2. weights: L_train under a fresh λ's relaxed architecture.
            with torch.no_grad():
                lam_w = _uniform(1, lam_max, gen)[0].item()
                w_relaxed = relax(space, hyper(lam_w), temp, generator=gen)
            w_opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = model(xw, _prune(w_relaxed, config.prune_below))
            train_loss = F.cross_entropy(out.float(), yw)
            train_loss.backward()
            torch.nn.utils.clip_grad_norm_(weights, config.grad_clip)
            w_opt.step()

            sums += (float(train_loss.detach()), float((out.detach().argmax(1) == yw).float().mean()),
                     float(val_loss.detach()), float((logits.detach().argmax(1) == ya).float().mean()),
                     float(reg.detach()), float(reg_mode.detach()))
            step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        means = sums / max(1, batches.steps)
        curve = diversity_curve(hyper, alpha_star, grid)
        rho = _spearman(grid, curve)
        for key, value in zip(("train_loss", "train_acc", "val_loss", "val_acc", "reg", "reg_mode"),
                              means, strict=True):
            history[key].append(float(value))
        history["reg_weight"].append(reg_weight)
        history["temperature"].append(temp)
        history["lr"].append(lr)
        history["epoch_seconds"].append(time.perf_counter() - t_epoch)
        history["spearman"].append(rho)
        history["shared_edges"].append(curve)
        if progress is not None:
            progress({"epoch": epoch + 1, "train_loss": float(means[0]), "train_acc": float(means[1]),
                      "val_loss": float(means[2]), "val_acc": float(means[3]), "reg": float(means[4]),
                      "reg_mode": float(means[5]), "temperature": temp, "reg_weight": reg_weight,
                      "spearman": rho})

    hyper = hyper.cpu()
    curve = diversity_curve(hyper, alpha_star, grid)
    rho = _spearman(grid, curve)
    if config.sampling == "grid":
        sample_lams = [float(x) for x in np.linspace(0.0, lam_max, config.num_samples)]
    else:
        sample_gen = torch.Generator().manual_seed(seed + 104729)
        sample_lams = [float(x) for x in _uniform(config.num_samples, lam_max, sample_gen)]
    samples = []
    for lam in sample_lams:
        genotype = derive_at(hyper, lam)
        samples.append({"lambda": lam, "genotype": genotype.to_json(),
                        "shared_edges": space.common_edges(alpha_star, genotype)})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    png = plot_shared_edges(grid, curve, lam_max, samples, rho)
    return EdgeNESResult(
        genotype=derive_at(hyper, lam_max),
        hypernet=hyper,
        lambdas=grid,
        shared_edges=curve,
        spearman=rho,
        samples=samples,
        device_seconds=seconds,
        history=history,
        settings={**config.to_dict(), "seed": seed, "alpha_star": alpha_star.to_json(),
                  "steps_per_epoch": batches.steps, "batch_size_used": batches.batch_size},
        plot_png=png,
    )


def edgenes_job(job: dict[str, Any], data: DataBundle, device: str | torch.device = "cpu",
                progress: Progress | None = None) -> dict[str, Any]:
    """Run the search job ``{"kind": "search", "method": "edgenes", "alpha_star": <genotype>,
    "seed": int, ...EdgeNESConfig keys, "nodes"/"ops" (the space), "plot_path" (optional,
    absolute)}`` and return its result dict."""
    if "alpha_star" not in job:
        raise ValueError("search job.alpha_star: an edgenes search needs α* (a genotype JSON)")
    seed = job.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"search job.seed: expected an int, got {seed!r}")
    plot_path = job.get("plot_path")
    if plot_path and not Path(plot_path).is_absolute():
        raise ValueError(f"search job.plot_path: expected an absolute path (a trial's working "
                         f"directory is Ray's), got {plot_path!r}")
    result = edgenes_search(data, parse_genotype(job["alpha_star"]), EdgeNESConfig.from_job(job),
                            seed=int(seed), device=device, space=space_from_job(job), progress=progress)
    if plot_path:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        Path(plot_path).write_bytes(result.plot_png)
    return result.to_job_result()


@register_search("edgenes", settings=[f.name for f in dataclasses.fields(EdgeNESConfig)]
                 + ["alpha_star", "plot_path"])
def _edgenes_search_job(job: dict[str, Any], data: DataBundle, device: str) -> dict[str, Any]:
    return edgenes_job(job, data, device)
