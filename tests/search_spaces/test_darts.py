import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nestune.search_spaces import DARTS_V1, DARTS_V2, PRIMITIVES, DartsSpace, Genotype

SPACE = DartsSpace()

# As printed in quark0/darts genotypes.py (normal_concat as a list there; range() in a
# namedtuple's repr).
DARTS_V2_TEXT = (
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
    "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
    "('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
    "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])"
)


# -- Genotype --------------------------------------------------------------------------------

def test_parse_darts_v2_as_printed():
    g = Genotype.parse(DARTS_V2_TEXT)
    assert g == DARTS_V2
    assert g.normal[7] == ("dil_conv_3x3", 2)
    assert g.reduce_concat == (2, 3, 4, 5)
    ranged = DARTS_V2_TEXT.replace("normal_concat=[2, 3, 4, 5]", "normal_concat=range(2, 6)")
    assert Genotype.parse(ranged) == DARTS_V2


@pytest.mark.parametrize("g", [DARTS_V1, DARTS_V2, SPACE.sample(3)])
def test_repr_and_json_round_trip(g):
    assert Genotype.parse(str(g)) == g
    assert Genotype.from_json(g.to_json()) == g
    assert json.loads(g.to_json())["normal"][0] == list(g.normal[0])
    assert hash(Genotype.from_json(g.to_json())) == hash(g)


def test_genotype_is_frozen():
    with pytest.raises(AttributeError):
        DARTS_V2.normal = ()  # type: ignore[misc]


@pytest.mark.parametrize(
    "text, match",
    [
        ("Genotype(normal=[('sep_conv_3x3', 0)], reduce=[])", "two .*pairs per node"),
        ("Genotype(normal=__import__('os'), reduce=[])", "not a literal"),
        ("Foo(normal=[], reduce=[])", "Genotype\\(normal"),
        ("Genotype(normal=[], bogus=1, reduce=[])", "unknown field"),
        ("Genotype(reduce=[])", "missing field"),
    ],
)
def test_parse_rejects_bad_text(text, match):
    with pytest.raises(ValueError, match=match):
        Genotype.parse(text)


def test_from_json_rejects_garbage():
    with pytest.raises(ValueError, match="not valid JSON"):
        Genotype.from_json("{nope")


# -- validate ---------------------------------------------------------------------------------

def _with_normal(pairs):
    return Genotype(pairs, DARTS_V2.reduce)


@pytest.mark.parametrize(
    "genotype, match",
    [
        (_with_normal([("conv_9x9", 0)] + list(DARTS_V2.normal[1:])), r"normal\[0\]: unknown op"),
        (_with_normal([("none", 0)] + list(DARTS_V2.normal[1:])), r"normal\[0\]: unknown op"),
        (_with_normal(list(DARTS_V2.normal[:2]) + [("sep_conv_3x3", 3)] + list(DARTS_V2.normal[3:])),
         r"normal\[2\]: input 3 out of range for node 1"),
        (_with_normal(DARTS_V2.normal[:6]), r"Genotype.normal: expected 8 .* got 6"),
        (_with_normal([("sep_conv_3x3", 0), ("sep_conv_3x3", 0)] + list(DARTS_V2.normal[2:])),
         "node 0 reads input 0 twice"),
        (Genotype(DARTS_V2.normal, DARTS_V2.reduce, normal_concat=(2, 3)), "normal_concat"),
    ],
)
def test_validate_names_the_bad_field(genotype, match):
    with pytest.raises(ValueError, match=match):
        SPACE.validate(genotype)


def test_space_rejects_bad_arguments():
    with pytest.raises(ValueError, match="DartsSpace.ops: unknown"):
        DartsSpace(ops=("sep_conv_3x3", "conv_9x9"))
    with pytest.raises(ValueError, match="DartsSpace.nodes"):
        DartsSpace(nodes=0)


# -- sample, mutate, common_edges --------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_sample_is_valid(seed):
    g = SPACE.sample(seed)
    assert SPACE.validate(g) is g
    assert all(op != "none" for op, _ in g.normal + g.reduce)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 5))
def test_mutate_is_valid_and_differs_by_one_edge(seed, steps):
    rng = np.random.default_rng(seed)
    g = SPACE.sample(rng)
    for _ in range(steps):
        child = SPACE.mutate(g, rng)
        SPACE.validate(child)
        assert child != g
        # One edge changes its op or its input: all others are shared.
        assert SPACE.common_edges(g, child) == SPACE.arch_edges - 1
        g = child


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_mutate_in_narrow_spaces(seed):
    # One op only: input moves are the only mutation left. One node: op changes only.
    for space in (DartsSpace(ops=("none", "skip_connect")), DartsSpace(nodes=1)):
        g = space.sample(seed)
        child = space.mutate(g, seed)
        assert child != g
        space.validate(child)


