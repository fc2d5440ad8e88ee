"""Dataset shift, CIFAR-10-C style: image corruptions at severities 0-5, and how ensembles fare.

The NES paper's central claim is about shift, so a member's test predictions are also stored on
corrupted copies of the test split, and the report scores every ensemble on them without
retraining anything.

Corruptions (Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations"; parameters from their ``make_cifar_c.py``, the CIFAR-10-C set,
severity 1..5; severity 0 is the clean image):

=================  ===================================  =====================================
name               parameter per severity 1..5           how
=================  ===================================  =====================================
gaussian_noise     sigma .04 .06 .08 .09 .10             ``v2.functional.gaussian_noise``
shot_noise         photons 500 250 100 75 50             Poisson(x c) / c (no torchvision op)
gaussian_blur      sigma .4 .6 .7 .8 1 (px at 32 px)     ``v2.functional.gaussian_blur``
contrast           factor .75 .5 .4 .3 .15               ``v2.functional.adjust_contrast``
brightness         +V .05 .1 .15 .2 .3 (HSV value)       V shift, hue and saturation kept
jpeg               quality 80 65 58 50 40                ``v2.functional.jpeg``
pixelate           scale .95 .9 .85 .75 .65              ``v2.functional.resize`` down, up
=================  ===================================  =====================================

Where this differs from CIFAR-10-C, and why:

* ``contrast`` blends towards the mean of the grayscale image (torchvision's definition); the
  original blends each channel towards its own mean. On grayscale data both are the same.
* ``brightness`` adds to the HSV value as the original does, written as the equivalent
  per-pixel rescaling ``x * min(V + c, 1) / V`` (``V = max over channels``); torchvision's
  ``adjust_brightness`` multiplies every pixel by one factor, which is another corruption.
* ``gaussian_blur`` sigmas are CIFAR's in pixels for images up to 32 px and grow in proportion
  for larger images; the kernel spans +-4 sigma as ``skimage.filters.gaussian`` does, with
  reflect padding (skimage: nearest).
* ``pixelate`` shrinks with antialiased bilinear resampling and enlarges with nearest neighbour
  (PIL's BOX filter both ways in the original; torchvision's tensor resize has no BOX).
* Images are not quantised to uint8 afterwards except by ``jpeg`` itself.

Everything operates on un-normalised images in [0, 1], shape ``(N, C, H, W)``, with C = 1 or 3
(the data module normalises; :func:`denormalise` / :func:`normalise` convert with the
DataBundle's ``mean``/``std``). Corruptions are computed on the CPU from a seed, so the same
``(seed, name, severity)`` gives bit-identical images on every machine, and the noise of one
corruption and severity does not depend on which others were computed first.
"""

from __future__ import annotations

import json
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2.functional as TF

from nestune.platform import metrics as M
from nestune.platform.data import DataBundle, Split, predict_probs
from nestune.platform.ensemble import forward_select

__all__ = [
    "CORRUPTIONS",
    "SHIFT_DEFAULT",
    "SEVERITIES",
    "SHIFT_FILE",
    "SHIFT_VAL_FILE",
    "corrupt",
    "denormalise",
    "normalise",
    "shifted_split",
    "shifted_sets",
    "predict_shifted",
    "save_shifted",
    "load_shifted",
    "store_shifted",
    "shift_options",
    "store_member_shift",
    "shift_metrics",
    "forward_select_shifted",
    "severity_summary",
]

#: Severity parameters for severities 1..5 (index severity - 1), CIFAR-10-C's.
CORRUPTIONS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "jpeg": (80, 65, 58, 50, 40),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
}

#: The corruptions a member is scored on unless told otherwise (all of :data:`CORRUPTIONS`).
SHIFT_DEFAULT: list[str] = list(CORRUPTIONS)

#: The shifted severities predicted by default (severity 0 is the clean test split, stored anyway).
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

#: File, next to a member's ``test_probs.npy``, holding its predictions on shifted test data.
SHIFT_FILE = "shifted_test_probs.npz"

#: File, next to a member's ``val_probs.npy``, holding its predictions on shifted validation
#: data, for ForwardSelect on a shifted validation split (NES).
SHIFT_VAL_FILE = "shifted_val_probs.npz"

_FILES = {"test": SHIFT_FILE, "val": SHIFT_VAL_FILE}


# ----------------------------------------------------------------------------- normalisation


