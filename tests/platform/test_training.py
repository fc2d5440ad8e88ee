"""Training one member on digits (CPU, seconds)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch

from nestune.platform import training as training_mod
from nestune.platform.data import load_data
from nestune.platform.training import MemberResult, TrainConfig, TrainingDiverged, train_member
from nestune.search_spaces import DARTS_V2, DartsSpace

# Small enough for seconds on 2 CPU cores, big enough for > 90 % on digits (about 97 % seen).
QUICK = TrainConfig(C=8, layers=3, epochs=5, batch_size=64)
# For tests that check mechanics, not accuracy.
TINY = TrainConfig(C=4, layers=2, epochs=2, batch_size=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # train_member leaves the thread count to its caller; this caller picks 1. On a 2-core
    # machine shared with other jobs, 2 OpenMP threads spin-wait on each other and a 2 s
    # training takes minutes (measured: 130 s with 2 threads vs 13 s with 1 at load 8).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def small():
    return load_data("digits", subset=200)


@pytest.fixture(scope="module")
def trained(digits):
    start = time.perf_counter()
    result = train_member(DARTS_V2, digits, QUICK, seed=0)
    print(f"digits member: {time.perf_counter() - start:.2f} s, metrics {result.metrics}")
    return result


def test_digits_member_is_accurate_and_complete(trained, digits):
    r = trained
    assert r.metrics["test_error"] < 0.10
    assert r.metrics["val_error"] < 0.10
    for k in ("val_nll", "val_error", "test_nll", "test_error", "test_ece", "test_brier"):
        assert np.isfinite(r.metrics[k])
    assert r.val_probs.dtype == np.float16 and r.val_probs.shape == (len(digits.val), 10)
    assert r.test_probs.dtype == np.float16 and r.test_probs.shape == (len(digits.test), 10)
    assert np.allclose(r.test_probs.astype(np.float32).sum(1), 1, atol=1e-2)
    assert r.device_seconds > 0
    model = DartsSpace().network(DARTS_V2, C=8, layers=3, num_classes=10, in_channels=1)
    assert r.num_params == sum(p.numel() for p in model.parameters())
    assert r.genotype == DARTS_V2 and r.seed == 0
    assert [h["epoch"] for h in r.history] == [1, 2, 3, 4, 5]
    # cosine schedule ends near lr_min
    assert r.history[-1]["lr"] < QUICK.lr_min + 0.01 * (QUICK.lr - QUICK.lr_min)
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]


def test_save_load_round_trip(trained, tmp_path):
    trained.save(tmp_path / "m")
    back = MemberResult.load(tmp_path / "m")
    assert back.genotype == trained.genotype and back.seed == trained.seed
    assert np.array_equal(back.val_probs, trained.val_probs)
    assert np.array_equal(back.test_probs, trained.test_probs)
    assert back.val_probs.dtype == np.float16
    assert back.metrics == trained.metrics
    assert back.device_seconds == trained.device_seconds and back.num_params == trained.num_params
    assert back.config == QUICK.to_dict() and back.history == trained.history
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        (tmp_path / "m" / "metrics.json").unlink()
        MemberResult.load(tmp_path / "m")


def test_same_seed_same_result_and_caller_rng_untouched(small):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    np_before = np.random.get_state()[1].copy()
    a = train_member(DARTS_V2, small, TINY, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert np.array_equal(np.random.get_state()[1], np_before)
    b = train_member(DARTS_V2.to_json(), small, TINY.to_dict(), seed=7)  # JSON and dict forms
    assert np.array_equal(a.val_probs, b.val_probs)
    assert np.array_equal(a.test_probs, b.test_probs)
    assert a.metrics == b.metrics
    c = train_member(DARTS_V2, small, TINY, seed=8)
    assert not np.array_equal(a.val_probs, c.val_probs)


def test_drop_path_ramps_with_epochs(small, monkeypatch):
    seen = []
    original = DartsSpace.network

    def spy(self, *args, **kwargs):
        net = original(self, *args, **kwargs)
        net.register_forward_pre_hook(lambda m, _: seen.append(m.drop_path) if m.training else None)
        return net

    monkeypatch.setattr(DartsSpace, "network", spy)
    cfg = TrainConfig(C=4, layers=2, epochs=3, batch_size=64, drop_path=0.3)
    train_member(DARTS_V2, small, cfg, seed=0)
    assert sorted(set(seen)) == pytest.approx([0.0, 0.1, 0.2])


def test_huge_lr_raises_training_diverged(small):
    cfg = TrainConfig(C=4, layers=2, epochs=3, batch_size=16, lr=1e6, grad_clip=0.0)
    with pytest.raises(TrainingDiverged, match=r"epoch 1/3, step \d+/10") as exc:
        train_member(DARTS_V2, small, cfg, seed=0)
    assert exc.value.epoch == 0 and 0 <= exc.value.step < 10


def test_train_config_defaults_and_round_trip():
    cfg = TrainConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.C, cfg.layers) == (10, 64, 0.025, 8, 5)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict({"epochs": 3, "lr": 1}) == TrainConfig(epochs=3, lr=1.0)
    assert isinstance(TrainConfig.from_dict({"lr": 1}).lr, float)


@pytest.mark.parametrize(
    "d,message",
    [
        ({"epochs": -1}, "TrainConfig.epochs: expected a positive int, got -1"),
        ({"epochs": 2.5}, "TrainConfig.epochs: expected a positive int, got 2.5"),
        ({"batch_size": True}, "TrainConfig.batch_size: expected a positive int"),
        ({"lr": "fast"}, "TrainConfig.lr: expected a positive float, got 'fast'"),
        ({"lr": 0}, "TrainConfig.lr: expected a positive float"),
        ({"lr": 0.01, "lr_min": 0.1}, "TrainConfig.lr_min"),
        ({"momentum": 1.0}, "TrainConfig.momentum"),
        ({"drop_path": 1.0}, "TrainConfig.drop_path"),
        ({"label_smoothing": -0.1}, "TrainConfig.label_smoothing"),
        ({"C": 5}, "TrainConfig.C: expected an even int"),
        ({"amp": "yes"}, "TrainConfig.amp: expected a bool"),
        ({"epoch": 3}, "TrainConfig.epoch: unknown field"),
    ],
)
def test_train_config_rejects_bad_values(d, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig.from_dict(d)


def test_cuda_paths_are_guarded_on_cpu(small, monkeypatch):
    # amp defaults to True; on the CPU autocast must never be enabled.
    calls = []
    real = torch.autocast

    def spy(device_type, *args, **kwargs):
        calls.append((device_type, kwargs.get("enabled", True)))
        return real(device_type, *args, **kwargs)

    monkeypatch.setattr(training_mod.torch, "autocast", spy)
    cfg = TrainConfig(C=4, layers=2, epochs=1, batch_size=64)
    assert cfg.amp and cfg.channels_last
    train_member(DARTS_V2, small, cfg, seed=0)
    assert calls and all(not enabled for _, enabled in calls)


def test_label_smoothing_and_grad_clip_reach_the_step(small, monkeypatch):
    smoothing, norms = [], []
    real_ce, real_clip = training_mod.F.cross_entropy, torch.nn.utils.clip_grad_norm_

    def ce(*args, **kwargs):
        smoothing.append(kwargs.get("label_smoothing"))
        return real_ce(*args, **kwargs)

    def clip(params, max_norm, *args, **kwargs):
        norms.append(max_norm)
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(training_mod.F, "cross_entropy", ce)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    cfg = TrainConfig(C=4, layers=1, epochs=1, batch_size=64, label_smoothing=0.2, grad_clip=3.0)
    train_member(DARTS_V2, small, cfg, seed=0)
    assert smoothing and set(smoothing) == {0.2}
    assert len(norms) == len(smoothing) and set(norms) == {3.0}
    norms.clear()
    train_member(DARTS_V2, small, TrainConfig(C=4, layers=1, epochs=1, grad_clip=0.0), seed=0)
    assert norms == []  # grad_clip=0 turns clipping off


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"data": "digits"}, "train_member.data: expected a DataBundle"),
        ({"device": "gpu"}, "train_member.device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        ({"seed": 1.5}, "train_member.seed: expected an int, got 1.5"),
        ({"genotype": str(DARTS_V2).replace("sep_conv_3x3", "conv_9x9", 1)},
         "Genotype.normal[0]: unknown op 'conv_9x9'"),
    ],
)
def test_train_member_rejects_bad_arguments(small, kwargs, message):
    args = {"genotype": DARTS_V2, "data": small, "config": TINY, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        train_member(**args)
