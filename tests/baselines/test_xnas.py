import json
import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nestune.baselines.xnas import (
    ExpertAdvice,
    eg_update,
    wipeout,
    xnas_learning_rate,
    xnas_search,
)
from nestune.platform.data import load_data
from nestune.platform.search import run_search
from nestune.platform.strategy import FINISHED, WAIT, StrategyContext, make_strategy
from nestune.search_spaces.darts import DartsSpace, Genotype

SPACE = DartsSpace()


# -- Algorithm 1, line by line ----------------------------------------------------------------


def test_learning_rate_formula():
    assert math.isclose(xnas_learning_rate(8, 100, 0.5), math.sqrt(2 * math.log(8) / (100 * 0.25)))
    with pytest.raises(ValueError):
        xnas_learning_rate(8, 0, 1.0)


def test_eg_update_in_log_space_is_the_multiplicative_step():
    log_v = torch.randn(5, 4)
    reward = torch.randn(5, 4)
    eta = 0.3
    new = eg_update(log_v, reward, eta)
    torch.testing.assert_close(new.exp(), log_v.exp() * torch.exp(eta * reward))
    with pytest.raises(FloatingPointError):
        eg_update(log_v, torch.full((5, 4), float("nan")), eta)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    t=st.integers(0, 60),
    T=st.integers(1, 50),
    eta=st.floats(1e-3, 5.0),
    L=st.floats(1e-3, 5.0),
    spread=st.one_of(st.just(0.0), st.floats(1e-3, 50.0)),
)
def test_wipeout_never_removes_the_leader_and_follows_the_threshold(seed, t, T, eta, L, spread):
    g = torch.Generator().manual_seed(seed)
    log_v = torch.randn(6, 8, generator=g, dtype=torch.float64) * spread
    active = torch.rand(6, 8, generator=g) < 0.8
    active[torch.arange(6), torch.randint(0, 8, (6,), generator=g)] = True
    keep = wipeout(log_v, active, eta, L, T, t)
    masked = log_v.masked_fill(~active, -math.inf)
    leader = masked.argmax(dim=1)
    assert keep[torch.arange(6), leader].all()  # the op with the largest weight stays
    assert not (keep & ~active).any()  # removed ops never come back
    # Lines 10-11 in probability space: v_i < max_j v_j exp(-2ηL(T - t)).
    v = masked.exp()
    theta = v.max(dim=1, keepdim=True).values * math.exp(-2 * eta * L * max(T - t, 0))
    expected = active & ~(v < theta)
    expected[torch.arange(6), leader] = True
    # Compared where exp neither underflows nor rounds an expert onto the threshold.
    clear = (theta > 0) & ((v - theta).abs() > 1e-9 * theta)
    assert torch.equal(keep[clear], expected[clear])


def test_expert_advice_normalised_weights_and_permanent_removal():
    torch.manual_seed(0)
    experts = ExpertAdvice(num_edges=14, num_ops=8, T=30, L=1.0)
    ever_removed = [torch.zeros(14, 8, dtype=torch.bool) for _ in range(2)]
    for _ in range(30):
        grads = [torch.randn(14, 8) * 2 for _ in range(2)]  # some beyond L: clipped
        before = [lv.clone() for lv in experts.log_v]
        experts.update(grads)
        for c in range(2):
            # The leader after the EG step always survives its wipeout.
            new_leader = (before[c] + experts.eta * (-grads[c].clamp(-1, 1))).masked_fill(
                torch.isinf(before[c]), -math.inf).argmax(1)
            assert experts.active[c][torch.arange(14), new_leader].all()
            assert not (experts.active[c] & ever_removed[c]).any()
            ever_removed[c] |= ~experts.active[c]
        for w, act in zip(experts.weights(), experts.active, strict=True):
            torch.testing.assert_close(w.sum(1), torch.ones(14))
            assert (w[~act] == 0).all() and (w[act] > 0).all()
    # At t = T the threshold is the maximum itself: one op per edge is left (no ties here).
    assert experts.remaining() == {"normal": 14, "reduce": 14}


