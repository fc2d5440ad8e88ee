"""The hypernetwork and the relaxed shared-edge count: continuity in λ, gradients that reach
(and move) the pivots, and a relaxation that agrees with ``common_edges`` and ``derive``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nestune.edgenes.hypernet import (
    Hypernet,
    MLPHypernet,
    PiecewiseLinearHypernet,
    derive_at,
    make_hypernet,
    relax,
    relax_cell,
    shared_edges_relaxed,
)
from nestune.search_spaces.darts import DARTS_V2, DartsSpace
from nestune.search_spaces.genotype import Genotype

SPACE = DartsSpace()
LAM = float(SPACE.arch_edges)


def _random_pivots(net: PiecewiseLinearHypernet, seed: int = 0) -> None:
    # Far from the near-uniform init, so a jump at a pivot would be large.
    with torch.no_grad():
        net.pivots.copy_(torch.randn(net.pivots.shape, generator=torch.Generator().manual_seed(seed)) * 3)


def test_piecewise_hits_its_pivots_and_interpolates_towards_the_nearer_one() -> None:
    torch.manual_seed(0)
    net = PiecewiseLinearHypernet(SPACE, pivots=5)
    _random_pivots(net)
    assert net.positions.tolist() == pytest.approx([0.0, 4.0, 8.0, 12.0, 16.0])
    for k, lam in enumerate(net.positions.tolist()):
        w_normal, w_reduce = net(lam)
        assert torch.allclose(w_normal, net.pivots[k, 0])
        assert torch.allclose(w_reduce, net.pivots[k, 1])
    # A quarter of the way from pivot 1 (λ=4) to pivot 2 (λ=8): 3/4 of pivot 1, 1/4 of pivot 2.
    w_normal, _ = net(5.0)
    assert torch.allclose(w_normal, 0.75 * net.pivots[1, 0] + 0.25 * net.pivots[2, 0], atol=1e-6)


def _max_step(net: Hypernet, lams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        w_normal, w_reduce = net(lams)
    out = torch.cat([w_normal.flatten(1), w_reduce.flatten(1)], dim=1)
    return (out[1:] - out[:-1]).abs().max(dim=1).values, out


@pytest.mark.parametrize("kind", ["piecewise", "mlp"])
def test_alpha_is_continuous_in_lambda_everywhere(kind: str) -> None:
    torch.manual_seed(0)
    net = make_hypernet(kind, SPACE)
    if isinstance(net, PiecewiseLinearHypernet):
        _random_pivots(net)
    else:
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 1)
    # Continuity on a dense grid: refining the grid 10x shrinks the largest change between
    # neighbours about 10x; a jump anywhere would not shrink.
    coarse, out = _max_step(net, torch.linspace(0.0, LAM, 1601))
    fine, _ = _max_step(net, torch.linspace(0.0, LAM, 16001))
    assert fine.max() < 0.15 * coarse.max()
    # The batched call agrees with single calls.
    for i in (0, 400, 1000, 1600):
        assert torch.allclose(net(float(LAM * i / 1600))[0].flatten(), out[i, : 14 * 8], atol=1e-5)


def test_piecewise_has_no_jump_at_its_pivots() -> None:
    torch.manual_seed(0)
    net = PiecewiseLinearHypernet(SPACE, pivots=5)
    _random_pivots(net)
    with torch.no_grad():
        slope = ((net.pivots[1:] - net.pivots[:-1]).abs().max() / (LAM / 4)).item()
    for pivot in (4.0, 8.0, 12.0):
        for eps in (1e-2, 1e-4):
            steps, _ = _max_step(net, torch.tensor([pivot - eps, pivot, pivot + eps]))
            # Within eps of a pivot, α moves at most slope * eps (a swapped weight would jump
            # by the whole difference between neighbouring pivots).
            assert steps.max().item() <= slope * eps * 1.01 + 1e-5


def test_lambda_outside_the_range_is_a_value_error() -> None:
    net = PiecewiseLinearHypernet(SPACE)
    with pytest.raises(ValueError, match="lam"):
        net(-0.5)
    with pytest.raises(ValueError, match="lam"):
        net(LAM + 1)
    with pytest.raises(ValueError, match="pivots"):
        PiecewiseLinearHypernet(SPACE, pivots=1)
    with pytest.raises(ValueError, match="hypernet"):
        make_hypernet("spline", SPACE)


def test_gradients_reach_exactly_the_pivots_that_lambda_touches() -> None:
    torch.manual_seed(0)
    net = PiecewiseLinearHypernet(SPACE, pivots=5)
    alpha_star = SPACE.genotype_weights(SPACE.sample(0))
    lams = [1.3, 9.7]  # segments [0, 4] and [8, 12]
    loss = torch.zeros(())
    for lam in lams:
        weights = relax(SPACE, net(lam), temperature=0.5, generator=torch.Generator().manual_seed(1))
        loss = loss + (lam - shared_edges_relaxed(alpha_star, weights)) ** 2
    loss.backward()
    grad = net.pivots.grad
    norms = grad.flatten(1).norm(dim=1)
    touched = {0, 1, 2, 3}
    for k in range(5):
        if k in touched:
            assert norms[k] > 0, f"pivot {k} got no gradient"
        else:
            assert norms[k] == 0, f"pivot {k} is not touched by λ in {lams} but got a gradient"


@pytest.mark.parametrize("kind", ["piecewise", "mlp"])
def test_an_optimiser_step_moves_the_hypernetwork_towards_its_target(kind: str) -> None:
    torch.manual_seed(0)
    net = make_hypernet(kind, SPACE)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    alpha_star = SPACE.genotype_weights(SPACE.sample(0))
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)

    def objective() -> torch.Tensor:
        lams = torch.tensor([0.0, 2.0, 6.0, 10.0, 14.0, 16.0])
        weights = relax(SPACE, net(lams), temperature=1.0, gumbel=False)
        return ((lams - shared_edges_relaxed(alpha_star, weights)) ** 2).mean()

    start = objective().item()
    for _ in range(60):
        opt.zero_grad()
        lam = float(torch.rand((), generator=gen) * LAM)
        weights = relax(SPACE, net(lam), temperature=1.0, generator=gen)
        ((lam - shared_edges_relaxed(alpha_star, weights)) ** 2).backward()
        opt.step()
    after = net.state_dict()
    for name, value in before.items():
        if name == "positions":
            assert torch.equal(after[name], value)  # fixed pivot positions
        else:
            assert not torch.allclose(after[name], value), f"{name} did not change"
    assert objective().item() < 0.6 * start


def test_relaxed_count_equals_common_edges_on_one_hot_genotypes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        a, b = SPACE.sample(rng), SPACE.sample(rng)
        if rng.random() < 0.3:
            b = SPACE.mutate(a, rng)
        count = shared_edges_relaxed(SPACE.genotype_weights(a), SPACE.genotype_weights(b))
        assert float(count) == pytest.approx(SPACE.common_edges(a, b), abs=1e-6)
    a = SPACE.sample(rng)
    w = SPACE.genotype_weights(a)
    assert float(shared_edges_relaxed(w, w)) == pytest.approx(SPACE.arch_edges)


def test_zero_temperature_relaxation_is_derive() -> None:
    """Without noise, as t → 0, the relaxed count is common_edges with DARTS' derived genotype
    (top-2 inputs by strongest non-none op, argmax non-none op), ``none`` logits included."""
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(1)
    for _ in range(50):
        alpha_star = SPACE.sample(rng)
        logits = (torch.randn(14, 8, generator=gen) * 3, torch.randn(14, 8, generator=gen) * 3)
        derived = SPACE.derive(F.softmax(logits[0], -1), F.softmax(logits[1], -1))
        weights = relax(SPACE, logits, temperature=1e-4, gumbel=False)
        count = shared_edges_relaxed(SPACE.genotype_weights(alpha_star), weights)
        assert float(count) == pytest.approx(SPACE.common_edges(alpha_star, derived), abs=1e-3)


def test_relaxed_architecture_is_two_edges_per_node_and_never_none() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 14, 8, generator=gen) * 2
    for t in (5.0, 1.0, 0.05):
        w = relax_cell(SPACE, logits, temperature=t, generator=gen)
        assert w.shape == logits.shape
        assert (w[..., SPACE.ops.index("none")] == 0).all()
        edge_mass = w.sum(-1)
        assert (edge_mass >= 0).all() and (edge_mass <= 1 + 1e-5).all()
        for node in range(SPACE.nodes):
            lo = SPACE.edge_index(node, 0)
            node_mass = edge_mass[..., lo : lo + node + 2].sum(-1)
            assert torch.allclose(node_mass, torch.full_like(node_mass, 2.0), atol=1e-4)
        # So the count against any α* lies in [0, Λ].
        count = shared_edges_relaxed(SPACE.genotype_weights(SPACE.sample(3)), (w, w))
        assert ((count >= 0) & (count <= LAM + 1e-4)).all()
    with pytest.raises(ValueError, match="temperature"):
        relax_cell(SPACE, logits, temperature=0.0)


def test_export_round_trip_and_derive_at() -> None:
    torch.manual_seed(0)
    for net in (PiecewiseLinearHypernet(SPACE, pivots=3), MLPHypernet(SPACE, hidden=8, layers=1)):
        snap = net.export()
        clone = Hypernet.from_export(snap, SPACE)
        assert type(clone) is type(net)
        for lam in (0.0, 3.3, LAM):
            assert torch.allclose(clone(lam)[0], net(lam)[0])
            assert derive_at(clone, lam) == derive_at(net, lam)


def test_the_count_and_lambda_range_span_both_cells_of_the_full_space() -> None:
    """Λ comes from the full DARTS space (normal and reduction cells: 2 x 4 nodes x 2 inputs
    = 16), and both cells' edges enter the count (the reference counts the reduction cell's
    only, Λ = 8)."""
    assert SPACE.arch_edges == 2 * SPACE.nodes * 2 == 16
    net = PiecewiseLinearHypernet(SPACE)
    assert net.lambda_max == 16.0 and net.positions[-1] == 16.0
    rng = np.random.default_rng(0)
    star = DARTS_V2
    other = next(g for g in (SPACE.sample(rng) for _ in range(1000)) if SPACE.common_edges(star, g) == 0)
    weights = SPACE.genotype_weights(star)
    for genotype, shared in (
        (star, 16),
        (Genotype(star.normal, other.reduce, star.normal_concat, star.reduce_concat), 8),
        (Genotype(other.normal, star.reduce, star.normal_concat, star.reduce_concat), 8),
        (other, 0),
    ):
        assert SPACE.common_edges(star, genotype) == shared
        assert float(shared_edges_relaxed(weights, SPACE.genotype_weights(genotype))) == pytest.approx(shared)
    # The regulariser's gradient reaches both cells' halves of the pivots.
    torch.manual_seed(0)
    lam = 6.0
    relaxed = relax(SPACE, net(lam), temperature=0.5, generator=torch.Generator().manual_seed(0))
    ((lam - shared_edges_relaxed(weights, relaxed)) ** 2).backward()
    assert net.pivots.grad[:, 0].abs().sum() > 0 and net.pivots.grad[:, 1].abs().sum() > 0
