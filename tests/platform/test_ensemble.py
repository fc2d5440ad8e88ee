"""ForwardSelect against a brute-force greedy written with plain loops, and its error cases."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import nestune
from nestune import forward_select
from nestune.metrics import nll
from nestune.platform.ensemble import ensemble_probs
from nestune.platform.metrics import EPS


def brute_force_nll(probs, labels):
    """NLL of an (N, C) probability array, one sample at a time."""
    total = 0.0
    for n, y in enumerate(labels):
        total -= math.log(max(float(probs[n][y]), EPS))
    return total / len(labels)


def brute_force_select(pool, labels, size, replacement=False):
    """Greedy forward selection, the obvious way: for each candidate, average the full (N, C)
    probabilities of selection + candidate and compute the NLL; keep the first best."""
    pool = np.asarray(pool, dtype=np.float64)
    chosen = []
    for _ in range(size):
        best, best_nll = None, math.inf
        for k in range(len(pool)):
            if not replacement and k in chosen:
                continue
            avg = sum(pool[i] for i in chosen + [k]) / (len(chosen) + 1)
            value = brute_force_nll(avg, labels)
            if value < best_nll:  # strict: ties keep the lowest index
                best, best_nll = k, value
        chosen.append(best)
    return chosen


def random_pool(seed, k=9, n=40, c=5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=n)
    # members of varying skill: extra concentration on the true class
    pool = []
    for _ in range(k):
        alpha = np.full((n, c), 0.5)
        alpha[np.arange(n), labels] += rng.uniform(0.0, 3.0)
        pool.append(np.stack([rng.dirichlet(a) for a in alpha]))
    return np.stack(pool), labels


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("replacement", [False, True])
def test_equals_brute_force_greedy(seed, replacement):
    pool, labels = random_pool(seed)
    size = 12 if replacement else len(pool)
    assert forward_select(pool, labels, size, replacement=replacement) == brute_force_select(
        pool, labels, size, replacement=replacement
    )


@pytest.mark.parametrize("seed", range(3))
def test_prefix_property_and_sizes(seed):
    # greedy: the selection of size s is the first s picks of any larger selection
    pool, labels = random_pool(seed)
    full = forward_select(pool, labels, len(pool))
    assert sorted(full) == list(range(len(pool)))
    for s in (1, 3, 5):
        assert forward_select(pool, labels, s) == full[:s]


@pytest.mark.parametrize("seed", range(4))
def test_starts_with_best_single_member(seed):
    pool, labels = random_pool(seed)
    singles = [nll(member, labels) for member in pool]
    assert forward_select(pool, labels, 1) == [int(np.argmin(singles))]
    assert forward_select(pool, labels, 4)[0] == int(np.argmin(singles))


def test_ties_go_to_lowest_index():
    pool, labels = random_pool(0, k=5)
    best = forward_select(pool, labels, 1)[0]
    # copies of the best member at a lower and a higher index
    dup = np.concatenate([pool, pool[best : best + 1]])
    dup = np.concatenate([pool[best : best + 1], dup])  # index 0 and index best+1 and the end
    assert forward_select(dup, labels, 1) == [0]
    # without replacement the next pick may be an identical copy; it is the lowest one left
    assert forward_select(dup, labels, 2, replacement=False) == brute_force_select(
        dup, labels, 2
    )


def test_replacement_reweights_a_dominant_member():
    # member 0 is right with confidence 0.9 everywhere; the others are noise that only hurts
    labels = np.array([0, 1, 2, 0, 1, 2])
    good = np.full((6, 3), 0.05)
    good[np.arange(6), labels] = 0.9
    bad = np.full((6, 3), 0.45)
    bad[np.arange(6), labels] = 0.1
    pool = np.stack([bad, good, bad * 0 + 1 / 3])
    assert forward_select(pool, labels, 3, replacement=True) == [1, 1, 1]
    assert forward_select(pool, labels, 3, replacement=False) == [1, 2, 0]
    assert brute_force_select(pool, labels, 3, replacement=False) == [1, 2, 0]


def test_float16_pool_torch_pool_and_list_pool():
    pool, labels = random_pool(7, k=8, n=60, c=6)
    p16 = pool.astype(np.float16)
    expected = brute_force_select(p16.astype(np.float64), labels, 5)
    assert forward_select(p16, labels, 5) == expected
    assert forward_select(torch.from_numpy(p16), torch.from_numpy(labels), 5) == expected
    assert forward_select(list(p16), list(labels), 5) == expected
    result = forward_select(p16, labels, 5)
    assert all(type(i) is int for i in result)


def test_blocked_scoring_matches(monkeypatch):
    # the candidate scan is split into blocks for memory; block boundaries must not matter
    import nestune.platform.ensemble as ens

    pool, labels = random_pool(11, k=9, n=40)
    expected = forward_select(pool, labels, 9)
    monkeypatch.setattr(ens, "_BLOCK_ELEMENTS", 2 * 40)  # blocks of 2 candidates, last one odd
    assert forward_select(pool, labels, 9) == expected
    assert forward_select(pool, labels, 12, replacement=True) == brute_force_select(
        pool, labels, 12, replacement=True
    )


@pytest.mark.parametrize("grouped", [True, False])
def test_underflowed_members_and_odd_n_match_brute_force(monkeypatch, grouped):
    # float16 storage turns tiny probabilities into exact zeros, so the EPS floor decides many
    # terms; N = 37 is not a multiple of the log-grouping width. Grouped or not, the picks are
    # the brute force's.
    import nestune.platform.ensemble as ens

    if not grouped:
        monkeypatch.setattr(ens, "_GROUP_MAX_SIZE", 0)
    rng = np.random.default_rng(3)
    k, n, c = 7, 37, 4
    labels = rng.integers(0, c, size=n)
    logits = rng.normal(scale=12.0, size=(k, n, c))
    pool = np.exp(logits - logits.max(-1, keepdims=True))
    pool = (pool / pool.sum(-1, keepdims=True)).astype(np.float16)
    assert (pool[:, np.arange(n), labels] == 0).mean() > 0.2
    p64 = pool.astype(np.float64)
    assert forward_select(pool, labels, k) == brute_force_select(p64, labels, k)
    assert forward_select(pool, labels, 15, replacement=True) == brute_force_select(
        p64, labels, 15, replacement=True
    )


def test_each_pick_is_the_best_extension_by_public_nll():
    # consistency with the public metric: every step's pick minimises nestune.metrics.nll of
    # ensemble_probs(selection + candidate) over the remaining candidates
    pool, labels = random_pool(5)
    chosen = forward_select(pool, labels, 5)
    for s in range(1, 5):
        prefix = chosen[:s]
        values = {
            k: nll(ensemble_probs(pool, prefix + [k]), labels)
            for k in range(len(pool))
            if k not in prefix
        }
        assert chosen[s] == min(values, key=values.get)


@pytest.mark.parametrize("size", [0, -2])
def test_size_below_one(size):
    pool, labels = random_pool(0, k=3)
    with pytest.raises(ValueError, match=r"size: expected an int >= 1"):
        forward_select(pool, labels, size)


@pytest.mark.parametrize("size", [2.0, "2", True, None])
def test_size_must_be_int(size):
    pool, labels = random_pool(0, k=3)
    with pytest.raises(ValueError, match=r"size: expected an int"):
        forward_select(pool, labels, size)


def test_size_above_pool_without_replacement():
    pool, labels = random_pool(0, k=3)
    with pytest.raises(ValueError, match=r"size: .*pool size K=3.*size=4"):
        forward_select(pool, labels, 4)
    # with replacement it is allowed
    assert len(forward_select(pool, labels, 4, replacement=True)) == 4
    assert forward_select(pool, labels, np.int64(2)) == forward_select(pool, labels, 2)


def test_val_probs_shape_errors():
    pool, labels = random_pool(0, k=3)
    with pytest.raises(ValueError, match=r"val_probs: expected shape \(K, N, C\), got \(40, 5\)"):
        forward_select(pool[0], labels, 1)
    with pytest.raises(ValueError, match=r"val_probs: expected shape \(K, N, C\)"):
        forward_select(pool[None], labels, 1)
    with pytest.raises(ValueError, match=r"val_probs: .*K, N, C >= 1"):
        forward_select(pool[:0], labels, 1)


def test_labels_errors():
    pool, labels = random_pool(0, k=3)
    with pytest.raises(ValueError, match=r"labels: expected shape \(N,\)=\(40,\), got \(39,\)"):
        forward_select(pool, labels[:-1], 1)
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, C\)=\[0, 5\)"):
        forward_select(pool, labels + 5, 1)


def test_logits_rejected():
    pool, labels = random_pool(0, k=3)
    with pytest.raises(ValueError, match=r"val_probs: expected probabilities"):
        forward_select(np.log(pool) * 3, labels, 1)


def test_ensemble_probs_counts_duplicates():
    pool, _ = random_pool(1, k=4)
    np.testing.assert_allclose(ensemble_probs(pool, [0, 0, 2]), (2 * pool[0] + pool[2]) / 3)
    np.testing.assert_allclose(ensemble_probs(pool, [3]), pool[3])
    out = ensemble_probs(torch.from_numpy(pool.astype(np.float16)), [1, 2])
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, (pool[1] + pool[2]) / 2, atol=1e-3)


def test_ensemble_probs_errors():
    pool, _ = random_pool(1, k=4)
    with pytest.raises(ValueError, match="indices: expected at least one"):
        ensemble_probs(pool, [])
    with pytest.raises(ValueError, match=r"indices: expected ints in \[0, K\)=\[0, 4\)"):
        ensemble_probs(pool, [0, 4])
    with pytest.raises(ValueError, match=r"member_probs: expected shape \(K, N, C\)"):
        ensemble_probs(pool[0], [0])


def test_exported_from_package_without_importing_torch():
    assert "forward_select" in nestune.__all__
    assert nestune.__version__
    code = "import sys, nestune; nestune.forward_select; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
