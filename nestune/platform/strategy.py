"""The strategy contract: what an ensemble search strategy is, to the rest of nestune.

A strategy is a Ray Tune ``Searcher`` in spirit (and is wrapped into one by the runner): it is
asked for the next job, told each job's result, and can save and restore its state. A job is
a plain JSON-serialisable dict, so it travels as a Tune trial config and shows in MLflow as
params. Two kinds of job exist:

- ``{"kind": "member", "genotype": <Genotype JSON>, "seed": int, ...}``: train one network;
  the result carries its validation probabilities, which ensemble strategies select on.
- ``{"kind": "search", "method": "darts" | "xnas" | "edgenes" | ..., "seed": int, ...}``: run
  a supernet search; the result carries a derived genotype and whatever the method adds.

Extra keys (``"parent"``, ``"lambda"``, ...) ride along and are logged as params.

Hyperparameters are dataclass fields with plain types; they are checked against their type
hints on construction, so a study file with ``population = "ten"`` fails with the field name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

import numpy as np

from nestune.search_spaces.darts import DartsSpace

Job = dict[str, Any]
Result = dict[str, Any]
WAIT: Literal["wait"] = "wait"
FINISHED: Literal["finished"] = "finished"


@dataclass(frozen=True)
class StrategyContext:
    """What a running strategy knows of its study: the space, its seed, the ensemble size, and
    the validation labels (strategies that select on the pool's validation predictions while
    searching, as NES-RE does, need them; ``None`` where the runner has none to give)."""

    space: DartsSpace
    seed: int
    ensemble_size: int
    val_labels: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)


class Strategy(ABC):
    """An ensemble search strategy: ``ask`` for jobs, be ``tell``-ed results, pick the ensemble.

    Subclasses are dataclasses whose fields are the strategy's hyperparameters, registered by
    name with :func:`register`. The runner calls ``setup(context)`` once, then alternates
    ``ask()`` and ``tell(job, result)``; it stops asking when the study's budget is spent or
    ``ask()`` returns ``"finished"``. ``ask()`` returns ``"wait"`` when the next job depends on
    results still running.
    """

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self)
        self.context: StrategyContext | None = None
        self.rng = np.random.default_rng(0)

    def setup(self, context: StrategyContext) -> None:
        """Bind the strategy to its study run; seeds the strategy's random generator.

        The generator is seeded by the study seed alone, not by the strategy: at the same seed,
        strategies that start alike draw alike (random's first members are nes_re's initial
        population, trained with the same seeds). These common random numbers are on purpose:
        a comparison paired by seed then measures the strategies, not their luck."""
        self.context = context
        self.rng = np.random.default_rng(context.seed)

    @property
    def space(self) -> DartsSpace:
        if self.context is None:
            raise RuntimeError(f"{type(self).__name__}: setup(context) was not called")
        return self.context.space

    @abstractmethod
    def ask(self) -> Job | Literal["wait", "finished"]:
        """The next job to run, ``"wait"`` or ``"finished"``."""

    @abstractmethod
    def tell(self, job: Job, result: Result) -> None:
        """The result of a job returned by ``ask`` (``result["error"]`` set if it failed)."""

    def select(self, val_probs: np.ndarray, labels: np.ndarray, size: int) -> list[int]:
        """The ensemble, as indices into the pool of members; ForwardSelect by default."""
        from nestune.platform.ensemble import forward_select

        return forward_select(val_probs, labels, min(size, len(val_probs)))

    def hparams(self) -> dict[str, Any]:
        """The hyperparameters, as logged to MLflow."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a restart (JSON- or pickle-able). The default
        keeps the rng state; strategies with more state extend it."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


STRATEGIES: dict[str, type[Strategy]] = {}


def register(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: make a strategy available to studies under ``name``.

    A user's own strategy in their own driver file registers the same way as the built-ins.
    """

    def deco(cls: type[Strategy]) -> type[Strategy]:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"register({name!r}): {cls!r} is not a Strategy subclass")
        if not dataclasses.is_dataclass(cls):
            cls = dataclass(cls)
        existing = STRATEGIES.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"register: strategy name {name!r} is already taken by {existing!r}")
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return deco


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered as ``name``."""
    _load_builtins()
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"strategy: unknown name {name!r}; registered: {sorted(STRATEGIES)}"
        ) from None


def make_strategy(name: str, **hparams: Any) -> Strategy:
    """Construct a registered strategy; an unknown hyperparameter is a ``ValueError``."""
    cls = get_strategy(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(hparams) - known
    if unknown:
        raise ValueError(
            f"strategy {name!r}: unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(known)}"
        )
    return cls(**hparams)


def _load_builtins() -> None:
    # Importing the packages runs their @register decorators.
    import nestune.baselines  # noqa: F401

    try:
        import nestune.edgenes  # noqa: F401
    except ImportError:  # pragma: no cover - only while the package is being built
        pass


def check_fields(obj: Any) -> None:
    """Check every dataclass field of ``obj`` against its type hint; ``ValueError`` names the
    first field that does not fit."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints.get(f.name, Any)
        if not _fits(value, hint):
            raise ValueError(
                f"{type(obj).__name__}.{f.name}: expected {_describe(hint)}, got {value!r}"
            )


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False
        if not args or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
            return all(_fits(v, args[0]) for v in value) if args else True
        if origin is list:
            return all(_fits(v, args[0]) for v in value)
        return len(args) == len(value) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
