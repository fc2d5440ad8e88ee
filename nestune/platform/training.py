"""Training one ensemble member: a genotype, trained from scratch with the DARTS evaluation recipe.

Recipe (Liu et al. 2018, evaluation phase): SGD with momentum and weight decay (no Nesterov),
learning rate annealed by a cosine from ``lr`` to ``lr_min`` (here per step, not per epoch),
gradient-norm clipping, drop-path whose probability ramps linearly with the epoch
(``drop_path * epoch / epochs``), optional label smoothing. On CUDA the forward pass runs under
bf16 autocast in channels-last layout; on the CPU nothing of that is touched.

The result is the member's validation and test probabilities (stored as float16: the currency
every strategy and ensemble works with), its metrics, and the device-seconds it cost.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nestune.platform import metrics
from nestune.platform.data import DataBundle, DeviceBatches, predict_probs
from nestune.search_spaces import DartsSpace, Genotype

__all__ = ["MemberResult", "TrainConfig", "TrainingDiverged", "train_member"]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch and step."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step


# (kind, check, what the message says was expected). Kinds: "int" excludes bool; "float"
# accepts ints; "bool" is strict.
_RULES: dict[str, tuple[str, Any, str]] = {
    "epochs": ("int", lambda v: v >= 1, "a positive int"),
    "batch_size": ("int", lambda v: v >= 1, "a positive int"),
    "lr": ("float", lambda v: v > 0 and math.isfinite(v), "a positive float"),
    "lr_min": ("float", lambda v: v >= 0 and math.isfinite(v), "a float >= 0"),
    "momentum": ("float", lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "weight_decay": ("float", lambda v: v >= 0 and math.isfinite(v), "a float >= 0"),
    "grad_clip": ("float", lambda v: v >= 0, "a float >= 0 (0 turns clipping off)"),
    "drop_path": ("float", lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "label_smoothing": ("float", lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "C": ("int", lambda v: v >= 2 and v % 2 == 0, "an even int >= 2"),
    "layers": ("int", lambda v: v >= 1, "a positive int"),
    "amp": ("bool", lambda v: True, "a bool"),
    "channels_last": ("bool", lambda v: True, "a bool"),
}


@dataclass
class TrainConfig:
    """How a member is trained. Every field is validated on construction.

    ``amp`` (bf16 autocast) and ``channels_last`` only act on CUDA. ``grad_clip=0`` turns
    clipping off. ``C`` (initial channels) and ``layers`` (cells) size the network.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    drop_path: float = 0.0
    label_smoothing: float = 0.0
    C: int = 8
    layers: int = 5
    amp: bool = True
    channels_last: bool = True

    def __post_init__(self) -> None:
        for name, (kind, ok, expected) in _RULES.items():
            value = getattr(self, name)
            if kind == "int":
                good_type = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            elif kind == "float":
                good_type = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
                    value, bool
                )
            else:
                good_type = isinstance(value, (bool, np.bool_))
            if not good_type or not ok(value):
                raise ValueError(f"TrainConfig.{name}: expected {expected}, got {value!r}")
            # Normalise numpy scalars so to_dict() stays JSON-serialisable.
            setattr(self, name, {"int": int, "float": float, "bool": bool}[kind](value))
        if self.lr_min > self.lr:
            raise ValueError(
                f"TrainConfig.lr_min: expected a float in [0, lr={self.lr}], got {self.lr_min!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TrainConfig:
        """Build from a (possibly partial) dict; unknown keys are a ValueError naming them."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"TrainConfig: expected a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"TrainConfig.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})"
            )
        return cls(**d)


@dataclass
class MemberResult:
    """A trained member: what ensembles are built from (probabilities) and what it cost.

    ``val_probs``/``test_probs`` are float16 (N, C); ``metrics`` holds val_nll, val_error,
    test_nll, test_error, test_ece, test_brier (computed from the float32 probabilities before
    they were rounded to float16), and train_loss (mean over the last epoch).
    """

    genotype: Genotype
    seed: int
    val_probs: np.ndarray
    test_probs: np.ndarray
    metrics: dict[str, float]
    device_seconds: float
    num_params: int
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)

    _FILES = ("genotype.json", "metrics.json", "member.json", "val_probs.npy", "test_probs.npy")

    def save(self, directory: str | Path) -> Path:
        """Write genotype.json, metrics.json, member.json (seed, cost, config, history) and the
        float16 probabilities as val_probs.npy / test_probs.npy into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "genotype.json").write_text(self.genotype.to_json())
        (d / "metrics.json").write_text(json.dumps(self.metrics, indent=1, sort_keys=True))
        meta = {
            "seed": self.seed,
            "device_seconds": self.device_seconds,
            "num_params": self.num_params,
            "config": self.config,
            "history": self.history,
        }
        (d / "member.json").write_text(json.dumps(meta, indent=1))
        np.save(d / "val_probs.npy", np.asarray(self.val_probs, dtype=np.float16))
        np.save(d / "test_probs.npy", np.asarray(self.test_probs, dtype=np.float16))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> MemberResult:
        d = Path(directory)
        missing = [f for f in cls._FILES if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"MemberResult.load: {d} lacks {', '.join(missing)}")
        meta = json.loads((d / "member.json").read_text())
        return cls(
            genotype=Genotype.from_json((d / "genotype.json").read_text()),
            seed=int(meta["seed"]),
            val_probs=np.load(d / "val_probs.npy", allow_pickle=False),
            test_probs=np.load(d / "test_probs.npy", allow_pickle=False),
            metrics={k: float(v) for k, v in json.loads((d / "metrics.json").read_text()).items()},
            device_seconds=float(meta["device_seconds"]),
            num_params=int(meta["num_params"]),
            config=meta.get("config", {}),
            history=meta.get("history", []),
        )


