"""Data loading, splits, caching and on-device batching (CPU, tiny data)."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from nestune.platform import data as data_mod
from nestune.platform.data import (
    DATASETS,
    DataNotFoundError,
    DeviceBatches,
    Split,
    load_data,
    predict_probs,
)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def _raw_rows(split: Split, bundle, scale: float) -> list[bytes]:
    """Undo the normalisation and hash each image, so rows compare across splits and seeds."""
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    raw = torch.round((split.x * std + mean) * scale).to(torch.uint8).numpy()
    return [hashlib.sha1(r.tobytes()).hexdigest() for r in raw]


def test_digits_shapes_and_sizes(digits):
    assert digits.name == "digits"
    assert digits.num_classes == 10 and digits.in_channels == 1
    assert digits.shape == (1, 8, 8) and digits.augment is False
    n_pool = len(digits.train) + len(digits.val)
    assert n_pool + len(digits.test) == 1797
    assert len(digits.test) == 450  # fixed 25 % test split
    assert len(digits.val) == round(0.2 * n_pool)
    for s in (digits.train, digits.val, digits.test):
        assert s.x.dtype == torch.float32 and s.y.dtype == torch.int64
        assert s.x.shape[1:] == (1, 8, 8)
    # normalised with the train split's own statistics
    assert abs(float(digits.train.x.mean())) < 1e-4
    assert abs(float(digits.train.x.std()) - 1) < 1e-2


def test_splits_disjoint_val_from_train_and_test_fixed(digits):
    other = load_data("digits", seed=1)
    h = {k: _raw_rows(getattr(digits, k), digits, 16) for k in ("train", "val", "test")}
    h1 = {k: _raw_rows(getattr(other, k), other, 16) for k in ("train", "val", "test")}
    assert all(len(set(v)) == len(v) for v in h.values())  # digits has no duplicate images
    assert not set(h["train"]) & set(h["val"])
    assert not set(h["test"]) & (set(h["train"]) | set(h["val"]))
    # the pool (train + val) and the test split do not move with the seed; only the val carve does
    assert set(h["train"]) | set(h["val"]) == set(h1["train"]) | set(h1["val"])
    assert set(h["test"]) == set(h1["test"])
    assert set(h["val"]) != set(h1["val"])
    every = {hashlib.sha1(im.astype(np.uint8).tobytes()).hexdigest() for im in load_digits().images}
    assert set(h["train"]) | set(h["val"]) | set(h["test"]) == every


def test_val_is_stratified_and_seeded(digits):
    again = load_data("digits", seed=0)
    assert torch.equal(again.val.x, digits.val.x) and torch.equal(again.val.y, digits.val.y)
    counts = torch.bincount(digits.val.y, minlength=10)
    assert int(counts.max() - counts.min()) <= 1


def test_subset_caps_training_pool():
    b = load_data("digits", subset=200, val_fraction=0.25)
    assert len(b.train) + len(b.val) == 200
    assert len(b.val) == 50
    assert len(b.test) == 450
    assert torch.bincount(b.train.y, minlength=10).min() >= 14  # stratified, every class present


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, "0.2"])
def test_val_fraction_out_of_range(bad):
    with pytest.raises(ValueError, match="val_fraction"):
        load_data("digits", val_fraction=bad)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        load_data("mnist-ish")
    for name in DATASETS:
        assert name in str(exc.value)


# ----------------------------------------------------------------------------- ImageFolder


def _write_tree(root, classes=("cat", "dog", "emu"), n_train=8, n_test=3, size=(6, 6), mode="RGB"):
    rng = np.random.default_rng(0)
    c = 3 if mode == "RGB" else 1
    for split, n in (("train", n_train), ("test", n_test)):
        for label, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(size[1], size[0], c), dtype=np.uint8)
                arr[0, 0, 0] = label  # a marker to check labels against
                Image.fromarray(arr[..., 0] if c == 1 else arr, mode).save(d / f"{i:03d}.png")


def test_imagefolder_loads_tiny_tree(tmp_path):
    _write_tree(tmp_path / "tree")
    b = load_data("imagefolder", root=tmp_path / "tree", val_fraction=0.25, cache_dir=tmp_path / "c")
    assert b.classes == ("cat", "dog", "emu")
    assert b.num_classes == 3 and b.in_channels == 3 and b.shape == (3, 6, 6)
    assert b.augment is False
    assert len(b.train) == 18 and len(b.val) == 6 and len(b.test) == 9
    # the marker pixel is the label, so labels and pixels travelled together
    for s in (b.train, b.val, b.test):
        marker = torch.round((s.x[:, 0, 0, 0] * b.std[0] + b.mean[0]) * 255)
        assert torch.equal(marker.long(), s.y)


def test_imagefolder_grayscale_and_32x32_rgb(tmp_path):
    _write_tree(tmp_path / "g", classes=("a", "b"), n_train=4, n_test=2, size=(5, 7), mode="L")
    g = load_data("imagefolder", root=tmp_path / "g", cache=False)
    assert g.shape == (1, 7, 5) and g.in_channels == 1
    _write_tree(tmp_path / "c", classes=("a", "b"), n_train=4, n_test=2, size=(32, 32))
    c = load_data("imagefolder", root=tmp_path / "c", cache=False)
    assert c.shape == (3, 32, 32) and c.augment is True


def test_cifar_name_accepts_an_imagefolder_tree(tmp_path):
    # what `unpack.py DEST` of the offline JPEG copy writes: DEST/train/<class>/, DEST/test/<class>/
    _write_tree(tmp_path / "jpeg", classes=("airplane", "automobile"), n_train=3, n_test=2, size=(32, 32))
    b = load_data("cifar10", root=tmp_path / "jpeg", cache_dir=tmp_path / "c")
    assert b.name == "cifar10" and b.shape == (3, 32, 32) and b.augment is True
    assert b.classes == ("airplane", "automobile")
    # one decoded copy of the tree, whichever name loads it
    again = load_data("imagefolder", root=tmp_path / "jpeg", cache_dir=tmp_path / "c")
    assert again.cache_hit and again.cache_file == b.cache_file
    assert torch.equal(again.test.x, b.test.x)


def test_imagefolder_size_mismatch_names_file(tmp_path):
    _write_tree(tmp_path / "t", classes=("a", "b"), n_train=3, n_test=2)
    odd = tmp_path / "t" / "train" / "b" / "zz_odd.png"
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(odd)
    with pytest.raises(ValueError, match="zz_odd.png"):
        load_data("imagefolder", root=tmp_path / "t", cache=False)


def test_second_load_hits_cache_and_changes_invalidate_it(tmp_path, monkeypatch):
    root, cache = tmp_path / "tree", tmp_path / "cache"
    _write_tree(root)
    first = load_data("imagefolder", root=root, cache_dir=cache)
    assert first.cache_hit is False and first.cache_file and os.path.isfile(first.cache_file)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data_mod, "_decode_images", no_decoding)
    second = load_data("imagefolder", root=root, cache_dir=cache)
    assert second.cache_hit is True and second.cache_file == first.cache_file
    for k in ("train", "val", "test"):
        assert torch.equal(getattr(first, k).x, getattr(second, k).x)
        assert torch.equal(getattr(first, k).y, getattr(second, k).y)

    monkeypatch.undo()
    extra = root / "train" / "cat" / "new.png"
    Image.fromarray(np.full((6, 6, 3), 7, dtype=np.uint8)).save(extra)
    third = load_data("imagefolder", root=root, cache_dir=cache)
    assert third.cache_hit is False and len(third.train) + len(third.val) == 25


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    _write_tree(tmp_path / "tree", classes=("a", "b"), n_train=2, n_test=1)
    monkeypatch.setenv("NESTUNE_CACHE_DIR", str(tmp_path / "envcache"))
    b = load_data("imagefolder", root=tmp_path / "tree")
    assert b.cache_file and b.cache_file.startswith(str(tmp_path / "envcache"))


# ------------------------------------------------------------------ fashion_mnist and cifar files


def _write_idx(path, arr: np.ndarray):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x_tr, x_te = rng.integers(0, 256, (40, 28, 28)), rng.integers(0, 256, (12, 28, 28))
    y_tr, y_te = np.arange(40) % 10, np.arange(12) % 10
    _write_idx(raw / "train-images-idx3-ubyte.gz", x_tr)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", y_tr)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", x_te)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", y_te)
    b = load_data("fashion_mnist", root=tmp_path, cache_dir=tmp_path / "c")
    assert b.shape == (1, 28, 28) and b.num_classes == 10 and b.augment is False
    assert len(b.train) + len(b.val) == 40 and len(b.test) == 12
    assert torch.equal(b.test.y, torch.from_numpy(y_te))
    restored = torch.round((b.test.x * b.std[0] + b.mean[0]) * 255).squeeze(1).long()
    assert torch.equal(restored, torch.from_numpy(x_te))
    assert load_data("fashion_mnist", root=tmp_path, cache_dir=tmp_path / "c").cache_hit


def test_fashion_mnist_from_debian_location(tmp_path, monkeypatch):
    # Debian's dataset-fashion-mnist: the four .gz files flat in /usr/share/datasets/fashion-mnist,
    # read when no root is given.
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    debian.mkdir()
    rng = np.random.default_rng(1)
    x_tr, x_te = rng.integers(0, 256, (30, 28, 28)), rng.integers(0, 256, (10, 28, 28))
    _write_idx(debian / "train-images-idx3-ubyte.gz", x_tr)
    _write_idx(debian / "train-labels-idx1-ubyte.gz", np.arange(30) % 10)
    _write_idx(debian / "t10k-images-idx3-ubyte.gz", x_te)
    _write_idx(debian / "t10k-labels-idx1-ubyte.gz", np.arange(10))
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", debian)
    monkeypatch.setenv("NESTUNE_DATA_DIR", str(tmp_path / "empty"))
    b = load_data("fashion_mnist", cache=False)
    assert b.source == str(debian) and b.classes[0] == "T-shirt/top"
    assert len(b.train) + len(b.val) == 30 and torch.equal(b.test.y, torch.arange(10))


def test_cifar10_torchvision_format(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), "labels": list(range(6))}
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    b = load_data("cifar10", root=tmp_path, cache=False)
    assert b.shape == (3, 32, 32) and b.augment is True and b.num_classes == 10
    assert len(b.train) + len(b.val) == 30 and len(b.test) == 6
    assert b.classes[3] == "c3"


# ----------------------------------------------------------------------------- missing data


def test_missing_imagefolder_says_where_and_how(tmp_path):
    with pytest.raises(DataNotFoundError) as exc:
        load_data("imagefolder", root=tmp_path / "nowhere")
    assert isinstance(exc.value, FileNotFoundError)
    assert str(tmp_path / "nowhere" / "train") in str(exc.value)
    with pytest.raises(DataNotFoundError, match="root"):
        load_data("imagefolder")


def test_missing_fashion_mnist_says_where_and_how(tmp_path):
    with pytest.raises(DataNotFoundError) as exc:
        load_data("fashion_mnist", root=tmp_path)
    msg = str(exc.value)
    assert str(tmp_path) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download=True" in msg


@pytest.mark.parametrize(
    "name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_missing_cifar_says_where_and_how(tmp_path, name, folder):
    with pytest.raises(DataNotFoundError) as exc:
        load_data(name, root=tmp_path)
    msg = str(exc.value)
    assert str(tmp_path / folder) in msg and "download=True" in msg


# ----------------------------------------------------------------------------- batching


def _indexed_split(n: int, size: int = 8) -> Split:
    """x[i] is filled with i, so every batch says which samples it holds."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return Split(x, torch.arange(n))