def test_sample_is_deterministic_per_seed_and_covers_ops():
    assert SPACE.sample(7) == SPACE.sample(7)
    seen = {op for s in range(50) for op, _ in SPACE.sample(s).normal}
    assert seen == set(PRIMITIVES) - {"none"}


def test_common_edges_by_hand():
    assert SPACE.common_edges(DARTS_V2, DARTS_V2) == 16
    # DARTS_V1 and V2 share, in the normal cell: node 0 both sep_conv_3x3 on inputs 0 and 1
    # (2); node 1 skip_connect-0 vs sep_conv_3x3-0 and sep_conv_3x3-1 in both (1); node 2
    # sep_conv_3x3-1 and skip_connect-0 in both (2); node 3 skip_connect-2 vs dil_conv_3x3-2
    # and sep_conv_3x3-0 vs skip_connect-0 (0). Reduce: node 0 both max-pools (2); node 1
    # skip-2 (1) but max_pool-0 vs max_pool-1 (0); node 2 (2); node 3 skip-2 (1), avg-0 vs
    # max-1 (0). Total 5 + 6 = 11.
    assert SPACE.common_edges(DARTS_V1, DARTS_V2) == 11
    assert SPACE.common_edges(DARTS_V2, DARTS_V1) == 11


def test_genotype_weights_and_derive_round_trip():
    for seed in range(5):
        g = SPACE.sample(seed)
        wn, wr = SPACE.genotype_weights(g)
        assert wn.sum() == 8 and wr.sum() == 8
        assert SPACE.derive(wn, wr).edges() == g.edges()


