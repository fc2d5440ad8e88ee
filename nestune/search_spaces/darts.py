"""The DARTS cell search space (Liu et al. 2018), shared by every strategy in nestune.

A cell has two inputs and ``nodes`` intermediate nodes; node ``i`` may read any of the
``i + 2`` earlier states, so a cell has ``sum(i + 2) = 14`` candidate edges for 4 nodes. A
discrete architecture (``Genotype``) keeps two edges per node with one op each; the supernet
keeps every edge with every op, mixed by architecture weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nestune.search_spaces.genotype import DARTS_V1, DARTS_V2, Genotype
from nestune.search_spaces.ops import (
    OPS,
    PRIMITIVES,
    FactorizedReduce,
    Identity,
    ReLUConvBN,
    drop_path,
)

__all__ = [
    "DARTS_V1",
    "DARTS_V2",
    "PRIMITIVES",
    "DartsSpace",
    "Genotype",
    "Network",
    "Supernet",
    "network",
    "supernet",
]

CELLS = ("normal", "reduce")
STEM_MULTIPLIER = 3


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


class DartsSpace:
    """The DARTS cell space: sampling, NES mutation, edge overlap, and both kinds of network.

    ``ops`` may narrow the candidate operations (``none`` included or not); every genotype
    of the space has ``2 * nodes`` edges per cell and no ``none`` op.
    """

    def __init__(self, nodes: int = 4, ops: Sequence[str] = PRIMITIVES) -> None:
        if not isinstance(nodes, int) or nodes < 1:
            raise ValueError(f"DartsSpace.nodes: expected a positive int, got {nodes!r}")
        unknown = [op for op in ops if op not in OPS]
        if unknown:
            raise ValueError(f"DartsSpace.ops: unknown op(s) {unknown}; known: {list(OPS)}")
        if len(set(ops)) != len(ops):
            raise ValueError(f"DartsSpace.ops: duplicate ops in {list(ops)}")
        self.nodes = nodes
        self.ops: tuple[str, ...] = tuple(ops)
        self.choices: tuple[str, ...] = tuple(op for op in self.ops if op != "none")
        if not self.choices:
            raise ValueError("DartsSpace.ops: need at least one op other than 'none'")
        # Edge e of a cell feeds node edges[e][0] from state edges[e][1], in DARTS' order.
        self.edges: list[tuple[int, int]] = [
            (node, inp) for node in range(nodes) for inp in range(node + 2)
        ]

    def __repr__(self) -> str:
        return f"DartsSpace(nodes={self.nodes}, ops={self.ops})"

    @property
    def num_edges(self) -> int:
        """Candidate edges per cell (14 for 4 nodes)."""
        return len(self.edges)

    @property
    def num_ops(self) -> int:
        return len(self.ops)

    @property
    def arch_edges(self) -> int:
        """Edges of a derived genotype, both cells together: EdgeNES' Λ (16 for 4 nodes)."""
        return 2 * 2 * self.nodes

    def edge_index(self, node: int, inp: int) -> int:
        """Row of edge ``inp -> node`` in a (num_edges, num_ops) weight tensor."""
        if not 0 <= node < self.nodes or not 0 <= inp < node + 2:
            raise ValueError(f"edge_index: no edge from input {inp} to node {node}")
        return node * (node + 3) // 2 + inp

    # -- discrete genotypes ---------------------------------------------------------------

    def validate(self, genotype: Genotype) -> Genotype:
        """Return ``genotype`` if it belongs to this space; else raise ``ValueError`` naming
        the bad field."""
        if not isinstance(genotype, Genotype):
            raise ValueError(f"genotype: expected a Genotype, got {type(genotype).__name__}")
        for cell in CELLS:
            pairs = genotype.cell(cell)
            if len(pairs) != 2 * self.nodes:
                raise ValueError(
                    f"Genotype.{cell}: expected {2 * self.nodes} (op, input) pairs "
                    f"(two per node, {self.nodes} nodes), got {len(pairs)}"
                )
            for k, (op, inp) in enumerate(pairs):
                node = k // 2
                if op not in self.choices:
                    raise ValueError(
                        f"Genotype.{cell}[{k}]: unknown op {op!r}; expected one of "
                        f"{list(self.choices)}"
                    )
                if not 0 <= inp < node + 2:
                    raise ValueError(
                        f"Genotype.{cell}[{k}]: input {inp} out of range for node {node}; "
                        f"expected 0..{node + 1}"
                    )
            for node in range(self.nodes):
                if pairs[2 * node][1] == pairs[2 * node + 1][1]:
                    raise ValueError(
                        f"Genotype.{cell}: node {node} reads input {pairs[2 * node][1]} twice; "
                        "expected two distinct inputs"
                    )
            concat = genotype.normal_concat if cell == "normal" else genotype.reduce_concat
            expected = tuple(range(2, self.nodes + 2))
            if concat != expected:
                raise ValueError(
                    f"Genotype.{cell}_concat: expected {list(expected)}, got {list(concat)}"
                )
        return genotype

    def sample(self, rng: np.random.Generator | int | None = None) -> Genotype:
        """A genotype drawn uniformly: two distinct inputs per node, ops never ``none``."""
        rng = _rng(rng)
        cells = {}
        for cell in CELLS:
            pairs = []
            for node in range(self.nodes):
                inputs = rng.choice(node + 2, size=2, replace=False)
                for inp in inputs:
                    pairs.append((self.choices[rng.integers(len(self.choices))], int(inp)))
            cells[cell] = pairs
        return Genotype(normal=cells["normal"], reduce=cells["reduce"],
                        normal_concat=range(2, self.nodes + 2),
                        reduce_concat=range(2, self.nodes + 2))

    def mutate(self, genotype: Genotype, rng: np.random.Generator | int | None = None) -> Genotype:
        """The NES mutation (Zaidi et al. 2021): in the normal or the reduce cell, either change
        one edge's op or move one edge's input to another valid earlier state.

        The child is valid and always differs from its parent. A mutation kind with no
        possible change (one op only; a single node whose inputs are fixed) falls back to the
        other kind.
        """
        self.validate(genotype)
        rng = _rng(rng)
        cell = CELLS[rng.integers(2)]
        pairs = list(genotype.cell(cell))
        kinds = []
        if len(self.choices) > 1:
            kinds.append("op")
        # Node i has i + 2 candidate inputs and uses 2, so only nodes >= 1 can move an input.
        movable = [k for k in range(len(pairs)) if k // 2 >= 1]
        if movable:
            kinds.append("input")
        if not kinds:
            raise ValueError(f"{self!r} has a single genotype: nothing to mutate")
        kind = kinds[rng.integers(len(kinds))]
        if kind == "op":
            k = int(rng.integers(len(pairs)))
            op, inp = pairs[k]
            new_ops = [o for o in self.choices if o != op]
            pairs[k] = (new_ops[rng.integers(len(new_ops))], inp)
        else:
            k = movable[rng.integers(len(movable))]
            op, inp = pairs[k]
            sibling = pairs[k ^ 1][1]
            targets = [j for j in range(k // 2 + 2) if j not in (inp, sibling)]
            pairs[k] = (op, targets[rng.integers(len(targets))])
        if cell == "normal":
            return Genotype(pairs, genotype.reduce, genotype.normal_concat, genotype.reduce_concat)
        return Genotype(genotype.normal, pairs, genotype.normal_concat, genotype.reduce_concat)

    def common_edges(self, a: Genotype, b: Genotype) -> int:
        """How many (cell, node, input, op) edges the two genotypes share."""
        return len(a.edges() & b.edges())

    def genotype_weights(self, genotype: Genotype) -> tuple[torch.Tensor, torch.Tensor]:
        """The genotype as one-hot architecture weights, (num_edges, num_ops) per cell: the
        relaxed α* that ``common_edges`` counts against."""
        self.validate(genotype)
        out = []
        for cell in CELLS:
            w = torch.zeros(self.num_edges, self.num_ops)
            for k, (op, inp) in enumerate(genotype.cell(cell)):
                w[self.edge_index(k // 2, inp), self.ops.index(op)] = 1.0
            out.append(w)
        return out[0], out[1]

    # -- networks -------------------------------------------------------------------------

    def network(
        self,
        genotype: Genotype,
        C: int = 16,
        layers: int = 8,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_path: float = 0.0,
    ) -> Network:
        """The DARTS evaluation network for ``genotype``."""
        return Network(self.validate(genotype), C, layers, num_classes, in_channels, drop_path)

    def supernet(
        self, C: int = 8, layers: int = 5, num_classes: int = 10, in_channels: int = 3
    ) -> Supernet:
        """The one-shot network of this space, every edge a mixed op."""
        return Supernet(self, C, layers, num_classes, in_channels)

    def derive(self, w_normal: torch.Tensor, w_reduce: torch.Tensor) -> Genotype:
        """DARTS' discretisation: for each node, the two incoming edges whose strongest
        non-``none`` weight is largest, each with its argmax non-``none`` op."""
        cells = []
        for w in (w_normal, w_reduce):
            w = w.detach().float().cpu()
            if w.shape != (self.num_edges, self.num_ops):
                raise ValueError(
                    f"derive: expected weights of shape {(self.num_edges, self.num_ops)}, "
                    f"got {tuple(w.shape)}"
                )
            if "none" in self.ops:
                w = w.clone()
                w[:, self.ops.index("none")] = -float("inf")
            pairs = []
            for node in range(self.nodes):
                rows = [self.edge_index(node, j) for j in range(node + 2)]
                strength = w[rows].max(dim=1).values
                # A stable sort keeps the lower input first on ties, so derive is deterministic.
                order = sorted(range(node + 2), key=lambda j: -float(strength[j]))[:2]
                for j in order:
                    pairs.append((self.ops[int(w[rows[j]].argmax())], j))
            cells.append(pairs)
        concat = range(2, self.nodes + 2)
        return Genotype(cells[0], cells[1], concat, concat)


def network(
    genotype: Genotype,
    C: int = 16,
    layers: int = 8,
    num_classes: int = 10,
    in_channels: int = 3,
    drop_path: float = 0.0,
) -> Network:
    """The DARTS evaluation network for ``genotype`` in the default 4-node space
    (``DartsSpace().network``); ``genotype`` may use any op of :data:`PRIMITIVES` but ``none``."""
    return DartsSpace().network(genotype, C, layers, num_classes, in_channels, drop_path)


def supernet(
    C: int = 8,
    layers: int = 5,
    num_classes: int = 10,
    in_channels: int = 3,
    ops: Sequence[str] = PRIMITIVES,
    nodes: int = 4,
) -> Supernet:
    """The one-shot network over ``ops`` (``DartsSpace(nodes, ops).supernet``); its ``space``
    attribute is the space that ``derive()`` returns genotypes of."""
    return DartsSpace(nodes=nodes, ops=ops).supernet(C, layers, num_classes, in_channels)


def _check_sizes(C: int, layers: int, num_classes: int, in_channels: int) -> None:
    for name, value, low in (("C", C, 2), ("layers", layers, 1), ("num_classes", num_classes, 2),
                             ("in_channels", in_channels, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if C % 2:
        raise ValueError(f"C: expected an even number of channels, got {C}")


def _reduction_layers(layers: int) -> set[int]:
    # DARTS reduces at 1/3 and 2/3 of the depth; with fewer than 3 layers the set just
    # has one or two entries.
    return {layers // 3, 2 * layers // 3}


class _Stem(nn.Sequential):
    def __init__(self, in_channels: int, C_out: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, C_out, 3, padding=1, bias=False), nn.BatchNorm2d(C_out)
        )


class Cell(nn.Module):
    """An evaluation cell built from a genotype."""

    def __init__(self, genotype: Genotype, C_pp: int, C_p: int, C: int, reduction: bool,
                 reduction_prev: bool) -> None:
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = FactorizedReduce(C_pp, C) if reduction_prev else ReLUConvBN(C_pp, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0)
        pairs = genotype.reduce if reduction else genotype.normal
        self.concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self.inputs = [inp for _, inp in pairs]
        self._ops = nn.ModuleList(
            OPS[op](C, 2 if reduction and inp < 2 else 1, True) for op, inp in pairs
        )
        self.multiplier = len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(len(self._ops) // 2):
            total = 0
            for k in (2 * node, 2 * node + 1):
                h = self._ops[k](states[self.inputs[k]])
                if self.training and drop_prob > 0 and not isinstance(self._ops[k], Identity):
                    h = drop_path(h, drop_prob)
                total = total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class Network(nn.Module):
    """The DARTS evaluation network: stem, cells (reduction at 1/3 and 2/3 of the depth),
    global average pooling, linear classifier."""

    def __init__(self, genotype: Genotype, C: int, layers: int, num_classes: int,
                 in_channels: int, drop_path: float = 0.0) -> None:
        super().__init__()
        _check_sizes(C, layers, num_classes, in_channels)
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path: expected a probability in [0, 1), got {drop_path}")
        self.genotype = genotype
        self.drop_path = drop_path
        C_curr = STEM_MULTIPLIER * C
        self.stem = _Stem(in_channels, C_curr)
        C_pp, C_p, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        reductions = _reduction_layers(layers)
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                C_curr *= 2
            cell = Cell(genotype, C_pp, C_p, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_p = C_p, cell.multiplier * C_curr
        self.classifier = nn.Linear(C_p, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, self.drop_path)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))


class MixedOp(nn.Module):
    """Every op of the space on one edge; the output is the weighted sum of their outputs."""

    def __init__(self, C: int, stride: int, ops: Sequence[str]) -> None:
        super().__init__()
        self.is_zero = [op == "none" for op in ops]
        mods = []
        for op in ops:
            mod = OPS[op](C, stride, False)
            if "pool" in op:
                # DARTS puts an affine-free BN after pooling so its scale matches the convs.
                mod = nn.Sequential(mod, nn.BatchNorm2d(C, affine=False))
            mods.append(mod)
        self._ops = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, active: Sequence[bool]) -> torch.Tensor | None:
        out = None
        for i, op in enumerate(self._ops):
            # `none` contributes zero whatever its weight, and an op with weight exactly zero
            # contributes nothing either: neither is computed.
            if not active[i] or self.is_zero[i]:
                continue
            h = weights[i] * op(x)
            out = h if out is None else out + h
        return out


class SearchCell(nn.Module):
    """A supernet cell: every candidate edge is a MixedOp over all ops."""

    def __init__(self, space: DartsSpace, C_pp: int, C_p: int, C: int, reduction: bool,
                 reduction_prev: bool) -> None:
        super().__init__()
        self.space = space
        self.reduction = reduction
        self.preprocess0 = (FactorizedReduce(C_pp, C, affine=False) if reduction_prev
                            else ReLUConvBN(C_pp, C, 1, 1, 0, affine=False))
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0, affine=False)
        self._ops = nn.ModuleList(
            MixedOp(C, 2 if reduction and inp < 2 else 1, space.ops) for _, inp in space.edges
        )
        self.multiplier = space.nodes

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                active: list[list[bool]]) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        e = 0
        for _node in range(self.space.nodes):
            total = None
            for j in range(len(states)):
                h = self._ops[e](states[j], weights[e], active[e])
                if h is not None:
                    total = h if total is None else total + h
                e += 1
            if total is None:
                # Every incoming op is off: the node is zero, at the cell's output size.
                ref = states[1]
                if self.reduction:
                    shape = (ref.shape[0], ref.shape[1], (ref.shape[2] + 1) // 2,
                             (ref.shape[3] + 1) // 2)
                    total = ref.new_zeros(shape)
                else:
                    total = torch.zeros_like(ref)
            states.append(total)
        return torch.cat(states[-self.multiplier:], dim=1)


class Supernet(nn.Module):
    """The DARTS one-shot network (``model_search.py``): every edge mixes every op.

    Architecture parameters are shared by all cells of a type: ``alpha_normal`` and
    ``alpha_reduce``, each (num_edges, num_ops). How op outputs are weighted is the caller's
    choice: ``forward(x)`` uses DARTS' softmax of the alphas, ``forward(x, weights)`` uses the
    given (normal, reduce) weights from anything else (XNAS' experts, EdgeNES'
    hypernetwork). Gradients flow to the weights given, so their source trains through them.
    """

    def __init__(self, space: DartsSpace, C: int, layers: int, num_classes: int,
                 in_channels: int) -> None:
        super().__init__()
        _check_sizes(C, layers, num_classes, in_channels)
        self.space = space
        C_curr = STEM_MULTIPLIER * C
        self.stem = _Stem(in_channels, C_curr)
        C_pp, C_p, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        reductions = _reduction_layers(layers)
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                C_curr *= 2
            cell = SearchCell(space, C_pp, C_p, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_p = C_p, cell.multiplier * C_curr
        self.classifier = nn.Linear(C_p, num_classes)
        shape = (space.num_edges, space.num_ops)
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(shape))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(shape))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha_normal, self.alpha_reduce]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def default_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """DARTS' op weights: a softmax over each edge's ops."""
        return F.softmax(self.alpha_normal, dim=-1), F.softmax(self.alpha_reduce, dim=-1)

    def forward(self, x: torch.Tensor,
                weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        w_normal, w_reduce = self.default_weights() if weights is None else weights
        expected = (self.space.num_edges, self.space.num_ops)
        for name, w in (("normal", w_normal), ("reduce", w_reduce)):
            if tuple(w.shape) != expected:
                raise ValueError(f"weights[{name}]: expected shape {expected}, got {tuple(w.shape)}")
        # One host transfer per forward tells which ops are off (weight exactly zero).
        active_normal = (w_normal.detach() != 0).tolist()
        active_reduce = (w_reduce.detach() != 0).tolist()
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            if cell.reduction:
                s0, s1 = s1, cell(s0, s1, w_reduce, active_reduce)
            else:
                s0, s1 = s1, cell(s0, s1, w_normal, active_normal)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))

    def derive(self, weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> Genotype:
        """The discrete genotype of the current (or given) architecture weights."""
        w_normal, w_reduce = self.default_weights() if weights is None else weights
        return self.space.derive(w_normal, w_reduce)