def test_device_batches_cover_every_sample_once_per_epoch():
    split = _indexed_split(103)
    batches = DeviceBatches(split, 16, shuffle=True, augment=False, device="cpu", seed=3)
    assert len(batches) == 7
    epochs = []
    for _ in range(2):
        ys = [yb for _, yb in batches]
        assert [len(y) for y in ys] == [16] * 6 + [7]  # no drop-last by default
        seen = torch.cat(ys)
        assert sorted(seen.tolist()) == list(range(103))
        xs = torch.cat([xb[:, 0, 0, 0] for xb, _ in batches])
        assert sorted(xs.long().tolist()) == list(range(103))
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])  # a new order each epoch
    again = DeviceBatches(split, 16, shuffle=True, device="cpu", seed=3)
    assert torch.equal(torch.cat([y for _, y in again]), epochs[0])  # same seed, same order
    plain = DeviceBatches(split, 16, device="cpu")
    assert torch.equal(torch.cat([y for _, y in plain]), torch.arange(103))
    dropped = DeviceBatches(split, 16, shuffle=True, drop_last=True, device="cpu", seed=0)
    assert len(dropped) == 6 and sum(len(y) for _, y in dropped) == 96


def test_augmentation_keeps_shape_labels_and_is_a_crop_or_flip():
    n = 37
    x = torch.randn(n, 3, 32, 32)
    split = Split(x, torch.arange(n))
    batches = DeviceBatches(split, 10, shuffle=True, augment=True, device="cpu", seed=0)
    for xb, yb in batches:
        assert xb.shape == (len(yb), 3, 32, 32)
        for img, i in zip(xb, yb.tolist(), strict=True):
            # every output is a 32x32 window of the reflect-padded original or of its mirror
            padded = F.pad(x[i : i + 1], (4, 4, 4, 4), mode="reflect")[0]
            found = any(
                torch.equal(img, cand[:, dy : dy + 32, dx : dx + 32])
                for cand in (padded, padded.flip(2))
                for dy in range(9)
                for dx in range(9)
            )
            assert found


def test_augment_batch_matches_per_image_reference():
    x = torch.randn(6, 2, 8, 8)
    dx, dy = torch.tensor([0, 1, 2, 3, 4, 2]), torch.tensor([4, 3, 2, 1, 0, 2])
    flip = torch.tensor([True, False, True, False, True, False])
    out = data_mod._augment_batch(x, dx, dy, flip, pad=2)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(6):
        ref = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        ref = ref.flip(2) if flip[i] else ref
        assert torch.equal(out[i], ref)


def test_predict_probs(digits):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Dropout(0.5))
    model.train()
    p = predict_probs(model, digits.test, "cpu", batch_size=100)
    assert p.shape == (450, 10) and p.dtype == torch.float32 and not p.requires_grad
    assert torch.allclose(p.sum(1), torch.ones(450))
    assert model.training  # mode restored
    assert torch.equal(p, predict_probs(model, digits.test, "cpu"))  # eval mode: no dropout
