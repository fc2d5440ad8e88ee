"""EdgeNES' hypernetwork α(λ; a) and the relaxed count of edges shared with α*.

A hypernetwork maps the diversity parameter λ ∈ [0, Λ] (Λ = ``space.arch_edges``, the edges of
a derived genotype, both cells) to architecture logits ``(w_normal, w_reduce)``, each
``(num_edges, num_ops)`` — the same layout as a supernet's ``alpha_normal``/``alpha_reduce``,
so ``DartsSpace.derive(softmax(w_normal), softmax(w_reduce))`` is the genotype at λ, exactly as
DARTS derives its own alphas.

Two hypernetworks:

- :class:`PiecewiseLinearHypernet` (default): K pivot sets of logits at fixed, evenly spaced
  λ_0 = 0 < λ_1 < ... < λ_{K-1} = Λ; between neighbours, α(λ) = (1 - w)·a_k + w·a_{k+1} with
  w = (λ - λ_k)/(λ_{k+1} - λ_k), so the weight of a pivot grows as λ approaches it and α is
  continuous everywhere (the public reference code swaps the two weights, which makes α jump at
  every pivot). The pivot sets are ``nn.Parameter``s and train (the reference wraps them in new
  tensors, so they never do). Pivot positions stay fixed: trainable positions would need an
  ordering constraint and add nothing a finer K does not.
- :class:`MLPHypernet`: a small MLP of λ/Λ, continuous by construction.

The relaxation (:func:`relax`) turns logits into a relaxed architecture: per cell a
``(num_edges, num_ops)`` tensor ``W = q[:, None] * G``, which is both what the supernet is run
with (``Supernet.forward(x, weights=W)``) and what the shared-edge count is taken against:
``⟨α*, W⟩ = Σ α* ⊙ W`` (:func:`shared_edges_relaxed`). Its two factors:

- ``G`` — the op choice of each edge: a Gumbel-softmax at temperature t over the edge's
  *non-none* ops (``none`` gets weight 0, so it is not even computed). A derived genotype never
  holds ``none``, so an op distribution that gave ``none`` mass would undercount edges that
  ``derive`` keeps.
- ``q`` — the edge selection: a derived genotype keeps 2 of the i + 2 incoming edges of node i,
  so an op distribution alone would count every candidate edge and let the count miss edges
  that ``derive`` drops. Each edge gets a strength score ``s = max over non-none ops of
  log_softmax(logits)`` (the log of the very strength DARTS' ``derive`` ranks edges by; the
  ``none`` logit only lowers it, as in DARTS); per node the scores get Gumbel noise and a
  softmax at temperature t, p = softmax((s + g)/t), and ``q_j`` is the probability that j is
  among 2 inputs drawn from p without replacement:
  q_j = p_j + Σ_{i≠j} p_i p_j / (1 - p_i). Then Σ_j q_j = 2 exactly, 0 ≤ q_j ≤ 1, and a node
  with only 2 inputs has q = 1 on both. As t → 0 this is Gumbel-top-2 (a sample of 2 inputs
  without replacement from softmax(s)), and without noise it is the top-2 ``derive`` keeps.

So each of the Λ edges of α* contributes q_e·G_e(op*) ∈ [0, 1] and the relaxed count lies in
[0, Λ]; for one-hot genotype weights it *is* ``common_edges``, and its zero-temperature,
noise-free limit is ``common_edges(α*, derive(softmax(logits)))``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nestune.search_spaces.darts import DartsSpace
from nestune.search_spaces.genotype import Genotype

__all__ = [
    "HYPERNETS",
    "Hypernet",
    "MLPHypernet",
    "PiecewiseLinearHypernet",
    "derive_at",
    "make_hypernet",
    "relax",
    "relax_cell",
    "shared_edges_relaxed",
]


class Hypernet(nn.Module):
    """λ ↦ architecture logits ``(w_normal, w_reduce)``, each ``(num_edges, num_ops)``.

    ``forward(lam)`` takes a float / 0-d tensor (one architecture) or a 1-d tensor of B values
    (a batch: each output gets a leading dimension B). λ must lie in [0, lambda_max].
    """

    kind: str = ""

    def __init__(self, space: DartsSpace, lambda_max: float | None = None) -> None:
        super().__init__()
        self.space = space
        self.lambda_max = float(space.arch_edges if lambda_max is None else lambda_max)
        if not self.lambda_max > 0:
            raise ValueError(f"lambda_max: expected a positive number, got {lambda_max!r}")
        self.shape = (2, space.num_edges, space.num_ops)

    def _lambda(self, lam: float | torch.Tensor) -> torch.Tensor:
        ref = next(self.parameters())
        lam_t = torch.as_tensor(lam, dtype=ref.dtype, device=ref.device)
        if lam_t.ndim > 1:
            raise ValueError(f"lam: expected a number or a 1-d tensor, got shape {tuple(lam_t.shape)}")
        # A little slack for float round-off at the ends of the range (λ = Λ from a grid).
        tol = 1e-6 * self.lambda_max
        if bool(((lam_t < -tol) | (lam_t > self.lambda_max + tol)).any()):
            raise ValueError(f"lam: expected values in [0, {self.lambda_max:g}], got {lam_t.tolist()}")
        return lam_t.clamp(0.0, self.lambda_max)

    def _logits(self, lam: torch.Tensor) -> torch.Tensor:
        """(B, 2, num_edges, num_ops) logits for a 1-d λ batch."""
        raise NotImplementedError

    def forward(self, lam: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam_t = self._lambda(lam)
        out = self._logits(lam_t.reshape(-1))
        if lam_t.ndim == 0:
            out = out[0]
            return out[0], out[1]
        return out[:, 0], out[:, 1]

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able), so that ``make_hypernet(kind, space, **config)``
        rebuilds this hypernetwork for :meth:`load_state_dict`."""
        return {"lambda_max": self.lambda_max}

    def export(self) -> dict[str, Any]:
        """Kind, config and parameters as plain lists: a JSON-able snapshot."""
        return {
            "kind": self.kind,
            "config": self.config(),
            "state": {k: v.detach().cpu().tolist() for k, v in self.state_dict().items()},
        }

    @classmethod
    def from_export(cls, snapshot: dict[str, Any], space: DartsSpace) -> Hypernet:
        """Rebuild a hypernetwork from :meth:`export`'s snapshot."""
        net = make_hypernet(snapshot["kind"], space, **snapshot["config"])
        net.load_state_dict({k: torch.tensor(v) for k, v in snapshot["state"].items()})
        return net