def _as_genotype(genotype: Genotype | str | dict) -> Genotype:
    if isinstance(genotype, Genotype):
        return genotype
    if isinstance(genotype, str):
        text = genotype.strip()
        return Genotype.from_json(text) if text.startswith("{") else Genotype.parse(text)
    if isinstance(genotype, dict):
        return Genotype.from_dict(genotype)
    raise ValueError(f"genotype: expected a Genotype, its JSON or its DARTS repr, got {genotype!r}")


def _as_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"train_member.device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train_member.device: {device!r} asked for, but CUDA is not available")
    return dev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_member(
    genotype: Genotype | str | dict,
    data: DataBundle,
    config: TrainConfig | dict | None,
    seed: int,
    device: str | torch.device = "cpu",
) -> MemberResult:
    """Train ``genotype`` on ``data.train`` and predict ``data.val`` and ``data.test``.

    Deterministic for a given seed on the CPU with a given thread count (model init, batch
    order, augmentation and drop-path all derive from ``seed``; a different
    ``torch.get_num_threads()`` changes reduction order and so the last bits). The thread count
    is the caller's to set; the caller's global RNG states are left as they were.
    Raises :class:`TrainingDiverged` when the loss turns non-finite.
    """
    genotype = _as_genotype(genotype)
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_dict(config)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"train_member.seed: expected an int, got {seed!r}")
    seed = int(seed)
    if not isinstance(data, DataBundle):
        raise ValueError(
            f"train_member.data: expected a DataBundle (from nestune.platform.data.load_data), "
            f"got {type(data).__name__}"
        )
    device = _as_device(device)
    cuda = device.type == "cuda"

    # Seed every RNG the model might use, and give the caller its states back afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    fork_devices = [device] if cuda else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            return _train(genotype, data, config, seed, device, cuda)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _train(
    genotype: Genotype,
    data: DataBundle,
    config: TrainConfig,
    seed: int,
    device: torch.device,
    cuda: bool,
) -> MemberResult:
    _sync(device)
    start = time.perf_counter()

    model = DartsSpace().network(
        genotype,
        C=config.C,
        layers=config.layers,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        drop_path=config.drop_path,
    )
    num_params = sum(p.numel() for p in model.parameters())
    model.to(device)
    channels_last = cuda and config.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp = cuda and config.amp

    # Dropping the last partial batch keeps every step's batch statistics comparable; a
    # training pool smaller than one batch keeps it.
    drop_last = len(data.train) > config.batch_size
    batches = DeviceBatches(
        data.train,
        config.batch_size,
        shuffle=True,
        augment=data.augment,
        device=device,
        # A stream of its own, so the batch order does not move with model init.
        generator=torch.Generator().manual_seed(seed * 1_000_003 + 1),
        drop_last=drop_last,
    )
    steps_per_epoch = len(batches)
    total_steps = config.epochs * steps_per_epoch
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=False,
    )

    history: list[dict[str, float]] = []
    step = 0
    model.train()
    for epoch in range(config.epochs):
        model.drop_path = config.drop_path * epoch / config.epochs
        # Losses stay on the device and are checked once per epoch: a per-step .item() would
        # stall the GPU queue every step.
        losses = torch.zeros(steps_per_epoch, device=device)
        for i, (xb, yb) in enumerate(batches):
            lr = config.lr_min + 0.5 * (config.lr - config.lr_min) * (
                1 + math.cos(math.pi * step / total_steps)
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            losses[i] = loss.detach()
            step += 1
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise TrainingDiverged(
                f"training diverged: non-finite loss at epoch {epoch + 1}/{config.epochs}, "
                f"step {bad + 1}/{steps_per_epoch} (global step {epoch * steps_per_epoch + bad + 1}"
                f"), lr={config.lr}",
                epoch=epoch,
                step=epoch * steps_per_epoch + bad,
            )
        history.append({"epoch": epoch + 1, "train_loss": float(losses.mean()), "lr": lr})

    kw = {"amp": amp, "channels_last": channels_last}
    val = predict_probs(model, data.val, device, **kw)
    test = predict_probs(model, data.test, device, **kw)
    _sync(device)
    device_seconds = time.perf_counter() - start

    val_y, test_y = data.val.y.numpy(), data.test.y.numpy()
    val_np, test_np = val.numpy(), test.numpy()
    results = {
        "val_nll": metrics.nll(val_np, val_y),
        "val_error": metrics.error(val_np, val_y),
        "test_nll": metrics.nll(test_np, test_y),
        "test_error": metrics.error(test_np, test_y),
        "test_ece": metrics.ece(test_np, test_y),
        "test_brier": metrics.brier(test_np, test_y),
        "train_loss": history[-1]["train_loss"],
    }
    return MemberResult(
        genotype=genotype,
        seed=seed,
        val_probs=val_np.astype(np.float16),
        test_probs=test_np.astype(np.float16),
        metrics=results,
        device_seconds=device_seconds,
        num_params=num_params,
        config=config.to_dict(),
        history=history,
        model=model.eval(),
    )