def _stats(values: Sequence[float], channels: int, name: str) -> torch.Tensor:
    v = torch.as_tensor(list(values), dtype=torch.float32)
    if v.numel() != channels:
        raise ValueError(
            f"{name}: expected one value per channel ({channels}), got {list(values)!r} "
            "(a DataBundle without normalisation constants?)"
        )
    return v.view(1, -1, 1, 1)


def denormalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the data module's normalisation: ``x * std + mean`` per channel, back to [0, 1]."""
    _check_images(x, "x", unit_range=False)
    return x * _stats(std, x.shape[1], "std").to(x.device) + _stats(mean, x.shape[1], "mean").to(x.device)


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The data module's normalisation: ``(x - mean) / std`` per channel."""
    _check_images(x, "x", unit_range=False)
    return (x - _stats(mean, x.shape[1], "mean").to(x.device)) / _stats(std, x.shape[1], "std").to(x.device)


# ------------------------------------------------------------------------------- corruptions


def _check_images(x: Any, name: str, *, unit_range: bool) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name}: expected a float torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected shape (N, C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    if unit_range and x.numel() and (float(x.min()) < -1e-4 or float(x.max()) > 1 + 1e-4):
        raise ValueError(
            f"{name}: expected un-normalised images in [0, 1], got values in "
            f"[{float(x.min()):.3g}, {float(x.max()):.3g}] (denormalise first)"
        )


def _check_corruption(name: str, severity: int) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"name: expected one of {sorted(CORRUPTIONS)}, got {name!r}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 0 <= severity <= 5:
        raise ValueError(f"severity: expected an int in 0..5, got {severity!r}")


def _derived_seed(seed: int, name: str, severity: int) -> int:
    """One independent stream per (seed, corruption, severity)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    ss = np.random.SeedSequence([int(seed), zlib.crc32(name.encode()), int(severity)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)


def _gaussian_noise(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    # torchvision's op draws from the global generator: fork it so the caller's stream is
    # untouched and seed only the CPU generator (torch.manual_seed would reseed CUDA too).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return TF.gaussian_noise(x, mean=0.0, sigma=float(sigma), clip=True)


def _shot_noise(x: torch.Tensor, photons: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.poisson(x.double() * photons, generator=g) / photons).clamp_(0, 1).to(x.dtype)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    sigma = sigma * max(1.0, max(x.shape[-2:]) / 32.0)
    radius = max(1, int(4.0 * sigma + 0.5))
    # Reflect padding needs the kernel radius below the image size.
    radius = min(radius, min(x.shape[-2:]) - 1)
    k = 2 * radius + 1
    return TF.gaussian_blur(x, [k, k], [sigma, sigma]).clamp_(0, 1)


def _brightness(x: torch.Tensor, c: float) -> torch.Tensor:
    v = x.amax(dim=1, keepdim=True)
    new_v = (v + c).clamp(max=1.0)
    # Hue and saturation are kept, so every channel scales by new_v / v; black (v = 0) has no
    # hue and becomes gray at new_v, as the HSV round trip does.
    scale = torch.where(v > 0, new_v / v.clamp(min=1e-12), torch.zeros_like(v))
    return torch.where(v > 0, x * scale, new_v.expand_as(x)).clamp_(0, 1)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    u8 = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its JPEG codec in favour of TorchCodec, once per image;
        # v2.functional.jpeg is still the op, so the warning is noise here.
        warnings.filterwarnings("ignore", message=".*decoding and encoding.*", category=DeprecationWarning)
        return TF.jpeg(u8, int(quality)).to(x.dtype) / 255.0


def _pixelate(x: torch.Tensor, scale: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = [max(1, int(h * scale)), max(1, int(w * scale))]
    down = TF.resize(x, small, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.resize(down, [h, w], interpolation=TF.InterpolationMode.NEAREST).clamp_(0, 1)


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Corrupt un-normalised images ``x`` (N, C, H, W) in [0, 1] with ``name`` at ``severity``.

    Severity 0 returns a copy of ``x``. The result is float32 in [0, 1] on ``x``'s device; the
    work is done on the CPU, deterministically from ``seed`` (see the module docstring).
    """
    _check_corruption(name, severity)
    _check_images(x, "x", unit_range=True)
    device = x.device
    xc = x.detach().to("cpu", torch.float32).clamp(0, 1)
    if severity == 0:
        return xc.clone().to(device)
    c = CORRUPTIONS[name][severity - 1]
    s = _derived_seed(seed, name, severity)
    if name == "gaussian_noise":
        out = _gaussian_noise(xc, c, s)
    elif name == "shot_noise":
        out = _shot_noise(xc, c, s)
    elif name == "gaussian_blur":
        out = _gaussian_blur(xc, c)
    elif name == "contrast":
        out = TF.adjust_contrast(xc, float(c)).clamp_(0, 1)
    elif name == "brightness":
        out = _brightness(xc, c)
    elif name == "jpeg":
        out = _jpeg(xc, int(c))
    else:
        out = _pixelate(xc, c)
    return out.contiguous().to(device)


def _split_of(data: DataBundle, split: str) -> Split:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split: expected 'train', 'val' or 'test', got {split!r}")
    return getattr(data, split)


def _check_subset(subset: int | None, n: int) -> int:
    if subset is None:
        return n
    if isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < 1:
        raise ValueError(f"subset: expected None or an int >= 1, got {subset!r}")
    return min(int(subset), n)


def shifted_split(
    data: DataBundle,
    name: str,
    severity: int,
    seed: int = 0,
    *,
    split: str = "test",
    subset: int | None = None,
) -> Split:
    """A corrupted copy of ``data.<split>`` (default the test split), normalised like the rest of
    ``data`` so any member can predict on it. ``subset`` keeps only the first ``subset`` images
    (their labels are ``data.<split>.y[:subset]``)."""
    _check_corruption(name, severity)
    if not data.mean or not data.std:
        raise ValueError("data: expected a DataBundle with its normalisation mean/std, got none")
    src = _split_of(data, split)
    n = _check_subset(subset, len(src))
    x = denormalise(src.x[:n].detach().to("cpu", torch.float32), data.mean, data.std)
    # Float error in the normalisation round trip leaves values a hair outside [0, 1].
    # The validation (or train) copy gets its own noise streams: with the test split's, image i
    # of both would carry the same noise.
    cseed = seed if split == "test" else _derived_seed(seed, f"split:{split}", 0)
    x = corrupt(x.clamp_(0, 1), name, severity, cseed)
    return Split(normalise(x, data.mean, data.std), src.y[:n].clone())


def shifted_sets(
    data: DataBundle,
    corruptions: Iterable[str] = tuple(SHIFT_DEFAULT),
    severities: Iterable[int] = SEVERITIES,
    seed: int = 0,
    *,
    split: str = "test",
    subset: int | None = None,
) -> dict[tuple[str, int], Split]:
    """Every ``(corruption, severity)`` copy of a split, for reuse across members in one process
    (CIFAR-10's test split takes a few seconds per corruption on two CPU cores)."""
    return {
        (name, int(sev)): shifted_split(data, name, sev, seed, split=split, subset=subset)
        for name in corruptions
        for sev in severities
    }


def predict_shifted(
    model: torch.nn.Module,
    data: DataBundle,
    device: str | torch.device = "cpu",
    corruptions: Iterable[str] = tuple(SHIFT_DEFAULT),
    severities: Iterable[int] = SEVERITIES,
    seed: int = 0,
    *,
    split: str = "test",
    subset: int | None = None,
    sets: Mapping[tuple[str, int], Split] | None = None,
    batch_size: int = 1024,
    **predict_kwargs: Any,
) -> dict[tuple[str, int], np.ndarray]:
    """A trained member's probabilities on shifted copies of a split: ``{(name, severity):
    (N, C) float16}``. The training code calls this once per member after training and stores
    the result with :func:`save_shifted` next to the member's other predictions.

    ``sets`` may carry precomputed :func:`shifted_sets` (same ``seed``/``split``/``subset``) to
    skip recomputing the corruptions; missing keys are computed. ``predict_kwargs`` go to
    :func:`nestune.platform.data.predict_probs` (``amp``, ``channels_last``).
    """
    out: dict[tuple[str, int], np.ndarray] = {}
    for name in corruptions:
        for sev in severities:
            key = (name, int(sev))
            s = sets.get(key) if sets is not None else None
            if s is None:
                s = shifted_split(data, name, int(sev), seed, split=split, subset=subset)
            probs = predict_probs(model, s, device, batch_size, **predict_kwargs)
            out[key] = probs.numpy().astype(np.float16)
    return out


# ----------------------------------------------------------------------------------- storage


def _key(name: str, severity: int) -> str:
    return f"{name}@{int(severity)}"


def _file(split: str) -> str:
    if split not in _FILES:
        raise ValueError(f"split: expected 'test' or 'val', got {split!r}")
    return _FILES[split]


def save_shifted(directory: str | Path, probs: Mapping[tuple[str, int], Any], split: str = "test") -> Path:
    """Store ``{(name, severity): (N, C) probs}`` as float16 in ``directory`` (:data:`SHIFT_FILE`
    for the test split, :data:`SHIFT_VAL_FILE` for the validation split)."""
    path = Path(directory) / _file(split)
    arrays = {}
    for (name, sev), p in probs.items():
        _check_corruption(name, sev)
        a = p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p)
        if a.ndim != 2:
            raise ValueError(f"probs[{name!r}, {sev}]: expected shape (N, C), got {a.shape}")
        arrays[_key(name, sev)] = a.astype(np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # readers never see half a file
    return path


def load_shifted(directory: str | Path, split: str = "test") -> dict[tuple[str, int], np.ndarray]:
    """The shifted predictions stored by :func:`save_shifted` (empty if there are none)."""
    path = Path(directory) / _file(split)
    if not path.is_file():
        return {}
    out = {}
    with np.load(path) as z:
        for k in z.files:
            name, _, sev = k.rpartition("@")
            out[(name, int(sev))] = z[k]
    return out


def store_shifted(
    model: torch.nn.Module,
    data: DataBundle,
    directory: str | Path,
    device: str | torch.device = "cpu",
    corruptions: Iterable[str] = tuple(SHIFT_DEFAULT),
    severities: Iterable[int] = SEVERITIES,
    seed: int = 0,
    *,
    subset: int | None = None,
    val_corruptions: Iterable[str] | None = None,
    val_subset: int | None = None,
    sets: Mapping[tuple[str, int], Split] | None = None,
    val_sets: Mapping[tuple[str, int], Split] | None = None,
    **predict_kwargs: Any,
) -> list[Path]:
    """Everything the report needs to score a trained member under shift, in one call: its
    probabilities on the corrupted test split (:data:`SHIFT_FILE`) and, with
    ``val_corruptions``, on the corrupted validation split (:data:`SHIFT_VAL_FILE`) for
    ForwardSelect on shifted validation data. NES selects on corruptions other than those it
    tests on; pass a disjoint ``val_corruptions`` to do the same. ``sets`` / ``val_sets`` are
    precomputed :func:`shifted_sets` of the same seed and subset, shared by the members of one
    process. Returns the paths written."""
    corruptions, severities = list(corruptions), [int(s) for s in severities]
    for name in corruptions:
        for sev in severities:
            _check_corruption(name, sev)
    test = predict_shifted(model, data, device, corruptions, severities, seed, split="test",
                           subset=subset, sets=sets, **predict_kwargs)
    paths = [save_shifted(directory, test, "test")]
    if val_corruptions is not None:
        val_corruptions = list(val_corruptions)
        if not val_corruptions:
            raise ValueError("val_corruptions: expected None or at least one corruption, got none")
        val = predict_shifted(model, data, device, val_corruptions, severities, seed, split="val",
                              subset=val_subset, sets=val_sets, **predict_kwargs)
        paths.append(save_shifted(directory, val, "val"))
    return paths


#: The fields of a study's ``shift`` setting (see :func:`shift_options`).
SHIFT_OPTIONS = ("corruptions", "severities", "subset", "val", "val_corruptions", "val_subset", "seed")

# Corrupted copies kept in a trial process for its later members, up to this many bytes
# (CIFAR-10's whole test split under 7 corruptions x 5 severities would be 4.3 GB).
_SET_CACHE_BYTES = 512 * 2**20
_SET_CACHE: dict[str, dict[tuple[str, int], Split]] = {}


def _names(value: Any, field: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{field}: expected a non-empty list of corruptions from "
                         f"{', '.join(CORRUPTIONS)}, got {value!r}")
    names = list(value)
    for i, name in enumerate(names):
        if name not in CORRUPTIONS:
            raise ValueError(f"{field}[{i}]: expected one of {', '.join(CORRUPTIONS)}, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{field}: expected distinct corruptions, got {names}")
    return names


def _count(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{field}: expected none or an int >= 1 (images per corrupted copy), "
                         f"got {value!r}")
    return int(value)


def shift_options(value: Any, field: str = "shift") -> dict[str, Any] | None:
    """A study's ``shift`` setting, checked and completed; ``None`` when shift is off.

    ``True`` means every corruption of :data:`CORRUPTIONS` at severities 1..5 on the whole test
    split, plus the same on the validation split for NES-style selection. A dict may set:

    - ``corruptions``: which corruptions the test split is scored on (default all seven);
    - ``severities``: of 1..5 (default all; severity 0 is the clean split, stored anyway);
    - ``subset``: score only the first N test images of each corrupted copy (default all);
    - ``val``: also predict the corrupted validation split, so the report can run ForwardSelect
      on shifted validation data as NES does (default true);
    - ``val_corruptions`` / ``val_subset``: for that validation copy (default: as the test's;
      NES selects on corruptions it does not test on: give a disjoint list to do the same);
    - ``seed``: of the corruption noise (default 0), the same for every member so that all are
      scored on the same images.
    """
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{field}: expected true, false or a table of {', '.join(SHIFT_OPTIONS)}, "
                         f"got {value!r}")
    unknown = sorted(set(value) - set(SHIFT_OPTIONS))
    if unknown:
        raise ValueError(f"{field}.{unknown[0]}: unknown field (known: {', '.join(SHIFT_OPTIONS)})")
    corruptions = _names(value.get("corruptions", SHIFT_DEFAULT), f"{field}.corruptions")
    severities = value.get("severities", SEVERITIES)
    if isinstance(severities, str) or not isinstance(severities, Sequence) or not severities or any(
        isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 5 for v in severities
    ) or len(set(severities)) != len(severities):
        raise ValueError(f"{field}.severities: expected a non-empty list of distinct ints in 1..5, "
                         f"got {severities!r}")
    subset = _count(value.get("subset"), f"{field}.subset")
    val = value.get("val", True)
    if not isinstance(val, bool):
        raise ValueError(f"{field}.val: expected true or false, got {val!r}")
    val_corruptions = _names(value.get("val_corruptions", corruptions), f"{field}.val_corruptions")
    val_subset = _count(value.get("val_subset", subset), f"{field}.val_subset")
    seed = value.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{field}.seed: expected an int >= 0, got {seed!r}")
    return {"corruptions": corruptions, "severities": sorted(int(v) for v in severities),
            "subset": subset, "val": val, "val_corruptions": val_corruptions if val else None,
            "val_subset": val_subset if val else None, "seed": int(seed)}