class PiecewiseLinearHypernet(Hypernet):
    """α(λ) linear between K pivot sets of logits at evenly spaced λ_k, λ_0 = 0, λ_{K-1} = Λ.

    ``init_scale``: pivots start as ``init_scale * randn`` (DARTS initialises its alphas at
    1e-3 · randn: nearly uniform op and edge choices).
    """

    kind = "piecewise"

    def __init__(self, space: DartsSpace, pivots: int = 5, lambda_max: float | None = None,
                 init_scale: float = 1e-3) -> None:
        super().__init__(space, lambda_max)
        if isinstance(pivots, bool) or not isinstance(pivots, int) or pivots < 2:
            raise ValueError(f"pivots: expected an int >= 2 (one at each end of the λ range), got {pivots!r}")
        self.num_pivots = pivots
        self.init_scale = float(init_scale)
        self.register_buffer("positions", torch.linspace(0.0, self.lambda_max, pivots))
        self.pivots = nn.Parameter(self.init_scale * torch.randn(pivots, *self.shape))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "pivots": self.num_pivots, "init_scale": self.init_scale}

    def segment(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each λ: the index k of its segment [λ_k, λ_{k+1}] and the weight w of the right
        pivot, (λ - λ_k) / (λ_{k+1} - λ_k)."""
        pos = self.positions
        k = (torch.searchsorted(pos, lam.detach(), right=True) - 1).clamp(0, self.num_pivots - 2)
        w = (lam - pos[k]) / (pos[k + 1] - pos[k])
        return k, w

    def _logits(self, lam: torch.Tensor) -> torch.Tensor:
        k, w = self.segment(lam)
        w = w.view(-1, 1, 1, 1)
        return (1.0 - w) * self.pivots[k] + w * self.pivots[k + 1]


class MLPHypernet(Hypernet):
    """α(λ) = MLP(λ / Λ): ``layers`` hidden layers of ``hidden`` units with tanh, then a linear
    map to both cells' logits (its last layer starts small, so α starts near uniform)."""

    kind = "mlp"

    def __init__(self, space: DartsSpace, hidden: int = 64, layers: int = 2,
                 lambda_max: float | None = None) -> None:
        super().__init__(space, lambda_max)
        for name, value in (("hidden", hidden), ("layers", layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.hidden, self.layers = hidden, layers
        mods: list[nn.Module] = []
        width = 1
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        out = nn.Linear(width, math.prod(self.shape))
        nn.init.normal_(out.weight, std=1e-3)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*mods, out)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "hidden": self.hidden, "layers": self.layers}

    def _logits(self, lam: torch.Tensor) -> torch.Tensor:
        return self.net((lam / self.lambda_max).unsqueeze(-1)).view(-1, *self.shape)


HYPERNETS: dict[str, type[Hypernet]] = {
    PiecewiseLinearHypernet.kind: PiecewiseLinearHypernet,
    MLPHypernet.kind: MLPHypernet,
}


def make_hypernet(kind: str, space: DartsSpace, **config: Any) -> Hypernet:
    """The hypernetwork of ``kind`` ("piecewise" or "mlp") for ``space``."""
    if kind not in HYPERNETS:
        raise ValueError(f"hypernet: unknown kind {kind!r}; expected one of {sorted(HYPERNETS)}")
    return HYPERNETS[kind](space, **config)


# -- relaxation -----------------------------------------------------------------------------


def _gumbel(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # A seeded generator is a CPU one (the same numbers on every device); the noise is tiny.
    if generator is not None:
        u = torch.rand(shape, generator=generator, dtype=like.dtype).to(like.device)
    else:
        u = torch.rand(shape, dtype=like.dtype, device=like.device)
    # Clamped away from 0 and 1 so that -log(-log(u)) stays finite.
    u = u.clamp(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


# The score of an absent candidate: finite, so no -inf - -inf makes a NaN gradient, and low
# enough that its probability is exactly 0 in float32.
_ABSENT = -1e9


def _inclusion_top2(scores: torch.Tensor) -> torch.Tensor:
    """q_j = P(j among 2 draws without replacement from softmax(scores)), over the last dim.

    Entries of ``_ABSENT`` are absent candidates (q = 0), so nodes with different numbers of
    inputs share one padded tensor. Computed in log space: log(p_i p_j / (1 - p_i)) =
    l_i + l_j - log Σ_{k≠i} p_k, which stays finite as p_i → 1 (low temperature), where
    1 - p_i would cancel.
    """
    n = scores.shape[-1]
    log_p = F.log_softmax(scores, dim=-1)
    eye = torch.eye(n, dtype=torch.bool, device=scores.device)
    others = log_p.unsqueeze(-2).expand(*log_p.shape[:-1], n, n).masked_fill(eye, -math.inf)
    log_rest = torch.logsumexp(others, dim=-1)  # log(1 - p_i), shape (..., n)
    pair = log_p.unsqueeze(-1) + log_p.unsqueeze(-2) - log_rest.unsqueeze(-1)  # [.., i, j]
    pair = pair.masked_fill(eye, -math.inf)
    return log_p.exp() + torch.logsumexp(pair, dim=-2).exp()


def _node_layout(space: DartsSpace) -> tuple[list[int], list[int]]:
    """Flat indices mapping the (num_edges,) edge axis to a padded (nodes, nodes + 1) grid:
    ``rows[e]`` is where edge e sits in the flattened grid; ``grid[c]`` is the edge at grid
    cell c, or ``num_edges`` (the absent-candidate pad) where node c // (nodes + 1) has fewer inputs."""
    width = space.nodes + 1
    grid = [space.num_edges] * (space.nodes * width)
    rows = []
    for e, (node, inp) in enumerate(space.edges):
        grid[node * width + inp] = e
        rows.append(node * width + inp)
    return rows, grid


def _edge_selection(space: DartsSpace, scores: torch.Tensor) -> torch.Tensor:
    """Per node, the top-2 inclusion probabilities of its incoming edges' ``scores``
    (..., num_edges), all nodes at once."""
    rows, grid = _node_layout(space)
    pad = scores.new_full((*scores.shape[:-1], 1), _ABSENT)
    padded = torch.cat([scores, pad], dim=-1)[..., torch.tensor(grid, device=scores.device)]
    padded = padded.view(*scores.shape[:-1], space.nodes, space.nodes + 1)
    q = _inclusion_top2(padded).flatten(-2)
    return q[..., torch.tensor(rows, device=scores.device)]


def relax_cell(space: DartsSpace, logits: torch.Tensor, temperature: float, *, gumbel: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One cell's relaxed architecture ``W = q[:, None] * G`` from its logits
    ``(..., num_edges, num_ops)`` (see the module docstring); same shape as ``logits``."""
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    if tuple(logits.shape[-2:]) != (space.num_edges, space.num_ops):
        raise ValueError(
            f"logits: expected shape (..., {space.num_edges}, {space.num_ops}), got {tuple(logits.shape)}"
        )
    choice = torch.tensor([op != "none" for op in space.ops], device=logits.device)
    log_p = F.log_softmax(logits, dim=-1)
    # Edge strength: derive's ranking score, log of the best non-none op probability.
    strength = log_p.masked_fill(~choice, -math.inf).amax(dim=-1)
    op_scores = logits.masked_fill(~choice, -math.inf)
    if gumbel:
        op_scores = op_scores + _gumbel(logits.shape, logits, generator)
        strength = strength + _gumbel(strength.shape, strength, generator)
    G = F.softmax(op_scores / temperature, dim=-1)  # exactly 0 on `none`
    q = _edge_selection(space, strength / temperature)
    return q.unsqueeze(-1) * G


def relax(space: DartsSpace, logits: tuple[torch.Tensor, torch.Tensor], temperature: float, *,
          gumbel: bool = True, generator: torch.Generator | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both cells' relaxed architectures: the ``weights`` for ``Supernet.forward``."""
    return (relax_cell(space, logits[0], temperature, gumbel=gumbel, generator=generator),
            relax_cell(space, logits[1], temperature, gumbel=gumbel, generator=generator))


def shared_edges_relaxed(alpha_star: tuple[torch.Tensor, torch.Tensor],
                         weights: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """⟨α*, W⟩: the relaxed number of (cell, node, input, op) edges W shares with α*.

    ``alpha_star`` is ``DartsSpace.genotype_weights(α*)``; ``weights`` come from :func:`relax`
    (or are another genotype's one-hot weights, where the result is ``common_edges``). Leading
    batch dimensions of ``weights`` are kept.
    """
    (a_normal, a_reduce), (w_normal, w_reduce) = alpha_star, weights
    return (a_normal.to(w_normal) * w_normal).sum(dim=(-2, -1)) + (
        a_reduce.to(w_reduce) * w_reduce
    ).sum(dim=(-2, -1))


@torch.no_grad()
def derive_at(hypernet: Hypernet, lam: float) -> Genotype:
    """The genotype at λ: DARTS' ``derive`` of the softmax of α(λ)."""
    w_normal, w_reduce = hypernet(lam)
    return hypernet.space.derive(F.softmax(w_normal, dim=-1), F.softmax(w_reduce, dim=-1))