# -- networks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_network_forward_shapes(shape):
    torch.manual_seed(0)
    net = SPACE.network(DARTS_V2, C=4, layers=5, num_classes=7, in_channels=shape[0], drop_path=0.2)
    net.train()
    out = net(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    out.sum().backward()
    net.eval()
    assert torch.isfinite(net(torch.randn(2, *shape))).all()


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_supernet_forward_shapes(shape):
    torch.manual_seed(0)
    net = SPACE.supernet(C=4, layers=3, num_classes=5, in_channels=shape[0])
    out = net(torch.randn(2, *shape))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert net.alpha_normal.grad is not None and net.alpha_normal.grad.abs().sum() > 0
    assert net.alpha_reduce.grad is not None and net.alpha_reduce.grad.abs().sum() > 0


def test_network_rejects_bad_sizes():
    with pytest.raises(ValueError, match="C: expected an even"):
        SPACE.network(DARTS_V2, C=5)
    with pytest.raises(ValueError, match="drop_path"):
        SPACE.network(DARTS_V2, C=4, drop_path=1.5)
    with pytest.raises(ValueError, match="weights\\[normal\\]"):
        net = SPACE.supernet(C=4, layers=2, in_channels=1)
        net(torch.randn(1, 1, 8, 8), weights=(torch.ones(3, 3), torch.ones(3, 3)))


def test_arch_and_weight_parameters_partition():
    net = SPACE.supernet(C=4, layers=2, in_channels=1)
    arch = {id(p) for p in net.arch_parameters()}
    weights = {id(p) for p in net.weight_parameters()}
    assert not arch & weights
    assert arch | weights == {id(p) for p in net.parameters()}
    assert net.alpha_normal.shape == (14, len(PRIMITIVES))


def test_derive_on_hand_set_weights():
    net = SPACE.supernet(C=4, layers=2, in_channels=1)
    ops = list(PRIMITIVES)
    wn = torch.zeros(14, len(ops))
    # A huge `none` weight on edge 0 must be ignored: derive looks at non-none ops only.
    wn[:, ops.index("none")] = 100.0
    plan = {  # node -> [(input, op, strength)], the two strongest first
        0: [(1, "sep_conv_5x5", 5.0), (0, "max_pool_3x3", 4.0)],
        1: [(2, "dil_conv_3x3", 3.0), (0, "skip_connect", 2.0)],
        2: [(3, "avg_pool_3x3", 9.0), (1, "sep_conv_3x3", 1.5)],
        3: [(4, "dil_conv_5x5", 7.0), (2, "sep_conv_3x3", 6.0)],
    }
    for node, picks in plan.items():
        for inp, op, strength in picks:
            wn[SPACE.edge_index(node, inp), ops.index(op)] = strength
            # A weaker second op on the same edge must not be chosen.
            other = "max_pool_3x3" if op != "max_pool_3x3" else "avg_pool_3x3"
            wn[SPACE.edge_index(node, inp), ops.index(other)] = 0.5 * strength
        # Weaker competing edges of this node.
        for inp in range(node + 2):
            if inp not in [p[0] for p in picks]:
                wn[SPACE.edge_index(node, inp), ops.index("sep_conv_3x3")] = 1.0
    wr = torch.zeros(14, len(ops))
    wr[:, ops.index("max_pool_3x3")] = 1.0
    g = net.derive((wn, wr))
    expected = [(op, inp) for node in range(4) for inp, op, _ in plan[node]]
    assert list(g.normal) == expected
    # Ties between edges keep the lower input first: deterministic.
    assert list(g.reduce) == [("max_pool_3x3", i) for node in range(4) for i in (0, 1)]
    SPACE.validate(g)


def test_zero_weight_ops_are_not_computed(monkeypatch):
    torch.manual_seed(0)
    net = SPACE.supernet(C=4, layers=2, in_channels=1)
    calls = {"sep": 0}
    from nestune.search_spaces import ops as ops_mod

    original = ops_mod.SepConv.forward

    def counting(self, x):
        calls["sep"] += 1
        return original(self, x)

    monkeypatch.setattr(ops_mod.SepConv, "forward", counting)
    x = torch.randn(2, 1, 8, 8)
    wn, wr = (w.detach() for w in net.default_weights())
    net(x, (wn, wr))
    full = calls["sep"]
    assert full > 0
    calls["sep"] = 0
    keep = [i for i, op in enumerate(PRIMITIVES) if "sep" not in op]
    mask = torch.zeros(len(PRIMITIVES))
    mask[keep] = 1.0
    out = net(x, (wn * mask, wr * mask))
    assert calls["sep"] == 0
    assert out.shape == (2, 10)


def test_zeroing_an_op_equals_removing_it():
    torch.manual_seed(0)
    space = DartsSpace()
    net = space.supernet(C=4, layers=2, in_channels=1).eval()
    x = torch.randn(3, 1, 8, 8)
    wn = torch.rand(14, len(PRIMITIVES))
    wr = torch.rand(14, len(PRIMITIVES))
    wn[:, 4] = 0.0
    with torch.no_grad():
        zeroed = net(x, (wn, wr))
        # A tiny but non-zero weight computes the op: the output moves only slightly.
        wn2 = wn.clone()
        wn2[:, 4] = 1e-12
        tiny = net(x, (wn2, wr))
    assert torch.allclose(zeroed, tiny, atol=1e-6)


def test_reduction_cells_at_one_and_two_thirds():
    for layers, expected in ((3, [1, 2]), (5, [1, 3]), (8, [2, 5]), (20, [6, 13])):
        net = SPACE.network(DARTS_V2, C=4, layers=layers, in_channels=1)
        assert [i for i, c in enumerate(net.cells) if c.reduction] == expected
        sup = SPACE.supernet(C=4, layers=layers, in_channels=1)
        assert [i for i, c in enumerate(sup.cells) if c.reduction] == expected


def test_one_hot_weights_compute_only_the_genotypes_edges():
    # Weights that are one-hot on DARTS_V2's edges: every other (edge, op) is exactly zero and
    # must not run, so each cell computes exactly its genotype's 8 ops.
    torch.manual_seed(0)
    net = SPACE.supernet(C=4, layers=3, in_channels=1)
    calls = {}
    for c, cell in enumerate(net.cells):
        for e, mixed in enumerate(cell._ops):
            for i, op in enumerate(mixed._ops):
                op.register_forward_hook(
                    lambda *_, key=(c, e, i): calls.__setitem__(key, calls.get(key, 0) + 1)
                )
    wn, wr = SPACE.genotype_weights(DARTS_V2)
    out = net(torch.randn(2, 1, 8, 8), (wn, wr))
    assert out.shape == (2, 10)
    for c, cell in enumerate(net.cells):
        g = DARTS_V2.reduce if cell.reduction else DARTS_V2.normal
        expected = {(c, SPACE.edge_index(k // 2, inp), PRIMITIVES.index(op)) for k, (op, inp) in
                    enumerate(g)}
        assert {key for key in calls if key[0] == c} == expected
    assert all(v == 1 for v in calls.values())


def test_module_level_network_and_supernet():
    from nestune.search_spaces import network, supernet

    net = network(DARTS_V2, C=4, layers=3, num_classes=6, in_channels=1)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 6)
    ops = ("none", "skip_connect", "sep_conv_3x3")
    sup = supernet(C=4, layers=2, num_classes=3, in_channels=1, ops=ops)
    assert sup.alpha_normal.shape == (14, 3) and sup.space.ops == ops
    assert sup(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    g = sup.derive()
    assert {op for op, _ in g.normal + g.reduce} <= {"skip_connect", "sep_conv_3x3"}
    sup.space.validate(g)
    with pytest.raises(ValueError, match="DartsSpace.ops: unknown"):
        supernet(ops=("conv_9x9",))
