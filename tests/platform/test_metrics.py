"""Metrics against values worked out by hand on tiny arrays."""

import math

import numpy as np
import pytest
import torch

import nestune.metrics
from nestune.metrics import brier, disagreement, ece, error, nll, oracle_nll
from nestune.platform.metrics import EPS

# Two members, two samples, two classes; reused across tests.
A = [[0.5, 0.5], [0.9, 0.1]]  # argmax 0 (tie -> lowest index), 0
B = [[0.8, 0.2], [0.4, 0.6]]  # argmax 0, 1
C = [[0.1, 0.9], [0.05, 0.95]]  # argmax 1, 1


def test_public_module_reexports():
    assert set(nestune.metrics.__all__) == {
        "nll", "error", "ece", "brier", "oracle_nll", "disagreement"
    }
    for name in nestune.metrics.__all__:
        assert callable(getattr(nestune.metrics, name))


def test_nll_by_hand():
    # sample 0: -ln 0.5 = ln 2 ; sample 1: -ln 0.9
    assert nll(A, [0, 0]) == pytest.approx((math.log(2) - math.log(0.9)) / 2, rel=1e-12)
    # three classes, one sample: -ln 0.3
    assert nll([[0.2, 0.3, 0.5]], [1]) == pytest.approx(-math.log(0.3), rel=1e-12)


def test_nll_of_members_is_nll_of_their_mean():
    # mean of A and B: sample 0 [0.65, 0.35] label 0 ; sample 1 [0.65, 0.35] label 1
    expected = (-math.log(0.65) - math.log(0.35)) / 2
    assert nll([A, B], [0, 1]) == pytest.approx(expected, rel=1e-12)


def test_nll_clips_zero_probability():
    # true class has probability 0: clipped at EPS instead of infinity
    assert nll([[1.0, 0.0]], [1]) == pytest.approx(-math.log(EPS), rel=1e-12)
    assert math.isfinite(nll([[1.0, 0.0]], [1]))


def test_error_by_hand():
    # A predicts [0 (tie -> lowest), 0]; labels [0, 1]: one miss out of two
    assert error(A, [0, 1]) == 0.5
    # B predicts [0, 1]: both right / both wrong
    assert error(B, [0, 1]) == 0.0
    assert error(B, [1, 0]) == 1.0
    # ensemble of A, B, C: mean sample 0 = [0.4667, 0.5333] -> 1 ; sample 1 = [0.45, 0.55] -> 1
    assert error([A, B, C], [1, 1]) == 0.0
    assert error([A, B, C], [0, 1]) == 0.5


ECE_PROBS = [[0.9, 0.1], [0.7, 0.3], [0.35, 0.65], [0.55, 0.45]]
ECE_LABELS = [0, 1, 1, 0]
# confidence / correct:  0.9 yes, 0.7 no, 0.65 yes, 0.55 yes


def test_ece_by_hand_five_bins():
    # bins of width 0.2, right-closed:
    #   (0.8, 1.0]: {0.9 right}            n=1 acc 1   conf 0.9   -> |1 - 0.9| * 1/4   = 0.025
    #   (0.6, 0.8]: {0.7 wrong, 0.65 right} n=2 acc 0.5 conf 0.675 -> |0.5 - 0.675| * 2/4 = 0.0875
    #   (0.4, 0.6]: {0.55 right}           n=1 acc 1   conf 0.55  -> |1 - 0.55| * 1/4  = 0.1125
    assert ece(ECE_PROBS, ECE_LABELS, bins=5) == pytest.approx(0.025 + 0.0875 + 0.1125, abs=1e-12)


def test_ece_default_fifteen_bins():
    # width 1/15: 0.9 in (13/15, 14/15], 0.7 in (10/15, 11/15], 0.65 in (9/15, 10/15],
    # 0.55 in (8/15, 9/15]: one sample per bin, so ECE = mean |correct - conf|
    expected = (0.1 + 0.7 + 0.35 + 0.45) / 4
    assert ece(ECE_PROBS, ECE_LABELS) == pytest.approx(expected, abs=1e-12)
    assert ece(ECE_PROBS, ECE_LABELS, bins=15) == pytest.approx(expected, abs=1e-12)