def _cached_sets(data: DataBundle, names: list[str], severities: list[int], seed: int, split: str,
                 subset: int | None) -> dict[tuple[str, int], Split] | None:
    src = _split_of(data, split)
    n = min(subset or len(src), len(src))
    nbytes = n * src.x[0].numel() * 4 * len(names) * len(severities)
    key = json.dumps([data.name, data.source, data.cache_file, len(src), names, severities, seed,
                      split, n])
    if key in _SET_CACHE:
        return _SET_CACHE[key]
    if nbytes > _SET_CACHE_BYTES:
        return None
    used = sum(s.x.numel() * 4 for sets in _SET_CACHE.values() for s in sets.values())
    while _SET_CACHE and used + nbytes > _SET_CACHE_BYTES:
        dropped = _SET_CACHE.pop(next(iter(_SET_CACHE)))
        used -= sum(s.x.numel() * 4 for s in dropped.values())
    _SET_CACHE[key] = shifted_sets(data, names, severities, seed, split=split, subset=subset)
    return _SET_CACHE[key]


def store_member_shift(model: torch.nn.Module, data: DataBundle, directory: str | Path,
                       options: Mapping[str, Any], device: str | torch.device = "cpu",
                       **predict_kwargs: Any) -> float:
    """Store a trained member's shifted predictions as a study's ``shift`` options (from
    :func:`shift_options`) ask, next to its other outputs in ``directory``; returns the
    seconds it took. The corrupted copies are kept for the process's next member while they
    fit in 512 MiB."""
    import time

    start = time.perf_counter()
    o = dict(options)
    sev = list(o["severities"])
    sets = _cached_sets(data, o["corruptions"], sev, o["seed"], "test", o["subset"])
    val_sets = None
    if o.get("val"):
        val_sets = _cached_sets(data, o["val_corruptions"], sev, o["seed"], "val", o["val_subset"])
    store_shifted(model, data, directory, device, o["corruptions"], sev, o["seed"], subset=o["subset"],
                  val_corruptions=o["val_corruptions"] if o.get("val") else None,
                  val_subset=o.get("val_subset"), sets=sets, val_sets=val_sets, **predict_kwargs)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------- scoring


