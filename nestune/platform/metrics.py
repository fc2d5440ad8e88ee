"""Metrics on predicted probabilities: quality of one network or of an ensemble.

Every function takes probabilities, never logits: a member's predictions are stored once as
probabilities (float16 is enough) and any ensemble is rebuilt from them by averaging.

Shapes:

- ``(N, C)``: one predictor's class probabilities for N samples and C classes;
- ``(M, N, C)``: the probabilities of the M members of an ensemble. :func:`nll`, :func:`error`,
  :func:`ece` and :func:`brier` score the ensemble, whose prediction is the mean over members;
  :func:`oracle_nll` and :func:`disagreement` need the members themselves.

Inputs may be numpy arrays of any real dtype (float16 included) or torch tensors (any device,
any float dtype, with or without grad); arithmetic is done in float64. Labels are integers,
shape ``(N,)``. Bad input raises ``ValueError`` naming the argument and what was expected.
Results are plain Python floats.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["EPS", "nll", "error", "ece", "brier", "oracle_nll", "disagreement"]

#: Probabilities are clipped to at least this before a log, so that a confident miss (a
#: true-class probability that underflowed to 0, as float16 storage does below ~6e-8) costs
#: -ln(EPS) ~= 27.6 nats instead of infinity.
EPS = 1e-12

# Rows of stored probabilities do not sum to 1 exactly (float16 keeps ~3 significant digits);
# anything further off than this is not a probability vector (logits, unnormalised scores).
_SUM_TOL = 1e-2


def _to_numpy(x: Any, name: str, dtype: type = np.float64) -> np.ndarray:
    """Return ``x`` as a numpy array of ``dtype``; torch tensors are detached and moved to CPU.

    torch is looked up in ``sys.modules`` instead of imported: an object can only be a tensor if
    torch is already loaded, and importing nestune must stay light.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # bfloat16 has no numpy equivalent; widen on the torch side.
        x = x.to(torch.float64) if x.is_floating_point() else x
        x = x.numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a numeric array, got {type(x).__name__} ({exc})") from exc


def _check_probs(p: np.ndarray, name: str) -> None:
    """Raise ValueError unless every row of ``p`` (last axis = classes) is a probability vector."""
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name}: expected finite probabilities, got NaN or inf")
    lo = float(p.min())
    if lo < -1e-6:
        raise ValueError(f"{name}: expected non-negative probabilities, got a value {lo:.4g}")
    sums = p.sum(axis=-1)
    dev = np.abs(sums - 1.0)
    worst = int(np.argmax(dev))
    if dev.flat[worst] > _SUM_TOL:
        where = np.unravel_index(worst, sums.shape)
        raise ValueError(
            f"{name}: expected probabilities summing to 1 over classes (last axis, within "
            f"{_SUM_TOL}), got a row summing to {float(sums[where]):.4g} at index "
            f"{tuple(int(i) for i in where)}; pass softmax outputs, not logits"
        )


def _as_probs(probs: Any, name: str, *, members: bool) -> np.ndarray:
    """Validate ``probs``; return float64 ``(M, N, C)`` (members) or ``(N, C)`` (ensemble mean)."""
    p = _to_numpy(probs, name)
    if members:
        if p.ndim != 3:
            raise ValueError(f"{name}: expected shape (M, N, C), got {p.shape}")
    elif p.ndim not in (2, 3):
        raise ValueError(f"{name}: expected shape (N, C) or (M, N, C), got {p.shape}")
    if p.ndim == 3 and p.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one member (M>=1), got shape {p.shape}")
    if p.shape[-2] < 1:
        raise ValueError(f"{name}: expected at least one sample (N>=1), got shape {p.shape}")
    if p.shape[-1] < 1:
        raise ValueError(f"{name}: expected at least one class (C>=1), got shape {p.shape}")
    _check_probs(p, name)
    if p.ndim == 3 and not members:
        p = p.mean(axis=0)
    return p


def _as_labels(labels: Any, n: int, c: int, name: str = "labels") -> np.ndarray:
    """Validate integer labels of shape ``(n,)`` in ``[0, c)``; return them as int64."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name}: expected shape (N,)=({n},), got {y.shape}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected integer class indices, got dtype {y.dtype}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ValueError(
            f"{name}: expected class indices in [0, C)=[0, {c}), "
            f"got values in [{int(y.min())}, {int(y.max())}]"
        )
    return y.astype(np.int64, copy=False)


def _true_class(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Probability given to the true label, shape ``p.shape[:-1]``."""
    return np.take_along_axis(p, np.broadcast_to(y[..., None], p.shape[:-1] + (1,)), axis=-1)[
        ..., 0
    ]