def test_ece_bins_are_right_closed():
    # bins=2: a confidence of exactly 0.5 belongs to (0, 0.5], not (0.5, 1]
    #   (0, 0.5]: {0.5 right}  -> |1 - 0.5| * 1/2 = 0.25
    #   (0.5, 1]: {0.75 wrong} -> |0 - 0.75| * 1/2 = 0.375
    assert ece([[0.5, 0.5], [0.75, 0.25]], [0, 1], bins=2) == pytest.approx(0.625, abs=1e-12)
    # with one bin, ECE = |accuracy - mean confidence| = |0.5 - 0.625|
    assert ece([[0.5, 0.5], [0.75, 0.25]], [0, 1], bins=1) == pytest.approx(0.125, abs=1e-12)


def test_ece_perfectly_calibrated_is_zero():
    # confidence 1 and always right
    assert ece([[1.0, 0.0], [0.0, 1.0]], [0, 1]) == 0.0


@pytest.mark.parametrize("bins", [0, -3, 2.5, True, "15"])
def test_ece_rejects_bad_bins(bins):
    with pytest.raises(ValueError, match="bins"):
        ece(ECE_PROBS, ECE_LABELS, bins=bins)


def test_brier_by_hand():
    # sample 0: (0.5-1)^2 + (0.5-0)^2 = 0.5 ; sample 1 (label 1): (0.9-0)^2 + (0.1-1)^2 = 1.62
    assert brier(A, [0, 1]) == pytest.approx((0.5 + 1.62) / 2, abs=1e-12)
    # three classes: 0.2^2 + 0.3^2 + (0.5-1)^2 = 0.04 + 0.09 + 0.25
    assert brier([[0.2, 0.3, 0.5]], [2]) == pytest.approx(0.38, abs=1e-12)
    # bounds: certain and right = 0, certain and wrong = 2
    assert brier([[1.0, 0.0]], [0]) == 0.0
    assert brier([[1.0, 0.0]], [1]) == pytest.approx(2.0)


def test_brier_of_members_is_brier_of_their_mean():
    # mean of A, B: [0.65, 0.35] twice, labels [0, 1]
    #   sample 0: 0.35^2 + 0.35^2 = 0.245 ; sample 1: 0.65^2 + 0.65^2 = 0.845
    assert brier([A, B], [0, 1]) == pytest.approx((0.245 + 0.845) / 2, abs=1e-12)


def test_oracle_nll_by_hand():
    labels = [0, 1]
    # M=2: sample 0 best of (0.5, 0.8) = 0.8 ; sample 1 best of (0.1, 0.6) = 0.6
    assert oracle_nll([A, B], labels) == pytest.approx(
        (-math.log(0.8) - math.log(0.6)) / 2, rel=1e-12
    )
    # M=3: C adds sample 0: 0.1 (worse) ; sample 1: 0.95 (better)
    assert oracle_nll([A, B, C], labels) == pytest.approx(
        (-math.log(0.8) - math.log(0.95)) / 2, rel=1e-12
    )
    # M=1: the member's own NLL
    assert oracle_nll([A], [0, 0]) == pytest.approx(nll(A, [0, 0]), rel=1e-12)


def test_oracle_nll_never_above_ensemble_or_member_nll():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=(5, 50))
    y = rng.integers(0, 4, size=50)
    o = oracle_nll(p, y)
    assert o <= min(nll(m, y) for m in p) + 1e-12
    assert o <= nll(p, y) + 1e-12


def test_disagreement_by_hand():
    # argmax per member: A [0, 0], B [0, 1], C [1, 1]
    # M=2 (A, B): agree on sample 0, disagree on sample 1 -> 1/2
    assert disagreement([A, B]) == pytest.approx(0.5)
    # M=3: pairs (A,B): 1 disagreement, (A,C): 2, (B,C): 1 -> 4 of 3 pairs x 2 samples
    assert disagreement([A, B, C]) == pytest.approx(4 / 6)
    # identical members never disagree
    assert disagreement([B, B, B]) == 0.0


def test_disagreement_single_member_is_zero():
    assert disagreement([A]) == 0.0


def test_disagreement_matches_pairwise_loop():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(3), size=(6, 40))
    preds = p.argmax(-1)
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    expected = np.mean([np.mean(preds[i] != preds[j]) for i, j in pairs])
    assert disagreement(p) == pytest.approx(expected, abs=1e-12)


