"""Data sets, splits and on-device batching.

``load_data`` returns a :class:`DataBundle`: train / val / test splits as normalised float32
tensors. The validation split is always carved out of the training data (stratified by class,
seeded), never out of the test split, so ensemble selection on ``val`` never sees test data.

Normalisation: every data set is normalised with the per-channel mean and standard deviation
of its *train* split (after the validation split has been carved out), so no statistic leaks
from validation or test data. For CIFAR-10 this lands within about 1e-3 of the published
constants (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616) (on the offline JPEG copy the
means agree to 3e-4 and the stds come out up to 2e-3 lower: JPEG smooths); one rule for every
data set is simpler than a table of constants that would not fit ImageFolder trees anyway.

Decoded images (uint8) are cached under ``$NESTUNE_CACHE_DIR`` (default ``~/.cache/nestune``)
in ``data/<name>-<key>.npz``; the key hashes the source path and the size and mtime of every
source file, so a changed data set is decoded again. The embedded ``digits`` set is not cached
(it loads in milliseconds).

Batches come from :class:`DeviceBatches`, which moves a split to the device once and does the
CIFAR-style augmentation (random crop with 4 pixels of reflect padding, horizontal flip) with
batched tensor ops on that device, with no DataLoader worker processes (after airbench).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import pickle
import struct
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "DataBundle",
    "DataNotFoundError",
    "DeviceBatches",
    "Split",
    "load_data",
    "predict_probs",
]

log = logging.getLogger(__name__)

DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder")

# Where Debian's `dataset-fashion-mnist` package puts the four idx-ubyte.gz files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# The offline CIFAR-10 JPEG copy of this workplace; only mentioned in messages when present.
_CIFAR10_UNPACK = Path("/work/shared/data/cifar10/unpack.py")

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CACHE_FORMAT = 1  # bump when the cached arrays change meaning
_DIGITS_TEST_FRACTION = 0.25
_DIGITS_SPLIT_SEED = 0  # fixed: the digits test split must not move with the val seed


class DataNotFoundError(FileNotFoundError):
    """The data set's files are not where they were looked for; the message says how to get them."""


@dataclass
class Split:
    """One split: ``x`` (N, C, H, W) float32, already normalised; ``y`` (N,) int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise ValueError(f"Split.x: expected a (N, C, H, W) tensor, got shape {tuple(self.x.shape)}")
        if self.y.ndim != 1 or len(self.y) != len(self.x):
            raise ValueError(
                f"Split.y: expected a ({len(self.x)},) tensor, got shape {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataBundle:
    """A data set ready for training: train / val / test splits plus what a network needs to know.

    ``augment`` is True for 32x32 RGB images, where random crop (pad 4) + horizontal flip is the
    standard recipe. ``mean``/``std`` are the per-channel normalisation constants (on the [0, 1]
    pixel scale) that were applied to every split.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    shape: tuple[int, int, int]
    augment: bool
    classes: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    source: str = ""
    cache_file: str | None = None
    cache_hit: bool = False


# ----------------------------------------------------------------------------------- raw loading


