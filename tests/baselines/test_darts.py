import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from nestune.baselines.darts import (
    Darts,
    DartsEnsemble,
    _arch_step_second_order,
    darts_search,
)
from nestune.platform.data import Split, load_data
from nestune.platform.distributed import Replicas
from nestune.platform.search import run_search
from nestune.platform.strategy import FINISHED, WAIT, StrategyContext, make_strategy
from nestune.search_spaces.darts import DartsSpace, Genotype

SPACE = DartsSpace()
TINY = {"epochs": 1, "C": 4, "layers": 2, "batch_size": 32}


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", subset=160)


def _poisoned(data):
    """The data with NaN val and test images: a search that read them would go NaN."""
    nan = lambda s: Split(torch.full_like(s.x, float("nan")), s.y)  # noqa: E731
    return type(data)(**{**data.__dict__, "val": nan(data.val), "test": nan(data.test)})


def test_first_order_search_contract_and_no_val_or_test(digits):
    result = darts_search(_poisoned(digits), epochs=2, C=4, layers=3, batch_size=32, seed=3)
    SPACE.validate(result.genotype)
    assert result.device_seconds > 0
    for a in result.alphas:
        assert a.shape == (14, 8) and torch.isfinite(a).all()
    # Adam moved α (of both cell types, layers=3 has both) away from its 1e-3 initialisation.
    assert float(result.alpha_normal.abs().max()) > 2e-3
    assert float(result.alpha_reduce.abs().max()) > 2e-3
    history = result.history
    assert len(history["weights"]) == 3  # before the first epoch, then after each
    for snapshot in history["weights"]:
        for cell in ("normal", "reduce"):
            w = np.array(snapshot[cell])
            assert w.shape == (14, 8)
            np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    assert len(history["genotype"]) == 2 and len(history["arch_loss"]) == 2
    assert Genotype.from_json(history["genotype"][-1]) == result.genotype
    json.dumps(result.extra)  # JSON-able, for the trial's stored outputs


def test_search_job_through_registry(digits):
    out = run_search({"kind": "search", "method": "darts", "seed": 1, **TINY, "order": 2},
                     digits, "cpu")
    assert out["kind"] == "search" and out["method"] == "darts"
    SPACE.validate(Genotype.from_json(out["genotype"]))
    assert out["device_seconds"] > 0
    assert out["extra"]["settings"]["order"] == 2
    assert set(out["arrays"]) >= {"alpha_normal", "alpha_reduce", "weights_normal", "weights_reduce"}
    json.dumps(out["extra"])


def test_same_seed_same_search(digits):
    a = darts_search(digits, **TINY, seed=5)
    b = darts_search(digits, **TINY, seed=5)
    c = darts_search(digits, **TINY, seed=6)
    torch.testing.assert_close(a.alpha_normal, b.alpha_normal, rtol=0, atol=0)
    assert not torch.equal(a.alpha_normal, c.alpha_normal)


@pytest.mark.parametrize("key, value", [("order", 3), ("epochs", "ten"), ("batch_size", 0),
                                        ("arch_betas", [0.5]), ("lr", -1.0)])
def test_bad_job_setting_names_the_field(digits, key, value):
    with pytest.raises(ValueError, match=key):
        run_search({"kind": "search", "method": "darts", "seed": 0, **TINY, key: value}, digits, "cpu")


def test_second_order_step_is_the_exact_unrolled_hypergradient():
    """The finite-difference Hessian-vector product against autograd through the unrolled
    SGD step. In float64 with a small ε the difference scheme is exact to rounding; with the
    paper's ε = 0.01/‖v‖ ReLU and max-pool kinks of a random tiny net make it only close."""
    torch.manual_seed(0)
    model = SPACE.supernet(C=2, layers=3, num_classes=3, in_channels=1).double()
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_(0, 0.5)
    x_tr, y_tr = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    x_ar, y_ar = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    xi, mu, wd = 0.1, 0.9, 3e-4
    opt = torch.optim.SGD(model.weight_parameters(), xi, momentum=mu, weight_decay=wd)
    # One step first, so the momentum buffers the unrolled step reads are non-zero.
    F.cross_entropy(model(x_tr), y_tr).backward()
    opt.step()
    opt.zero_grad()

    alphas = model.arch_parameters()
    _arch_step_second_order(model, opt, x_tr, y_tr, x_ar, y_ar, xi, mu, wd, 1e-6, Replicas())
    approx = [a.grad.clone() for a in alphas]

    names = [n for n, p in model.named_parameters() if all(p is not a for a in alphas)]
    params = [dict(model.named_parameters())[n] for n in names]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    loss = F.cross_entropy(functional_call(model, {**dict(zip(names, params, strict=True)), **buffers},
                                           (x_tr,)), y_tr)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    unrolled = [p - xi * (mu * opt.state[p]["momentum_buffer"] + g + wd * p)
                for p, g in zip(params, grads, strict=True)]
    loss_ar = F.cross_entropy(functional_call(model, {**dict(zip(names, unrolled, strict=True)),
                                                      **buffers}, (x_ar,)), y_ar)
    exact = torch.autograd.grad(loss_ar, alphas)
    for g_approx, g_exact in zip(approx, exact, strict=True):
        assert float(g_exact.abs().max()) > 1e-4
        torch.testing.assert_close(g_approx, g_exact, rtol=1e-6, atol=1e-9)


