"""Building an ensemble from a pool of trained members: ForwardSelect.

Greedy forward step-wise selection (Caruana et al. 2004), as NES uses it (Zaidi et al. 2021):
start from the member with the best validation NLL, then repeatedly add the member that makes
the NLL of the averaged probabilities of the selection smallest.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from nestune.platform.metrics import EPS, _as_labels, _to_numpy

__all__ = ["forward_select", "ensemble_probs"]

# Candidates are scored in blocks of rows so that the (block, N) float64 temporaries stay around
# 32 MB whatever the pool size.
_BLOCK_ELEMENTS = 1 << 22
# Samples whose probabilities are multiplied before one log is taken (a power of two).
_GROUP = 16
# Selections longer than this (with replacement) score without grouping; see forward_select.
_GROUP_MAX_SIZE = 1_000_000


def _check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"size: expected an int >= 1, got {size!r} ({type(size).__name__})")
    if size < 1:
        raise ValueError(f"size: expected an int >= 1, got {int(size)}")
    return int(size)


def _gather_true_class(val_probs: Any, labels: Any) -> np.ndarray:
    """Validate ``val_probs`` (K, N, C) and ``labels`` (N,); return ``p[k, n, y_n]`` as (K, N)
    float64, without converting the whole pool to float64."""
    torch = sys.modules.get("torch")
    is_tensor = torch is not None and isinstance(val_probs, torch.Tensor)
    if is_tensor:
        shape = tuple(val_probs.shape)
    else:
        if not isinstance(val_probs, np.ndarray):
            # A list of members' (N, C) arrays is a pool too.
            val_probs = _to_numpy(val_probs, "val_probs", dtype=None)
        if val_probs.dtype.kind not in "fiu":
            raise ValueError(f"val_probs: expected real numbers, got dtype {val_probs.dtype}")
        shape = val_probs.shape
    if len(shape) != 3:
        raise ValueError(f"val_probs: expected shape (K, N, C), got {shape}")
    k, n, c = shape
    if k < 1 or n < 1 or c < 1:
        raise ValueError(f"val_probs: expected shape (K, N, C) with K, N, C >= 1, got {shape}")
    y = _as_labels(labels, n, c)
    if is_tensor:
        idx = torch.as_tensor(y, device=val_probs.device)
        rows = torch.arange(n, device=val_probs.device)
        p = val_probs.detach()[:, rows, idx].to(torch.float64).cpu().contiguous().numpy()
    else:
        # Advanced indexing hands back a column-major (K, N) array; the scan reads rows, and
        # on a strided copy it runs ~3x slower.
        p = val_probs[:, np.arange(n), y].astype(np.float64, order="C")
    # Only the true-class column is ever read, so only it is checked: summing a float16 pool of
    # 400 x 10,000 x 100 to check rows would cost more than the selection itself.
    if not np.all(np.isfinite(p)) or p.min() < -1e-6 or p.max() > 1.0 + 1e-2:
        raise ValueError(
            "val_probs: expected probabilities in [0, 1] (softmax outputs, not logits), got "
            f"true-class values in [{float(np.nanmin(p)):.4g}, {float(np.nanmax(p)):.4g}]"
        )
    return p


def forward_select(
    val_probs: Any, labels: Any, size: int, replacement: bool = False
) -> list[int]:
    """Greedy forward selection of an ensemble of ``size`` members from a pool, by validation NLL.

    ``val_probs`` is the pool's validation probabilities, shape ``(K, N, C)`` (numpy of any real
    dtype, float16 included, a torch tensor, or a list of K ``(N, C)`` arrays); ``labels`` the
    validation labels, shape ``(N,)``. The first pick is the best single member by NLL; each
    next pick is the member minimising the NLL of the mean of the selection's probabilities
    (clipped at :data:`nestune.platform.metrics.EPS`, as :func:`nestune.metrics.nll` does).
    Ties go to the lowest index.

    Without ``replacement`` each member is picked at most once, so ``size`` may not exceed K.
    With it, a member may be picked again, which raises its weight in the average; ``size`` is
    then not bounded by K.

    Returns the chosen indices in selection order (duplicates possible only with replacement).
    Raises ``ValueError`` for a ``size`` that is not an int >= 1, a ``size`` above K without
    replacement, and for ``val_probs``/``labels`` of the wrong shape.

    Only ``p[k, n, labels[n]]`` matters for the NLL of an average, so those (K, N) values are
    gathered once and every step scores all K candidates at once against a running sum.
    """
    size = _check_size(size)
    p = _gather_true_class(val_probs, labels)  # (K, N) float64
    k, n = p.shape
    if not replacement and size > k:
        raise ValueError(
            f"size: expected at most the pool size K={k} without replacement, got size={size}"
        )
    # A log per (candidate, sample) is most of the cost, so values are multiplied in groups of
    # _GROUP first and one log is taken per group: log(a) + log(b) = log(ab), 16x fewer logs.
    # Each factor lies in [EPS * (step + 1), (step + 1) * (1 + tolerance)], so a product of 16
    # stays within float64's normal range (>= 1e-192) unless a selection with replacement
    # grows past ~1e18 picks; beyond _GROUP_MAX_SIZE picks the grouping is switched off.
    group = _GROUP if size <= _GROUP_MAX_SIZE else 1
    width = -(-n // group) * group
    if width != n:
        # Padding columns hold 1.0 and the running sum stays 0 there: a factor of 1 each.
        padded = np.ones((k, width), dtype=np.float64)
        padded[:, :n] = p
        p = padded
    block = max(1, min(k, _BLOCK_ELEMENTS // width))
    buf = np.empty((block, width), dtype=np.float64)
    running = np.zeros(width, dtype=np.float64)
    chosen: list[int] = []
    available = np.ones(k, dtype=bool)
    scores = np.empty(k, dtype=np.float64)
    for step in range(size):
        # NLL((running + p_k) / (s+1)) = -mean log(max(running + p_k, EPS*(s+1))) + log(s+1); the
        # constant does not change the argmin, so it (and the division) is skipped.
        floor = EPS * (step + 1)
        for lo in range(0, k, block):
            rows = min(block, k - lo)
            cand = buf[:rows]
            np.add(running[None, :], p[lo : lo + rows], out=cand)
            np.maximum(cand, floor, out=cand)
            w = width
            while w > width // group:
                w //= 2
                np.multiply(cand[:, :w], cand[:, w : 2 * w], out=cand[:, :w])
            head = cand[:, :w]
            np.log(head, out=head)
            scores[lo : lo + rows] = -head.sum(axis=1)
        if not replacement:
            scores[~available] = np.inf
        best = int(np.argmin(scores))  # first minimum: ties go to the lowest index
        chosen.append(best)
        available[best] = False
        running[:n] += p[best, :n]
    return chosen


def ensemble_probs(member_probs: Any, indices: Sequence[int]) -> np.ndarray:
    """Probabilities of the ensemble ``indices`` of a pool: the mean of ``member_probs[i]`` over
    ``indices``, a repeated index counted as many times as it appears (as ForwardSelect with
    replacement intends). ``member_probs`` is ``(K, N, C)`` (numpy, torch or a list of (N, C)
    arrays); returns a float64 ``(N, C)`` numpy array.
    """
    torch = sys.modules.get("torch")
    if not (torch is not None and isinstance(member_probs, torch.Tensor)) and not isinstance(
        member_probs, np.ndarray
    ):
        member_probs = _to_numpy(member_probs, "member_probs", dtype=None)
    shape = tuple(member_probs.shape)
    if len(shape) != 3:
        raise ValueError(f"member_probs: expected shape (K, N, C), got {shape}")
    idx = list(indices)
    if not idx:
        raise ValueError("indices: expected at least one member index, got none")
    k = shape[0]
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < k:
            raise ValueError(f"indices: expected ints in [0, K)=[0, {k}), got {i!r}")
    out = np.zeros(shape[1:], dtype=np.float64)
    for i in idx:
        out += _to_numpy(member_probs[int(i)], "member_probs")
    out /= len(idx)
    return out