def shift_metrics(
    shifted: Mapping[tuple[str, int], Any],
    labels: Any,
    clean: Any | None = None,
) -> pd.DataFrame:
    """Ensemble NLL, error, ECE and Brier under every stored ``(corruption, severity)``.

    ``shifted`` maps ``(name, severity)`` to the ensemble members' probabilities, ``(M, N, C)``
    (or ``(N, C)`` for one network); ``labels`` are the split's labels (only the first N are
    used, for predictions made on a ``subset``). ``clean`` (the members' clean test
    probabilities) adds severity 0 rows for every corruption, over the same first N images, so
    every curve starts at the clean value. Returns one row per (corruption, severity).
    """
    y_all = np.asarray(labels)
    rows = []
    names = sorted({k[0] for k in shifted}, key=SHIFT_DEFAULT.index)

    def score(p: Any, name: str, sev: int) -> dict[str, Any]:
        a = np.asarray(p, dtype=np.float64)
        n = a.shape[-2]
        y = y_all[:n]
        if y.shape[0] != n:
            raise ValueError(f"labels: expected at least N={n} labels for {name}@{sev}, got {y_all.shape[0]}")
        return {"corruption": name, "severity": sev, "nll": M.nll(a, y), "error": M.error(a, y),
                "ece": M.ece(a, y), "brier": M.brier(a, y)}

    for name in names:
        sevs = sorted(s for (n, s) in shifted if n == name)
        if clean is not None and 0 not in sevs:
            n = np.asarray(shifted[(name, sevs[0])]).shape[-2]
            rows.append(score(np.asarray(clean)[..., :n, :], name, 0))
        for sev in sevs:
            rows.append(score(shifted[(name, sev)], name, sev))
    return pd.DataFrame(rows, columns=["corruption", "severity", "nll", "error", "ece", "brier"])