# -- strategies ---------------------------------------------------------------------------


def _setup(strategy, ensemble_size=2, seed=0):
    strategy.setup(StrategyContext(space=SPACE, seed=seed, ensemble_size=ensemble_size))
    return strategy


def _search_result(job):
    g = SPACE.sample(job["seed"])
    return {"kind": "search", "genotype": g.to_json(), "device_seconds": 1.0, "extra": {}}


def _member_result(job):
    return {"kind": "member", "genotype": job["genotype"], "val_probs": np.full((4, 10), 0.1),
            "metrics": {"val_nll": 1.0}, "device_seconds": 1.0}


def test_darts_ens_issues_k_searches_then_trains_each_genotype():
    s = _setup(make_strategy("darts_ens", k=3, order=2), ensemble_size=2)
    searches = [s.ask() for _ in range(3)]
    assert all(j["kind"] == "search" and j["method"] == "darts" and j["order"] == 2 for j in searches)
    assert len({j["seed"] for j in searches}) == 3
    assert "epochs" not in searches[0]  # the study's search settings apply
    assert s.ask() == WAIT
    s.tell(searches[1], _search_result(searches[1]))
    member = s.ask()
    assert member["kind"] == "member" and member["genotype"] == _search_result(searches[1])["genotype"]
    assert member["seed"] == searches[1]["seed"]
    assert s.ask() == WAIT

    # Resume mid-way: a fresh strategy with the saved state asks for the same things.
    state = json.loads(json.dumps(s.state_dict()))
    t = _setup(make_strategy("darts_ens", k=3, order=2), ensemble_size=2)
    t.load_state_dict(state)
    for strategy in (s, t):
        strategy.tell(searches[0], _search_result(searches[0]))
        strategy.tell(searches[2], {"kind": "search", "error": "boom", "device_seconds": 0.0})
    nxt = s.ask()
    assert nxt == t.ask()
    assert nxt["kind"] == "member" and nxt["search_index"] == 0
    replacement = s.ask()  # the failed search is replaced, with a new seed
    assert replacement["kind"] == "search" and replacement["seed"] not in {j["seed"] for j in searches}
    s.tell(replacement, _search_result(replacement))
    last = s.ask()
    assert last["kind"] == "member"
    for job in (member, nxt, last):
        s.tell(job, _member_result(job))
    assert s.ask() == FINISHED


def test_darts_ens_k_defaults_to_ensemble_size_and_selects_m():
    s = _setup(make_strategy("darts_ens"), ensemble_size=4)
    jobs = [s.ask() for _ in range(4)]
    assert all(j["kind"] == "search" for j in jobs) and s.ask() == WAIT
    # With k > M the pool is ForwardSelect's to choose from.
    labels = np.array([0, 1, 2, 0])
    probs = np.stack([np.eye(3)[labels] * 0.7 + 0.1, np.full((4, 3), 1 / 3), np.eye(3)[[1, 2, 0, 1]]])
    chosen = _setup(make_strategy("darts_ens", k=3)).select(probs, labels, 2)
    assert len(chosen) == 2 and chosen[0] == 0


def test_darts_is_one_search_one_member():
    s = _setup(make_strategy("darts"), ensemble_size=5)
    job = s.ask()
    assert job["kind"] == "search" and s.ask() == WAIT
    s.tell(job, _search_result(job))
    member = s.ask()
    s.tell(member, _member_result(member))
    assert s.ask() == FINISHED
    with pytest.raises(ValueError, match="k"):
        Darts(k=2)
    with pytest.raises(ValueError, match="order"):
        DartsEnsemble(order=3)