@dataclass
class _Raw:
    """Decoded images before splitting: uint8 (N, H, W, C) arrays and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    scale: float = 255.0  # pixel value that maps to 1.0
    source: str = ""


def _default_cache_dir() -> Path:
    return Path(os.environ.get("NESTUNE_CACHE_DIR", "~/.cache/nestune")).expanduser()


def _default_data_root() -> Path:
    return Path(os.environ.get("NESTUNE_DATA_DIR", "~/.cache/nestune/datasets")).expanduser()


def _file_stats(paths: list[Path], base: Path) -> list[tuple[str, int, int]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.relative_to(base)), st.st_size, st.st_mtime_ns))
    return out


def _cache_key(name: str, base: Path, stats: list[tuple[str, int, int]]) -> str:
    payload = json.dumps(
        {"format": _CACHE_FORMAT, "name": name, "base": str(base.resolve()), "files": stats},
        sort_keys=True,
    )
    return hashlib.sha1(payload.encode()).hexdigest()[:20]


def _cached(
    name: str, base: Path, stats: list[tuple[str, int, int]], decode, cache_dir: Path | None
) -> tuple[_Raw, str | None, bool]:
    """Return the decoded data, from the cache when its key matches, else decode and store.

    ``stats`` is (relative path, size, mtime_ns) of every source file: the cache key.
    """
    if cache_dir is None:
        return decode(), None, False
    path = cache_dir / "data" / f"{name}-{_cache_key(name, base, stats)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                raw = _Raw(
                    x_train=z["x_train"],
                    y_train=z["y_train"],
                    x_test=z["x_test"],
                    y_test=z["y_test"],
                    classes=tuple(str(c) for c in z["classes"]),
                    scale=float(z["scale"]),
                    source=str(z["source"]),
                )
            return raw, str(path), True
        except (OSError, KeyError, ValueError) as exc:  # a truncated or foreign file: rebuild it
            log.warning("ignoring unreadable data cache %s (%s)", path, exc)
    raw = decode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written under a unique name then renamed: concurrent trials may load the same data.
        tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npz")
        np.savez(
            tmp,
            x_train=raw.x_train,
            y_train=raw.y_train,
            x_test=raw.x_test,
            y_test=raw.y_test,
            classes=np.array(raw.classes, dtype=str),
            scale=np.float64(raw.scale),
            source=np.array(raw.source),
        )
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop a study
        log.warning("could not write data cache %s (%s)", path, exc)
        return raw, None, False
    return raw, str(path), False


def _load_digits() -> _Raw:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.uint8)[..., None]  # values 0..16
    y = d.target.astype(np.int64)
    # digits has no official test split: a fixed, stratified 25 % is held out.
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=_DIGITS_TEST_FRACTION, random_state=_DIGITS_SPLIT_SEED, stratify=y
    )
    return _Raw(x_tr, y_tr, x_te, y_te, tuple(str(i) for i in range(10)), 16.0, "sklearn digits")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} values, found {arr.size}")
    return arr.reshape(dims).copy()  # frombuffer is read-only; torch wants writable memory


_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def _find_fashion(dirs: list[Path]) -> tuple[Path, dict[str, Path]] | None:
    for d in dirs:
        found = {}
        for key, stem in _FASHION_FILES.items():
            for cand in (d / f"{stem}.gz", d / stem):
                if cand.is_file():
                    found[key] = cand
                    break
        if len(found) == len(_FASHION_FILES):
            return d, found
    return None


def _load_fashion_mnist(root: Path | None, download: bool, cache_dir: Path | None):
    base_root = root if root is not None else _default_data_root()
    dirs = [base_root, base_root / "FashionMNIST" / "raw"]
    if root is None:
        dirs.insert(0, DEBIAN_FASHION_MNIST)
    hit = _find_fashion(dirs)
    if hit is None and download:
        import torchvision

        torchvision.datasets.FashionMNIST(str(base_root), train=True, download=True)
        hit = _find_fashion(dirs)
    if hit is None:
        looked = ", ".join(str(d) for d in dirs)
        raise DataNotFoundError(
            f"fashion_mnist: no {', '.join(_FASHION_FILES.values())} (.gz or not) in: {looked}. "
            "Install Debian's copy with `apt-get install dataset-fashion-mnist` (files in "
            f"{DEBIAN_FASHION_MNIST}), or pass root=DIR with download=True to fetch torchvision's "
            "copy into DIR/FashionMNIST/raw."
        )
    base, files = hit

    def decode() -> _Raw:
        arrays = {k: _read_idx(p) for k, p in files.items()}
        return _Raw(
            arrays["x_train"][..., None],
            arrays["y_train"].astype(np.int64),
            arrays["x_test"][..., None],
            arrays["y_test"].astype(np.int64),
            _FASHION_CLASSES,
            source=str(base),
        )

    stats = _file_stats(sorted(files.values()), base)
    return _cached("fashion_mnist", base, stats, decode, cache_dir)


_CIFAR = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        ("batches.meta", "label_names"),
        10,
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "fine_labels",
        ("meta", "fine_label_names"),
        100,
    ),
}


def _read_cifar_batches(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for p in paths:
        with open(p, "rb") as f:
            # torchvision's own format is a pickle; this is the reader torchvision uses too.
            entry = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry[label_key], dtype=np.int64))
    return np.concatenate(xs).transpose(0, 2, 3, 1).copy(), np.concatenate(ys)


def _load_cifar(name: str, root: Path | None, download: bool, cache_dir: Path | None):
    folder, train_files, test_files, label_key, (meta_file, meta_key), n_classes = _CIFAR[name]
    base_root = root if root is not None else _default_data_root()
    base = base_root / folder
    needed = [base / f for f in train_files + test_files]
    if not all(p.is_file() for p in needed):
        if root is not None and (root / "train").is_dir() and (root / "test").is_dir():
            # An ImageFolder tree (e.g. the unpacked JPEG copy of CIFAR-10) under the same name.
            return _load_imagefolder(root, cache_dir, name=name)
        if download:
            import torchvision

            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            cls(str(base_root), train=True, download=True)
        if not all(p.is_file() for p in needed):
            hint = f"pass root=DIR with download=True to fetch torchvision's copy into DIR/{folder}"
            if name == "cifar10" and _CIFAR10_UNPACK.is_file():
                hint += (
                    f", or unpack the offline JPEG copy with `python {_CIFAR10_UNPACK} DEST` and "
                    "pass root=DEST"
                )
            raise DataNotFoundError(
                f"{name}: looked for torchvision's files {', '.join(train_files + test_files)} in "
                f"{base} and for an ImageFolder tree (train/, test/) in {base_root}; none found. "
                f"To get the data, {hint}."
            )

    def decode() -> _Raw:
        x_tr, y_tr = _read_cifar_batches([base / f for f in train_files], label_key)
        x_te, y_te = _read_cifar_batches([base / f for f in test_files], label_key)
        classes: tuple[str, ...] = tuple(str(i) for i in range(n_classes))
        meta = base / meta_file
        if meta.is_file():
            with open(meta, "rb") as f:
                classes = tuple(pickle.load(f, encoding="latin1")[meta_key])
        return _Raw(x_tr, y_tr, x_te, y_te, classes, source=str(base))

    return _cached(name, base, _file_stats(needed, base), decode, cache_dir)


def _list_images(
    root: Path, split: str, classes: list[str]
) -> tuple[list[tuple[str, int]], list[tuple[str, int, int]]]:
    """(path, label) of every image under root/split/<class>/, and each file's cache stats."""
    items, stats = [], []
    for label, cls in enumerate(classes):
        d = root / split / cls
        if not d.is_dir():
            continue
        # os.scandir and plain strings: pathlib costs seconds on 60k files.
        with os.scandir(d) as it:
            entries = sorted((e for e in it if e.name.lower().endswith(_IMAGE_EXTENSIONS)),
                             key=lambda e: e.name)
        for e in entries:
            if e.is_file():
                st = e.stat()
                items.append((e.path, label))
                stats.append((f"{split}/{cls}/{e.name}", st.st_size, st.st_mtime_ns))
    return items, stats