def forward_select_shifted(
    shifted_val: Mapping[tuple[str, int], Any],
    labels: Any,
    size: int,
    keys: Iterable[tuple[str, int]] | None = None,
    *,
    replacement: bool = False,
) -> list[int]:
    """ForwardSelect on a shifted validation split, as NES does: the pool's validation
    probabilities under the chosen ``keys`` (default all) are stacked along the samples and the
    ensemble is selected by NLL on the union. Each value is ``(K, N, C)``; ``labels`` the
    validation labels (first N used per key)."""
    keys = list(shifted_val) if keys is None else list(keys)
    if not keys:
        raise ValueError("keys: expected at least one (corruption, severity), got none")
    y_all = np.asarray(labels)
    probs, ys = [], []
    for k in keys:
        if k not in shifted_val:
            raise ValueError(f"keys: {k!r} has no shifted validation predictions")
        p = np.asarray(shifted_val[k])
        if p.ndim != 3:
            raise ValueError(f"shifted_val[{k!r}]: expected shape (K, N, C), got {p.shape}")
        probs.append(p)
        ys.append(y_all[: p.shape[1]])
    return forward_select(np.concatenate(probs, axis=1), np.concatenate(ys), size, replacement=replacement)


def severity_summary(df: pd.DataFrame, by: Sequence[str] = ("strategy",)) -> pd.DataFrame:
    """Mean and std over corruptions and seeds of every metric, per ``by`` and severity: the
    numbers behind "NLL against severity". Expects the rows of :func:`shift_metrics` with the
    ``by`` columns (and ``seed``) added."""
    metrics = [m for m in ("nll", "error", "ece", "brier") if m in df.columns]
    # Average over corruptions first, so a seed is one sample of the std over seeds.
    group = [*by, "seed", "severity"] if "seed" in df.columns else [*by, "severity"]
    per_seed = df.groupby(group, sort=False)[metrics].mean().reset_index()
    agg = per_seed.groupby([*by, "severity"], sort=False)[metrics].agg(["mean", "std"])
    agg.columns = [f"{m}_{s}" for m, s in agg.columns]
    return agg.reset_index().sort_values("severity", kind="stable", ignore_index=True)

