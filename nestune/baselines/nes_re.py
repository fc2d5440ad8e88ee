"""``nes_re``: NES-RE, neural ensemble search by regularized evolution (Zaidi et al. 2021, Alg. 1).

Algorithm 1 (NES with regularized evolution)::

    Data: search space A; ensemble size M; population size P; number of parent candidates m;
          validation data D_val
    1  sample P architectures alpha_1..alpha_P independently and uniformly from A
    2  train each from a random initialisation; add each to the population p and to the pool
    3  while the budget lasts:
    4      parent candidates f~_1..f~_m = ForwardSelect(p, D_val, m)
    5      sample a parent alpha uniformly from the candidates' architectures
    6      mutate alpha into a child beta
    7      train beta from a random initialisation; add it to p and to the pool
    8      remove the oldest member of p
    9  ensemble = ForwardSelect(pool, D_val, M)
    10 return the ensemble

Selecting parents by ForwardSelect rather than by each member's own score makes the
population evolve towards architectures that are good *together*: a candidate is picked for
what it adds to the ensemble of the others. Aging (line 8, as in Real et al. 2019) keeps the
population from settling on early lucky members.

Asynchronous form (Real et al. 2019 run evolution with many workers): with several trials in
flight, ``ask`` does not wait for line 2 to finish. The first P asks are the random members of
lines 1-2; every later ask runs lines 4-6 on the population *as it stands at that moment*
(only members whose results are in), and returns ``"wait"`` only while that population is
still empty. A result joins the population when it arrives (line 7) and the oldest arrival
leaves once the population exceeds P (line 8). A failed member never joins the population;
a failed random initial member is replaced by another random one (lines 1-2 ask for P
*trained* random members; without the replacement, a study whose P initial members all
failed would wait forever on an empty population), while a failed child is simply lost, as
in regularized evolution. Line 3's budget is the study's
(the runner stops asking; ``max_members`` can end it sooner), and line 9 is
:meth:`Strategy.select` over the pool, which the runner keeps.

The mutation (line 6) is :meth:`DartsSpace.mutate`: one op, or one input edge, of one cell.
The paper runs P = 50, m = 10 on CIFAR-sized budgets of a few hundred networks; the defaults
here (P = 10, m = 5) suit budgets of tens of members.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from nestune.platform.ensemble import forward_select
from nestune.platform.strategy import (
    FINISHED,
    WAIT,
    Job,
    Result,
    Strategy,
    StrategyContext,
    register,
)
from nestune.search_spaces.genotype import Genotype

__all__ = ["NesRE"]

_SEED_HIGH = 2**31 - 1


@register("nes_re")
@dataclass
class NesRE(Strategy):
    """NES-RE: regularized evolution of a population whose parents are drawn from the
    ForwardSelect ensemble of the population.

    ``population``: P, the population size (and the number of random initial members).
    ``candidates``: m, the parent candidates ForwardSelect picks from the population (at most P).
    ``max_members``: stop once this many members trained successfully (``None``: run until the
    study's budget stops it).
    """

    population: int = 10
    candidates: int = 5
    max_members: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.population < 1:
            raise ValueError(f"NesRE.population: expected an int >= 1, got {self.population}")
        if not 1 <= self.candidates <= self.population:
            raise ValueError(
                f"NesRE.candidates: expected an int in [1, population={self.population}], "
                f"got {self.candidates}"
            )
        if self.max_members is not None and self.max_members < 1:
            raise ValueError(
                f"NesRE.max_members: expected None or an int >= 1, got {self.max_members}"
            )
        self._next_id = 0
        self._initial_asked = 0
        # Oldest first: each entry {"member_id", "genotype": Genotype, "val_probs": (N, C) float16}.
        self._population: deque[dict[str, Any]] = deque()
        self._pending: dict[int, Job] = {}
        self._history: list[dict[str, Any]] = []
        self._trained = 0

    def setup(self, context: StrategyContext) -> None:
        if context.val_labels is None:
            raise ValueError(
                "NesRE: StrategyContext.val_labels is None; NES-RE picks parents by ForwardSelect "
                "on the population's validation predictions, so it needs the validation labels"
            )
        super().setup(context)

    # -- ask: lines 1, 4-6 -------------------------------------------------------------------

    def ask(self) -> Job | Literal["wait", "finished"]:
        if self.max_members is not None:
            if self._trained >= self.max_members:
                return FINISHED
            if self._trained + len(self._pending) >= self.max_members:
                return WAIT
        if self._initial_asked < self.population:  # line 1
            self._initial_asked += 1
            return self._job(self.space.sample(self.rng), parent=None)
        if not self._population:
            return WAIT
        candidates = self.parent_candidates()  # line 4
        parent = candidates[int(self.rng.integers(len(candidates)))]  # line 5
        child = self.space.mutate(parent["genotype"], self.rng)  # line 6
        return self._job(child, parent=parent)

    def parent_candidates(self) -> list[dict[str, Any]]:
        """Line 4: the members ForwardSelect picks as an ensemble of size m from the population
        (of fewer, while the population is smaller than m)."""
        members = list(self._population)
        probs = np.stack([m["val_probs"] for m in members])
        size = min(self.candidates, len(members))
        return [members[i] for i in forward_select(probs, self.context.val_labels, size)]

    def _job(self, genotype: Genotype, parent: dict[str, Any] | None) -> Job:
        # Lines 2 and 7: the runner trains the member from a random initialisation.
        job: Job = {
            "kind": "member",
            "genotype": genotype.to_json(),
            "seed": int(self.rng.integers(_SEED_HIGH)),
            "member_id": self._next_id,
        }
        if parent is not None:
            job["parent_id"] = parent["member_id"]
        self._next_id += 1
        self._pending[job["member_id"]] = job
        return dict(job)

    # -- tell: lines 2, 7-8 ------------------------------------------------------------------

    def tell(self, job: Job, result: Result) -> None:
        member_id = job.get("member_id")
        if member_id not in self._pending:
            raise ValueError(
                f"NesRE.tell: job member_id={member_id!r} is not pending "
                "(never asked, or already told)"
            )
        ok = result.get("error") is None
        if ok:
            val_probs = np.asarray(result["val_probs"], dtype=np.float16)
            n = len(self.context.val_labels)
            if val_probs.ndim != 2 or val_probs.shape[0] != n:
                raise ValueError(
                    f"NesRE.tell: result['val_probs']: expected shape (N={n}, C), "
                    f"got {val_probs.shape}"
                )
            # A member that diverged without raising would make every later ForwardSelect on
            # the population fail; it is treated as failed.
            ok = bool(np.isfinite(val_probs).all())
        # Our own copy of the job, not the runner's (which may carry added keys).
        mine = self._pending.pop(member_id)
        self._history.append(
            {
                "member_id": mine["member_id"],
                "genotype": mine["genotype"],
                "seed": mine["seed"],
                "parent_id": mine.get("parent_id"),
                "status": "ok" if ok else "failed",
            }
        )
        if not ok:
            if mine.get("parent_id") is None:
                self._initial_asked -= 1  # lines 1-2: the next ask samples a random member again
            return  # a failed member never joins the population
        self._trained += 1
        self._population.append(  # lines 2, 7
            {
                "member_id": mine["member_id"],
                "genotype": Genotype.from_json(mine["genotype"]),
                "val_probs": val_probs,
            }
        )
        if len(self._population) > self.population:  # line 8
            self._population.popleft()

    # -- inspection and state ----------------------------------------------------------------

    @property
    def population_ids(self) -> list[int]:
        """The member_ids of the current population, oldest first."""
        return [m["member_id"] for m in self._population]

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per told job, in order: member_id, genotype (JSON), seed, parent_id
        (``None`` for the random initial members), status."""
        return [dict(h) for h in self._history]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            next_id=self._next_id,
            initial_asked=self._initial_asked,
            population=[
                {
                    "member_id": m["member_id"],
                    "genotype": m["genotype"].to_json(),
                    "val_probs": m["val_probs"].copy(),
                }
                for m in self._population
            ],
            pending={k: dict(v) for k, v in self._pending.items()},
            history=[dict(h) for h in self._history],
            trained=self._trained,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._next_id = int(state["next_id"])
        self._initial_asked = int(state["initial_asked"])
        self._population = deque(
            {
                "member_id": int(m["member_id"]),
                "genotype": Genotype.from_json(m["genotype"]),
                "val_probs": np.asarray(m["val_probs"], dtype=np.float16),
            }
            for m in state["population"]
        )
        self._pending = {int(k): dict(v) for k, v in state["pending"].items()}
        self._history = [dict(h) for h in state["history"]]
        self._trained = int(state["trained"])