def test_toy_problem_keeps_and_derives_the_planted_good_op():
    """Every edge's target is one planted op's output; the loss gradient at the mixed output
    p = Σ w_i f_i rewards it. XNAS must keep exactly that op and derive it."""
    torch.manual_seed(1)
    n_edges, n_ops, d, T = SPACE.num_edges, SPACE.num_ops, 16, 60
    real_ops = [i for i, op in enumerate(SPACE.ops) if op != "none"]
    planted = [torch.tensor(real_ops)[torch.randint(0, len(real_ops), (n_edges,))] for _ in range(2)]
    # Edges differ in how much their good op explains, so derive has strengths to rank.
    scale = [0.5 + torch.rand(n_edges) for _ in range(2)]
    experts = ExpertAdvice(n_edges, n_ops, T=T, L=1.0)
    removed_at = []
    for _ in range(T):
        w = [t.detach().requires_grad_(True) for t in experts.weights()]
        loss = 0.0
        for c in range(2):
            f = torch.randn(n_edges, n_ops, d)
            f[:, SPACE.ops.index("none")] = 0.0  # the zero op outputs zeros
            target = scale[c][:, None] * f[torch.arange(n_edges), planted[c]] + 0.1 * torch.randn(n_edges, d)
            p = (w[c][:, :, None] * f).sum(1)  # line 4: linear mixing
            loss = loss + 0.5 * ((p - target) ** 2).sum() / d
        grads = torch.autograd.grad(loss, w)
        removed_at.append(len(experts.update(list(grads))))
    assert sum(removed_at[: T // 2]) == 0  # no op can be wiped in the first half (ηL·t ≤ ηL(T−t))
    for c in range(2):
        assert experts.active[c][torch.arange(n_edges), planted[c]].all()
        assert (experts.active[c].sum(1) == 1).all()
    genotype = SPACE.validate(SPACE.derive(*experts.weights()))
    for cell, plant in zip(("normal", "reduce"), planted, strict=True):
        for k, (op, inp) in enumerate(genotype.cell(cell)):
            assert op == SPACE.ops[int(plant[SPACE.edge_index(k // 2, inp)])]


def test_an_edge_won_by_none_derives_the_real_op_wiped_out_last():
    """Where every real op loses to the zero op, only ``none`` survives; derive skips it and
    must then take the real op that held out longest, not the first op in the space's order."""
    T, n_edges = 10, SPACE.num_edges
    none, dil3, avg = (SPACE.ops.index(op) for op in ("none", "dil_conv_3x3", "avg_pool_3x3"))
    sep3 = SPACE.ops.index("sep_conv_3x3")
    experts = ExpertAdvice(n_edges, SPACE.num_ops, T=T, L=1.0)
    live = SPACE.edge_index(0, 1)  # node 0's edge from input 1 keeps a live real op
    for _ in range(T):
        g = torch.full((n_edges, SPACE.num_ops), 0.5)  # ∂ℓ/∂w > 0: the op hurts
        g[:, none] = 0.0
        g[:, dil3] = 0.2  # hurts least: wiped out in the last round
        g[:, avg] = 0.21  # also wiped out in the last round, further behind the leader
        g[live, sep3] = -0.5
        experts.update([g, g])
    for c in range(2):
        assert experts.active[c][:, none].sum() == n_edges - 1
        assert experts.active[c][live, sep3] and experts.active[c][live].sum() == 1
        others = torch.arange(n_edges) != live
        assert (experts.removed_at[c][others][:, [dil3, avg]] == T).all()
        assert (experts.removed_at[c][others][:, sep3] < T).all()
    genotype = SPACE.validate(SPACE.derive(*experts.derive_weights()))
    for cell in ("normal", "reduce"):
        pairs = genotype.cell(cell)
        assert pairs[0] == ("sep_conv_3x3", 1)  # the live edge outranks the none-won one
        assert all(op == "dil_conv_3x3" for op, _ in pairs[1:])
    w, d = experts.weights()[0], experts.derive_weights()[0]
    assert torch.equal(d[experts.active[0]], w[experts.active[0]])
    assert ((d[~experts.active[0]] > -1) & (d[~experts.active[0]] < 0)).all()


# -- the search on digits ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def search():
    data = load_data("digits", subset=200)
    return xnas_search(data, epochs=3, C=4, layers=3, batch_size=32, seed=0, L=0.05)


def test_search_wipes_ops_out_and_logs_the_speedup(search, caplog):
    SPACE.validate(search.genotype)
    log = search.extra["wipeout"]
    assert [e["epoch"] for e in log] == [1, 2, 3]
    remaining = [e["ops_remaining"]["normal"] + e["ops_remaining"]["reduce"] for e in log]
    computed = [e["ops_computed"]["normal"] + e["ops_computed"]["reduce"] for e in log]
    assert remaining == sorted(remaining, reverse=True)
    assert remaining[0] == 2 * 14 * 8 and remaining[-1] <= 2 * 14 + 2  # one op per edge at t = T
    assert computed[-1] < computed[0]
    assert sum(len(e["removed"]) for e in log) == remaining[0] - remaining[-1]
    step_seconds = search.extra["step_seconds"]
    assert len(step_seconds) == 3 and all(s > 0 for s in step_seconds)
    assert len(search.arrays["step_seconds"]) == search.extra["T"]
    per_step_ops = search.arrays["computed_ops"]
    assert (np.diff(per_step_ops) <= 0).all()
    json.dumps(search.extra)
    print("xnas wipeout log:", [(e["epoch"], e["ops_remaining"], round(e["step_seconds"], 3))
                               for e in log])


def test_the_wipeout_log_reaches_mlflow_as_epoch_curves(search, tmp_path):
    """What a study logs for an XNAS search trial: ops left per cell, ops wiped and step time
    per epoch, as metric histories of the trial's MLflow run."""
    from nestune.platform.tracking import Tracker, search_curves

    curves = search_curves(json.loads(json.dumps(search.extra)))  # as stored in search.json
    log = search.extra["wipeout"]
    assert curves["ops_remaining_normal"] == [float(e["ops_remaining"]["normal"]) for e in log]
    assert curves["ops_wiped"] == [float(len(e["removed"])) for e in log]
    assert curves["step_seconds"] == search.extra["step_seconds"] and "arch_loss" in curves
    assert "weights" not in curves and "genotype" not in curves  # not numeric series
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "xnas-curves")
    parent = tracker.start_parent("xnas", 0, {})
    entry = {"kind": "search", "trial_id": "t1", "ok": True, "job": {"kind": "search", "method": "xnas"},
             "metrics": {"speedup": search.extra["speedup"]}, "device_seconds": 1.0}
    child = tracker.log_trial(parent, entry, label="xnas", seed=0, genotype=search.genotype.to_json(),
                              curves=curves)
    history = tracker.client.get_metric_history(child, "epoch/ops_remaining_normal")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == list(
        enumerate(curves["ops_remaining_normal"], start=1))
    assert len(tracker.client.get_metric_history(child, "epoch/step_seconds")) == 3


def test_wiped_out_ops_are_not_computed(search):
    model = SPACE.supernet(C=4, layers=3, num_classes=10, in_channels=1)
    calls = []
    for cell in model.cells:
        for mixed in cell._ops:
            for i, op in enumerate(mixed._ops):
                op.register_forward_hook(lambda *_, i=i: calls.append(i))
    model(torch.randn(2, 1, 8, 8), search.weights)
    none = SPACE.ops.index("none")
    expected = 0
    for cell in model.cells:
        w = search.weights_reduce if cell.reduction else search.weights_normal
        expected += int(((w != 0) & (torch.arange(8) != none)).sum())
    assert len(calls) == expected < 3 * 14 * 7


def test_search_log_lines(caplog):
    data = load_data("digits", subset=120)
    with caplog.at_level(logging.INFO, logger="nestune.baselines.xnas"):
        run_search({"kind": "search", "method": "xnas", "seed": 2, "epochs": 2, "C": 4, "layers": 2,
                    "batch_size": 32}, data, "cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "nestune.baselines.xnas"]
    assert len(lines) == 2
    assert all("ops remaining" in line and "step" in line for line in lines)


def test_xnas_job_result_format():
    data = load_data("digits", subset=120)
    out = run_search({"kind": "search", "method": "xnas", "seed": 0, "epochs": 1, "C": 4,
                      "layers": 2, "batch_size": 32, "L": 0.1}, data, "cpu")
    assert out["method"] == "xnas" and out["device_seconds"] > 0
    g = Genotype.from_json(out["genotype"])
    SPACE.validate(g)
    assert out["extra"]["settings"]["L"] == 0.1
    # layers=2 has reduction cells only: their forecasters end with one op per edge (t = T),
    # the unused normal ones see zero rewards and keep every op (all tied).
    assert np.isneginf(out["arrays"]["alpha_reduce"]).sum() == 14 * 7
    assert not np.isneginf(out["arrays"]["alpha_normal"]).any()
    with pytest.raises(ValueError, match="L"):
        run_search({"kind": "search", "method": "xnas", "seed": 0, "L": -1.0}, data, "cpu")


# -- strategy ---------------------------------------------------------------------------------


def test_xnas_strategy_builds_an_ensemble_of_the_study_size():
    s = make_strategy("xnas", L=0.1)
    s.setup(StrategyContext(space=SPACE, seed=0, ensemble_size=3))
    jobs = [s.ask() for _ in range(3)]
    assert all(j["kind"] == "search" and j["method"] == "xnas" and j["L"] == 0.1 for j in jobs)
    assert s.ask() == WAIT
    members = []
    for j in jobs:
        s.tell(j, {"kind": "search", "genotype": SPACE.sample(j["seed"]).to_json(),
                   "device_seconds": 1.0})
        members.append(s.ask())
    assert all(m["kind"] == "member" for m in members)
    for m in members:
        s.tell(m, {"kind": "member", "genotype": m["genotype"], "val_probs": np.full((2, 10), 0.1),
                   "device_seconds": 1.0})
    assert s.ask() == FINISHED
    with pytest.raises(ValueError, match="L"):
        make_strategy("xnas", L=0.0)
