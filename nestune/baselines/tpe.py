"""``tpe``: Bayesian optimisation of single members with the Tree-structured Parzen Estimator
(Bergstra et al. 2011; Optuna's ``TPESampler``), ensembled by ForwardSelect afterwards.

Algorithm (TPE, then an ensemble from everything it trained)::

    Data: search space A, as categorical choices x; ensemble size M; validation data D_val
    1  H = {}
    2  while the budget lasts:
    3      if |H| < n_startup: draw x uniformly
    4      else: split H by the quantile gamma of the objective into good and bad; fit densities
              l(x) (good) and g(x) (bad); draw candidates from l and take x maximising l(x)/g(x)
    5      train the architecture alpha(x); add it to the pool
    6      y = validation NLL of f(alpha(x)); H = H + {(x, y)}
    7  ensemble = ForwardSelect(pool, D_val, M)
    8  return the ensemble

The encoding ``x`` of a genotype: per cell (normal, reduce) and per intermediate node ``i``,
one categorical over the ``C(i + 2, 2)`` unordered pairs of distinct inputs, and two
categoricals over the ops other than ``none`` (the first op goes with the lower input). Every
``x`` is therefore a valid genotype and every genotype has exactly one ``x``.

Lines 3-4 are Optuna's ``study.ask()`` with a seeded ``TPESampler``; line 6 is
``study.tell``. Trials run concurrently: Optuna asks before earlier trials are told, and the
sampler's ``constant_liar`` gives the ones in flight a pessimistic value so that concurrent
asks spread out. A failed member is told as ``FAIL`` (Optuna then leaves it out of H).
TPE optimises single members; it has no notion of the ensemble until line 7, which is
:meth:`Strategy.select` over the pool, kept by the runner.
"""

from __future__ import annotations

import itertools
import math
import pickle
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import optuna

from nestune.platform.metrics import nll
from nestune.platform.strategy import (
    FINISHED,
    WAIT,
    Job,
    Result,
    Strategy,
    StrategyContext,
    register,
)
from nestune.search_spaces.darts import CELLS, DartsSpace
from nestune.search_spaces.genotype import Genotype

__all__ = ["TPE", "encode", "decode", "input_pairs"]

_SEED_HIGH = 2**31 - 1


def input_pairs(node: int) -> list[str]:
    """The choices for node ``node``'s two inputs: unordered pairs of distinct states, as
    ``"a,b"`` with ``a < b`` (Optuna's categorical choices must be plain scalars)."""
    return [f"{a},{b}" for a, b in itertools.combinations(range(node + 2), 2)]