def nll(probs: Any, labels: Any) -> float:
    """Mean negative log-likelihood (nats) of the true labels.

    ``probs`` is ``(N, C)``, or ``(M, N, C)`` for an ensemble scored through the mean of its
    members' probabilities. Probabilities are clipped at :data:`EPS` before the log.
    """
    p = _as_probs(probs, "probs", members=False)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    return float(-np.mean(np.log(np.maximum(_true_class(p, y), EPS))))


def error(probs: Any, labels: Any) -> float:
    """Classification error rate in [0, 1]: fraction of samples whose argmax is not the label.

    Ties in the argmax go to the lowest class index. ``(M, N, C)`` input is scored as the mean
    over members.
    """
    p = _as_probs(probs, "probs", members=False)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    return float(np.mean(np.argmax(p, axis=-1) != y))


def ece(probs: Any, labels: Any, bins: int = 15) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins over [0, 1].

    Confidence is the top probability, the prediction its argmax (ties: lowest index). Bin ``b``
    holds confidences in ``(b/bins, (b+1)/bins]`` (right-closed, as in Guo et al. 2017; a
    confidence of exactly 0 goes to the first bin). ECE = sum over bins of
    ``(n_b / N) * |accuracy_b - mean confidence_b|``; empty bins contribute nothing.
    ``(M, N, C)`` input is scored as the mean over members.
    """
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins: expected an int >= 1, got {bins!r}")
    p = _as_probs(probs, "probs", members=False)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    conf = p.max(axis=-1)
    correct = (np.argmax(p, axis=-1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    # searchsorted(side="left") - 1 puts c in bin b iff edges[b] < c <= edges[b+1], with the very
    # same float edges a comparison-based implementation would use.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, int(bins) - 1)
    sum_conf = np.bincount(idx, weights=conf, minlength=bins)
    sum_acc = np.bincount(idx, weights=correct, minlength=bins)
    # |acc_b - conf_b| * n_b / N == |sum_acc_b - sum_conf_b| / N: no division by empty bins.
    return float(np.sum(np.abs(sum_acc - sum_conf)) / conf.shape[0])


def brier(probs: Any, labels: Any) -> float:
    """Brier score: for each sample, the sum over classes of ``(p_c - onehot_c)^2``; then the
    mean over samples. Lies in [0, 2] (0 = certain and right, 2 = certain and wrong).

    ``(M, N, C)`` input is scored as the mean over members.
    """
    p = _as_probs(probs, "probs", members=False)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    # sum_c (p_c - 1[c=y])^2 = sum_c p_c^2 - 2 p_y + 1
    per_sample = np.sum(p * p, axis=-1) - 2.0 * _true_class(p, y) + 1.0
    return float(np.mean(per_sample))


def oracle_nll(member_probs: Any, labels: Any) -> float:
    """Oracle NLL of an ensemble: for each sample, the smallest NLL of the true label among the
    members (the member an oracle would pick for that sample); then the mean over samples.

    ``member_probs`` must be ``(M, N, C)`` with M >= 1. Probabilities are clipped at :data:`EPS`.
    """
    p = _as_probs(member_probs, "member_probs", members=True)
    y = _as_labels(labels, p.shape[1], p.shape[2])
    best = np.max(_true_class(p, np.broadcast_to(y, p.shape[:2])), axis=0)
    return float(-np.mean(np.log(np.maximum(best, EPS))))


def disagreement(member_probs: Any) -> float:
    """Mean pairwise disagreement: the fraction of (member pair, sample) combinations whose two
    members predict different classes (argmax, ties to the lowest index), over all M(M-1)/2
    unordered pairs and N samples.

    ``member_probs`` must be ``(M, N, C)``. With M = 1 there is no pair and the result is 0.0 (a
    single network agrees with itself), so a size-1 ensemble can be reported like any other.
    """
    p = _as_probs(member_probs, "member_probs", members=True)
    m, n, c = p.shape
    if m < 2:
        return 0.0
    preds = np.argmax(p, axis=-1)  # (M, N)
    # Per sample, k_c members vote class c and sum_c k_c (k_c - 1) / 2 pairs agree: O(M N), not
    # O(M^2 N).
    votes = np.bincount((preds + c * np.arange(n)[None, :]).ravel(), minlength=n * c)
    agree = np.sum(votes * (votes - 1)) / 2.0
    pairs = m * (m - 1) / 2.0
    return float(1.0 - agree / (pairs * n))
