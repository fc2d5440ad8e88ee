"""The EdgeNES search: diversity control shown on digits (the shared edges of the genotype
derived at λ rise with λ), outputs the driver logs, and no use of the val or test splits."""

from __future__ import annotations

import base64
import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from nestune.edgenes.hypernet import derive_at
from nestune.edgenes.search import (
    EdgeNESConfig,
    edgenes_job,
    load_hypernet,
    parse_genotype,
    plot_shared_edges,
    schedule,
)
from nestune.platform.data import DataBundle, Split, load_data
from nestune.platform.search import run_search
from nestune.search_spaces.darts import DARTS_V2, DartsSpace

SPACE = DartsSpace()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Poison:
    """A split that must never be read: any attribute access fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the EdgeNES search read a held-out split (.{name})")

    def __len__(self) -> int:
        raise AssertionError("the EdgeNES search read a held-out split (len)")


def _train_only(data: DataBundle, n: int | None = None) -> DataBundle:
    train = data.train if n is None else Split(data.train.x[:n], data.train.y[:n])
    return dataclasses.replace(data, train=train, val=Poison(), test=Poison())


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data("digits")


@pytest.fixture
def one_thread():
    # The supernet is tiny: on shared cores one thread beats a contended pool.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def searched(digits: DataBundle, tmp_path_factory):
    """One search on digits with a tiny supernet (C=4, 3 layers: normal and reduce cells),
    run through the search-method registry as the runner runs it, with val/test poisoned."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alpha_star = SPACE.sample(0)
        plot_path = tmp_path_factory.mktemp("plot") / "shared_edges.png"
        job = {"kind": "search", "method": "edgenes", "seed": 0, "alpha_star": alpha_star.to_json(),
               "epochs": 8, "C": 4, "layers": 3, "batch_size": 64, "grid_points": 17,
               "num_samples": 8, "plot_path": str(plot_path)}
        result = run_search(job, _train_only(digits), "cpu")
    finally:
        torch.set_num_threads(before)
    return alpha_star, job, result, plot_path


def test_diversity_control_shared_edges_rise_with_lambda(searched) -> None:
    alpha_star, _, result, _ = searched
    extra = result["extra"]
    lambdas, shared = extra["lambdas"], extra["shared_edges"]
    assert lambdas[0] == 0.0 and lambdas[-1] == SPACE.arch_edges and len(lambdas) == 17
    rho = spearmanr(lambdas, shared).statistic
    print(f"\nshared edges vs λ: {list(zip(lambdas, shared, strict=True))}; Spearman {rho:.3f}")
    assert rho >= 0.8
    assert extra["spearman"] == pytest.approx(rho)
    # The control spans the range: near-copies of α* at λ = Λ, little of it at λ = 0.
    assert shared[-1] >= SPACE.arch_edges - 2
    assert shared[0] <= 4
    # The curve is recomputed from the stored hypernetwork: it is what the samples came from.
    hyper = load_hypernet(extra, result["arrays"], SPACE)
    assert [SPACE.common_edges(alpha_star, derive_at(hyper, lam)) for lam in lambdas] == shared


def test_the_search_trains_every_pivot_in_both_cells(searched) -> None:
    """The pivot sets start at 1e-3 * randn; a search that never reached them (the reference
    wraps them in new tensors) would leave them there. Every pivot moves, in both cells, and
    the derived curve uses both cells: at λ = Λ each cell is close to α*'s own."""
    alpha_star, _, result, _ = searched
    hyper = load_hypernet(result["extra"], result["arrays"], SPACE)
    moved = hyper.pivots.detach().flatten(2).abs().amax(dim=2)  # (pivots, cells)
    assert moved.shape == (5, 2)
    assert (moved > 0.1).all(), moved
    top = derive_at(hyper, float(SPACE.arch_edges))
    for cell in ("normal", "reduce"):
        shared = sum(1 for edge in top.edges() & alpha_star.edges() if edge[0] == cell)
        assert shared >= SPACE.arch_edges // 2 - 2, (cell, shared)