def _suggest(trial: optuna.Trial, space: DartsSpace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for cell in CELLS:
        for node in range(space.nodes):
            key = f"{cell}_n{node}"
            params[f"{key}_inputs"] = trial.suggest_categorical(f"{key}_inputs", input_pairs(node))
            params[f"{key}_op0"] = trial.suggest_categorical(f"{key}_op0", list(space.choices))
            params[f"{key}_op1"] = trial.suggest_categorical(f"{key}_op1", list(space.choices))
    return params


def decode(params: dict[str, Any], space: DartsSpace) -> Genotype:
    """The genotype that the categorical choices ``params`` encode."""
    cells = {}
    for cell in CELLS:
        pairs = []
        for node in range(space.nodes):
            key = f"{cell}_n{node}"
            a, b = (int(v) for v in params[f"{key}_inputs"].split(","))
            pairs += [(params[f"{key}_op0"], a), (params[f"{key}_op1"], b)]
        cells[cell] = pairs
    concat = range(2, space.nodes + 2)
    return space.validate(Genotype(cells["normal"], cells["reduce"], concat, concat))


def encode(genotype: Genotype, space: DartsSpace) -> dict[str, Any]:
    """The categorical choices of ``genotype``; ``decode(encode(g))`` equals ``g`` up to the
    order of each node's two edges."""
    space.validate(genotype)
    params: dict[str, Any] = {}
    for cell in CELLS:
        pairs = genotype.cell(cell)
        for node in range(space.nodes):
            key = f"{cell}_n{node}"
            (op0, a), (op1, b) = sorted(pairs[2 * node : 2 * node + 2], key=lambda p: p[1])
            params[f"{key}_inputs"] = f"{a},{b}"
            params[f"{key}_op0"] = op0
            params[f"{key}_op1"] = op1
    return params


@register("tpe")
@dataclass
class TPE(Strategy):
    """TPE over the genotype's categorical choices, minimising each member's validation NLL;
    the pool is ensembled by ForwardSelect.

    ``startup_trials``: members drawn uniformly before TPE's model is used (Optuna's
    ``n_startup_trials``). ``multivariate``: model the choices jointly rather than one by one.
    ``max_members``: stop once this many members trained successfully (``None``: run until
    the study's budget stops it).
    """

    startup_trials: int = 10
    multivariate: bool = False
    max_members: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.startup_trials < 0:
            raise ValueError(
                f"TPE.startup_trials: expected an int >= 0, got {self.startup_trials}"
            )
        if self.max_members is not None and self.max_members < 1:
            raise ValueError(f"TPE.max_members: expected None or an int >= 1, got {self.max_members}")
        self._study: optuna.Study | None = None
        self._next_id = 0
        self._pending: dict[int, Job] = {}
        self._history: list[dict[str, Any]] = []
        self._trained = 0

    def setup(self, context: StrategyContext) -> None:
        super().setup(context)
        sampler = optuna.samplers.TPESampler(  # line 1: an empty history
            n_startup_trials=self.startup_trials,
            multivariate=self.multivariate,
            constant_liar=True,
            seed=int(self.rng.integers(_SEED_HIGH)),
        )
        # Optuna announces every in-memory study at INFO on its own stderr handler; in a study's
        # progress output that line is noise. The user's own Optuna verbosity is left as it was.
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(max(verbosity, optuna.logging.WARNING))
        try:
            self._study = optuna.create_study(direction="minimize", sampler=sampler)
        finally:
            optuna.logging.set_verbosity(verbosity)

    @property
    def study(self) -> optuna.Study:
        """The Optuna study: H as Optuna's trials."""
        if self._study is None:
            raise RuntimeError("TPE: setup(context) was not called")
        return self._study

    def ask(self) -> Job | Literal["wait", "finished"]:
        if self.max_members is not None:
            if self._trained >= self.max_members:
                return FINISHED
            if self._trained + len(self._pending) >= self.max_members:
                return WAIT
        trial = self.study.ask()  # lines 3-4
        genotype = decode(_suggest(trial, self.space), self.space)
        job: Job = {  # line 5: the runner trains it
            "kind": "member",
            "genotype": genotype.to_json(),
            "seed": int(self.rng.integers(_SEED_HIGH)),
            "member_id": self._next_id,
            "tpe_trial": trial.number,
        }
        self._next_id += 1
        self._pending[job["member_id"]] = job
        return dict(job)

    def tell(self, job: Job, result: Result) -> None:
        member_id = job.get("member_id")
        if member_id not in self._pending:
            raise ValueError(
                f"TPE.tell: job member_id={member_id!r} is not pending (never asked, or already told)"
            )
        value = None if result.get("error") is not None else self._objective(result)
        # Our own copy of the job, not the runner's (which may carry added keys).
        mine = self._pending.pop(member_id)
        if value is None:
            self.study.tell(mine["tpe_trial"], state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(mine["tpe_trial"], value)  # line 6
        self._trained += result.get("error") is None
        self._history.append(
            {
                "member_id": mine["member_id"],
                "genotype": mine["genotype"],
                "seed": mine["seed"],
                "tpe_trial": mine["tpe_trial"],
                "status": "ok" if result.get("error") is None else "failed",
                "val_nll": value,
            }
        )

    def _objective(self, result: Result) -> float | None:
        """Line 6's y: the member's validation NLL, from its metrics, or computed from its
        validation probabilities where the metrics lack it; ``None`` (told as FAIL) when it is
        not finite."""
        value = (result.get("metrics") or {}).get("val_nll")
        if value is None:
            labels = self.context.val_labels
            if labels is None or result.get("val_probs") is None:
                raise ValueError(
                    "TPE.tell: result['metrics']['val_nll'] is missing, and no val_probs with "
                    "StrategyContext.val_labels to compute it from"
                )
            value = nll(np.asarray(result["val_probs"]), labels)
        value = float(value)
        return value if math.isfinite(value) else None

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per told job, in order: member_id, genotype (JSON), seed, tpe_trial
        (Optuna's trial number), status, val_nll (``None`` when failed)."""
        return [dict(h) for h in self._history]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            # The in-memory study pickles whole: its trials, including the ones in flight, and
            # the sampler's random state, so a restored study asks what this one would have.
            study=pickle.dumps(self.study),
            next_id=self._next_id,
            pending={k: dict(v) for k, v in self._pending.items()},
            history=[dict(h) for h in self._history],
            trained=self._trained,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._study = pickle.loads(state["study"])
        self._next_id = int(state["next_id"])
        self._pending = {int(k): dict(v) for k, v in state["pending"].items()}
        self._history = [dict(h) for h in state["history"]]
        self._trained = int(state["trained"])