def test_float16_input_computed_in_wide_precision():
    rng = np.random.default_rng(2)
    p16 = rng.dirichlet(np.ones(10), size=(3, 200)).astype(np.float16)
    y = rng.integers(0, 10, size=200)
    p64 = p16.astype(np.float64)
    for fn in (nll, error, ece, brier, oracle_nll):
        assert fn(p16, y) == pytest.approx(fn(p64, y), rel=1e-12, abs=1e-12)
    assert disagreement(p16) == disagreement(p64)
    assert isinstance(nll(p16, y), float)


def test_torch_tensor_input():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(5), size=(4, 30))
    y = rng.integers(0, 5, size=30)
    tp = torch.tensor(p, dtype=torch.float32, requires_grad=True)
    ty = torch.tensor(y)
    for fn in (nll, error, ece, brier, oracle_nll):
        out = fn(tp, ty)
        assert isinstance(out, float)
        assert out == pytest.approx(fn(p, y), rel=1e-5, abs=1e-6)
    assert disagreement(tp) == disagreement(p)
    # (N, C) tensor, bfloat16 (no numpy equivalent)
    assert nll(tp[0].to(torch.bfloat16), ty) == pytest.approx(nll(p[0], y), rel=1e-2)


def test_labels_shape_error_names_field_and_shape():
    with pytest.raises(ValueError, match=r"labels: expected shape \(N,\)=\(2,\), got \(3,\)"):
        nll(A, [0, 1, 1])
    with pytest.raises(ValueError, match=r"labels: expected shape \(N,\)=\(2,\), got \(2, 1\)"):
        brier(A, [[0], [1]])


@pytest.mark.parametrize(
    "labels, what",
    [([0, 2], r"\[0, C\)=\[0, 2\)"), ([-1, 0], r"\[0, C\)"), ([0.0, 1.0], "integer")],
)
def test_bad_label_values(labels, what):
    with pytest.raises(ValueError, match="labels: .*" + what):
        error(A, labels)


@pytest.mark.parametrize("fn", [nll, error, ece, brier])
def test_probs_shape_errors(fn):
    with pytest.raises(ValueError, match=r"probs: expected shape \(N, C\) or \(M, N, C\)"):
        fn([0.5, 0.5], [0])
    with pytest.raises(ValueError, match="probs: expected shape"):
        fn(np.full((1, 1, 2, 2), 0.5), [0, 0])
    with pytest.raises(ValueError, match=r"probs: expected at least one sample"):
        fn(np.zeros((0, 3)), np.zeros(0, dtype=int))


@pytest.mark.parametrize("fn", [oracle_nll, disagreement])
def test_member_metrics_need_members(fn):
    args = ([0, 1],) if fn is oracle_nll else ()
    with pytest.raises(ValueError, match=r"member_probs: expected shape \(M, N, C\), got \(2, 2\)"):
        fn(A, *args)
    with pytest.raises(ValueError, match=r"member_probs: expected at least one member"):
        fn(np.zeros((0, 2, 2)), *args)


def test_oracle_nll_labels_checked_against_members():
    with pytest.raises(ValueError, match=r"labels: expected shape \(N,\)=\(2,\), got \(1,\)"):
        oracle_nll([A, B], [0])


@pytest.mark.parametrize(
    "probs, what",
    [
        ([[2.0, -1.0], [0.5, 0.5]], "non-negative"),  # logits-like
        ([[3.0, 1.0], [0.5, 0.5]], "summing to 1"),  # unnormalised scores
        ([[float("nan"), 1.0], [0.5, 0.5]], "finite"),
    ],
)
def test_not_probabilities(probs, what):
    with pytest.raises(ValueError, match="probs: .*" + what):
        nll(probs, [0, 1])


def test_float16_rounding_is_tolerated():
    # float16 rows do not sum to 1 exactly; they are still probabilities
    p = np.full((4, 7), 1 / 7, dtype=np.float16)
    assert abs(float(p.astype(np.float64).sum(-1)[0]) - 1) > 0
    assert nll(p, [0, 1, 2, 3]) == pytest.approx(-math.log(float(np.float16(1 / 7))))