def test_result_has_what_the_driver_logs(searched) -> None:
    alpha_star, job, result, plot_path = searched
    assert result["kind"] == "search" and result["method"] == "edgenes"
    assert result["device_seconds"] > 0
    extra = result["extra"]
    # The genotype is the one derived at λ = Λ.
    hyper = load_hypernet(extra, result["arrays"], SPACE)
    assert result["genotype"] == derive_at(hyper, float(SPACE.arch_edges)).to_json()
    samples = extra["samples"]
    assert len(samples) == job["num_samples"]
    for s in samples:
        assert 0.0 <= s["lambda"] <= SPACE.arch_edges
        g = parse_genotype(s["genotype"])
        assert s["shared_edges"] == SPACE.common_edges(alpha_star, g)
        assert g == derive_at(hyper, s["lambda"])
    png = base64.b64decode(extra["plot_png"])
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert plot_path.read_bytes() == png
    assert isinstance(extra["mean_abs_gap"], float)
    assert set(extra["history"]) >= {"val_loss", "reg", "reg_mode", "temperature", "reg_weight",
                                     "spearman"}
    # Both schedules ran: C warmed up, t annealed.
    assert extra["history"]["reg_weight"][0] < extra["history"]["reg_weight"][-1] == pytest.approx(3.0)
    assert extra["history"]["temperature"][0] > extra["history"]["temperature"][-1] == pytest.approx(0.05)
    import json

    json.dumps(extra)  # JSON-able as the runner stores it


def test_mlp_hypernet_and_grid_sampling_run(digits: DataBundle, one_thread) -> None:
    job = {"alpha_star": str(DARTS_V2), "seed": 1, "epochs": 1, "C": 4, "layers": 3,
           "batch_size": 16, "hypernet": "mlp", "hidden": 8, "hidden_layers": 1,
           "sampling": "grid", "num_samples": 5, "grid_points": 5}
    result = edgenes_job(job, _train_only(digits, 96))
    lams = [s["lambda"] for s in result["extra"]["samples"]]
    assert lams == pytest.approx(list(np.linspace(0, SPACE.arch_edges, 5)))
    assert result["extra"]["hypernet"]["kind"] == "mlp"
    hyper = load_hypernet(result["extra"], result["arrays"], SPACE)
    assert hyper.kind == "mlp"


def test_job_errors_name_the_field(digits: DataBundle) -> None:
    data = _train_only(digits, 64)
    with pytest.raises(ValueError, match="alpha_star"):
        edgenes_job({"seed": 0}, data)
    with pytest.raises(ValueError, match="alpha_star"):
        edgenes_job({"alpha_star": "not a genotype"}, data)
    with pytest.raises(ValueError, match="EdgeNESConfig.temp_schedule"):
        EdgeNESConfig(temp_schedule="cosine")
    with pytest.raises(ValueError, match="EdgeNESConfig.epochs"):
        EdgeNESConfig(epochs=0)
    with pytest.raises(ValueError, match="EdgeNESConfig.arch_lr"):
        EdgeNESConfig(arch_lr="fast")
    with pytest.raises(ValueError, match="EdgeNESConfig.layers"):
        EdgeNESConfig(layers=2)  # cells 0 and 1 would both be reduction cells: no normal cell
    with pytest.raises(ValueError, match="plot_path"):
        edgenes_job({"alpha_star": DARTS_V2.to_json(), "epochs": 1, "C": 4, "layers": 1,
                     "batch_size": 16, "plot_path": "relative.png"}, data)


def test_config_from_job_ignores_non_settings() -> None:
    cfg = EdgeNESConfig.from_job({"kind": "search", "method": "edgenes", "seed": 3, "epochs": 2,
                                  "arch_betas": [0.5, 0.9], "job_id": "x"})
    assert cfg.epochs == 2 and cfg.arch_betas == (0.5, 0.9)


def test_schedules() -> None:
    # C warms up linearly, t anneals geometrically, both from their start to their end.
    assert schedule("linear", 0.3, 3.0, 0.0) == pytest.approx(0.3)
    assert schedule("linear", 0.3, 3.0, 0.5) == pytest.approx(1.65)
    assert schedule("linear", 0.3, 3.0, 1.0) == pytest.approx(3.0)
    assert schedule("exponential", 1.0, 0.05, 0.5) == pytest.approx(0.05**0.5)
    assert schedule("exponential", 1.0, 0.05, 1.0) == pytest.approx(0.05)
    assert schedule("constant", 1.0, 0.05, 0.0) == 0.05
    with pytest.raises(ValueError, match="schedule"):
        schedule("cosine", 1.0, 0.05, 0.5)


def test_parse_genotype_accepts_json_and_darts_repr() -> None:
    assert parse_genotype(DARTS_V2.to_json()) == DARTS_V2
    assert parse_genotype(str(DARTS_V2)) == DARTS_V2
    assert parse_genotype(DARTS_V2.to_dict()) == DARTS_V2


def test_plot_is_a_png() -> None:
    png = plot_shared_edges([0.0, 8.0, 16.0], [1, 7, 16], 16.0,
                            [{"lambda": 3.0, "shared_edges": 2}], spearman=1.0)
    assert png.startswith(PNG_MAGIC)