def _decode_image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("1", "L", "I", "I;16", "F"):
            arr = np.asarray(im.convert("L"))[..., None]
        else:
            arr = np.asarray(im.convert("RGB"))
    return arr


def _decode_images(items: list[tuple[str, int]], expected: tuple[int, int] | None) -> np.ndarray:
    # PIL releases the GIL while decoding, so threads give a real speed-up on 60k small JPEGs.
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(_decode_image, [p for p, _ in items], chunksize=256))
    size = expected or arrays[0].shape[:2]
    for (p, _), a in zip(items, arrays, strict=True):
        if a.shape[:2] != tuple(size):
            raise ValueError(
                f"imagefolder: all images must have the same size; {p} is "
                f"{a.shape[1]}x{a.shape[0]} (WxH), expected {size[1]}x{size[0]} "
                f"(the size of {items[0][0]})"
            )
    channels = max(a.shape[2] for a in arrays)
    if channels == 3:  # grayscale files in a colour data set are broadcast to RGB
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    return np.stack(arrays)


def _load_imagefolder(root: Path | None, cache_dir: Path | None, name: str = "imagefolder"):
    if root is None:
        raise DataNotFoundError(
            f"{name}: pass root=DIR, a folder holding train/<class>/* and test/<class>/* images"
            + _unpack_hint()
        )
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise DataNotFoundError(
            f"{name}: expected {train_dir} and {test_dir}, each holding one folder of images per "
            "class" + _unpack_hint()
        )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataNotFoundError(f"{name}: no class folders in {train_dir}")
    extra = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        raise ValueError(f"{name}: test classes {extra} in {test_dir} have no folder in {train_dir}")
    train_items, train_stats = _list_images(root, "train", classes)
    test_items, test_stats = _list_images(root, "test", classes)
    if not train_items or not test_items:
        empty = train_dir if not train_items else test_dir
        raise DataNotFoundError(f"{name}: no images ({', '.join(_IMAGE_EXTENSIONS)}) under {empty}")

    def decode() -> _Raw:
        x_tr = _decode_images(train_items, None)
        x_te = _decode_images(test_items, x_tr.shape[1:3])
        if x_te.shape[3] != x_tr.shape[3]:  # one split grayscale, the other colour
            c = max(x_tr.shape[3], x_te.shape[3])
            x_tr, x_te = np.repeat(x_tr, c // x_tr.shape[3], 3), np.repeat(x_te, c // x_te.shape[3], 3)
        y_tr = np.array([y for _, y in train_items], dtype=np.int64)
        y_te = np.array([y for _, y in test_items], dtype=np.int64)
        return _Raw(x_tr, y_tr, x_te, y_te, tuple(classes), source=str(root))

    # Keyed as "imagefolder" whatever the name it was asked under (cifar10 on a JPEG tree), so
    # one decoded copy serves both.
    return _cached("imagefolder", root, train_stats + test_stats, decode, cache_dir)


def _unpack_hint() -> str:
    if _CIFAR10_UNPACK.is_file():
        return (
            f". For CIFAR-10, `python {_CIFAR10_UNPACK} DEST` writes such a tree from the offline "
            "copy; then pass root=DEST"
        )
    return ""


# ----------------------------------------------------------------------------------- splitting


def _carve_val(
    y: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (train, val) of a seeded split of ``y``, stratified by class.

    Each class gives its proportional share of the ``round(val_fraction * n)`` validation
    samples; the shares' rounding remainders go to the classes with the largest fractional
    parts, ties broken at random.
    """
    n = len(y)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    rng = np.random.default_rng(seed)
    labels, inverse = np.unique(y, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(labels))
    ideal = counts * (n_val / n)
    take = np.floor(ideal).astype(np.int64)
    short = n_val - int(take.sum())
    if short > 0:
        frac = ideal - take + rng.random(len(labels)) * 1e-9
        take[np.argsort(-frac, kind="stable")[:short]] += 1
    val = []
    for k in range(len(labels)):
        members = np.flatnonzero(inverse == k)
        val.append(rng.permutation(members)[: take[k]])
    val_idx = np.sort(np.concatenate(val))
    mask = np.ones(n, dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


def _subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded, stratified-where-possible choice of ``size`` indices of ``y``."""
    if size >= len(y):
        return np.arange(len(y))
    _, keep = _carve_val(y, size / len(y), seed + 7919)  # a different stream than the val split
    return keep


def _channel_stats(x: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and std of uint8 (N, H, W, C) images, on the [0, scale] -> [0, 1]
    scale, from 256-bin histograms (float64 over 10^8 pixels is seconds; this is milliseconds)."""
    values = np.arange(256, dtype=np.float64) / scale
    mean, std = [], []
    for c in range(x.shape[-1]):
        hist = np.bincount(x[..., c].ravel(), minlength=256).astype(np.float64)
        total = hist.sum()
        m = float(hist @ values / total)
        var = float(hist @ (values - m) ** 2 / total)
        mean.append(m)
        std.append(np.sqrt(var) if var > 1e-16 else 1.0)  # a constant channel: don't divide by 0
    return np.array(mean), np.array(std)


def _to_tensor(x: np.ndarray, scale: float, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    # Transpose while still uint8 (a quarter of the memory traffic), then one float pass.
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous().float()
    a = torch.as_tensor(1.0 / (scale * std), dtype=torch.float32).view(1, -1, 1, 1)
    b = torch.as_tensor(mean / std, dtype=torch.float32).view(1, -1, 1, 1)
    return t.mul_(a).sub_(b)


def load_data(
    name: str = "digits",
    root: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    download: bool = False,
    subset: int | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
) -> DataBundle:
    """Load a data set as normalised train / val / test splits.

    Args:
        name: ``digits`` (sklearn, embedded; a fixed 25 % test split), ``fashion_mnist``
            (Debian's ``dataset-fashion-mnist`` or torchvision's files under ``root``),
            ``cifar10`` / ``cifar100`` (torchvision's format under ``root``, or an ImageFolder
            tree at ``root``), ``imagefolder`` (``root/train/<class>/*``, ``root/test/<class>/*``).
        root: where the files are; see ``name``.
        val_fraction: share of the training pool held out as the validation split, in (0, 1).
        seed: seed of the validation split (and of ``subset``). Members that are to be
            ensembled together must share it, so that they are selected on the same data.
        download: let torchvision download fashion_mnist / cifar into ``root`` when missing.
        subset: cap on the size of the training pool (train + val), chosen seeded and
            stratified; the test split is kept whole.
        cache_dir: where decoded images are cached (default ``$NESTUNE_CACHE_DIR`` or
            ``~/.cache/nestune``); ``cache=False`` turns the cache off.
    """
    key = str(name).lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"load_data.name: expected one of {', '.join(DATASETS)}, got {name!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
        0.0 < val_fraction < 1.0
    ):
        raise ValueError(f"load_data.val_fraction: expected a float in (0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"load_data.seed: expected an int, got {seed!r}")
    if subset is not None and (
        isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < 2
    ):
        raise ValueError(f"load_data.subset: expected None or an int >= 2, got {subset!r}")
    root_path = Path(root).expanduser() if root is not None else None
    cdir = None
    if cache:
        cdir = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()

    cache_file, cache_hit = None, False
    if key == "digits":
        raw = _load_digits()
    elif key == "fashion_mnist":
        raw, cache_file, cache_hit = _load_fashion_mnist(root_path, download, cdir)
    elif key in _CIFAR:
        raw, cache_file, cache_hit = _load_cifar(key, root_path, download, cdir)
    else:
        raw, cache_file, cache_hit = _load_imagefolder(root_path, cdir)

    x_pool, y_pool = raw.x_train, raw.y_train
    if subset is not None:
        keep = _subset(y_pool, int(subset), int(seed))
        x_pool, y_pool = x_pool[keep], y_pool[keep]
    tr, va = _carve_val(y_pool, float(val_fraction), int(seed))

    x_tr = x_pool[tr]
    mean, std = _channel_stats(x_tr, raw.scale)

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        return Split(_to_tensor(x, raw.scale, mean, std), torch.from_numpy(y.astype(np.int64)))

    c, h, w = int(x_tr.shape[3]), int(x_tr.shape[1]), int(x_tr.shape[2])
    num_classes = max(len(raw.classes), int(max(raw.y_train.max(), raw.y_test.max())) + 1)
    return DataBundle(
        name=key,
        train=split(x_tr, y_pool[tr]),
        val=split(x_pool[va], y_pool[va]),
        test=split(raw.x_test, raw.y_test),
        num_classes=num_classes,
        in_channels=c,
        shape=(c, h, w),
        augment=(c == 3 and (h, w) == (32, 32)),
        classes=raw.classes,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        source=raw.source,
        cache_file=cache_file,
        cache_hit=cache_hit,
    )


# ----------------------------------------------------------------------------------- batching


def _augment_batch(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor, pad: int):
    """Random crop (reflect padding) + horizontal flip of a whole batch with gathers, no loop."""
    b, c, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        rows = (dy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        x = padded.gather(2, rows.expand(b, c, h, w + 2 * pad))
        cols = (dx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        x = x.gather(3, cols.expand(b, c, h, w))
    return torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)


class DeviceBatches:
    """Iterate (x, y) batches of a split that was moved to ``device`` once.

    Each iteration is one epoch; with ``shuffle`` every epoch draws a new order from the seeded
    generator, so a fixed ``seed`` gives the same sequence of epochs on every run. ``augment``
    applies random crop (``pad`` pixels, reflect padding) and horizontal flip on the device.
    ``len()`` is the number of batches per epoch. ``drop_last`` defaults to False (evaluation
    must see every sample).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        device: str | torch.device = "cpu",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        pad: int = 4,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"DeviceBatches.batch_size: expected a positive int, got {batch_size!r}")
        self.device = torch.device(device)
        self.x = split.x.to(self.device, non_blocking=True)
        self.y = split.y.to(self.device, non_blocking=True)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.pad = min(pad, self.x.shape[2] - 1, self.x.shape[3] - 1)  # reflect needs pad < size
        if generator is None:
            # Without a seed, draw one from torch's global RNG so torch.manual_seed still governs.
            s = int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item())
            generator = torch.Generator().manual_seed(s)
        self.generator = generator

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        # Randomness is drawn on the CPU generator (same numbers on every device), once per epoch.
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        if self.augment:
            span = 2 * self.pad + 1
            dx = torch.randint(0, span, (n,), generator=self.generator).to(self.device)
            dy = torch.randint(0, span, (n,), generator=self.generator).to(self.device)
            flip = (torch.rand(n, generator=self.generator) < 0.5).to(self.device)
        if order is not None:
            order = order.to(self.device)
        for i in range(len(self)):
            lo, hi = i * self.batch_size, min(n, (i + 1) * self.batch_size)
            if order is None:
                xb, yb = self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                xb, yb = self.x[idx], self.y[idx]
            if self.augment:
                xb = _augment_batch(xb, dx[lo:hi], dy[lo:hi], flip[lo:hi], self.pad)
            yield xb, yb


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module,
    split: Split,
    device: str | torch.device = "cpu",
    batch_size: int = 1024,
    *,
    amp: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """Class probabilities (N, C) float32 on the CPU, in eval mode and without gradients.

    ``amp`` (bf16 autocast) and ``channels_last`` only act on CUDA. The model's train/eval
    mode is restored afterwards.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    was_training = model.training
    model.eval()
    out = []
    try:
        for xb, _ in DeviceBatches(split, batch_size, shuffle=False, augment=False, device=device):
            if cuda and channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and amp):
                logits = model(xb)
            out.append(torch.softmax(logits.float(), dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out).cpu() if out else torch.empty(0, 0)
