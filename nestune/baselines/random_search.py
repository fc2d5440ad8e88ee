"""``random``: NES-RS, neural ensemble search by random search (Zaidi et al. 2021, Sec. 3.2).

Algorithm (NES-RS)::

    Data: search space A; ensemble size M; validation data D_val
    1  while the budget lasts:
    2      sample an architecture alpha uniformly from A
    3      train f(alpha) from a random initialisation; add it to the pool
    4  ensemble = ForwardSelect(pool, D_val, M)
    5  return the ensemble

``ask`` is lines 2-3 (line 3's training is the runner's trial), ``tell`` records line 3's
outcome, and line 4 is :meth:`Strategy.select` (ForwardSelect over the pool, kept by the
runner). The budget of line 1 is the study's: the strategy never finishes by itself unless
``max_members`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from nestune.platform.strategy import FINISHED, WAIT, Job, Result, Strategy, register
from nestune.search_spaces.genotype import Genotype

__all__ = ["RandomSearch"]

_SEED_HIGH = 2**31 - 1


@register("random")
@dataclass
class RandomSearch(Strategy):
    """NES-RS: uniformly sampled genotypes, each trained once; ForwardSelect over the pool.

    ``max_members``: stop once this many members trained successfully (``None``: run until the
    study's budget stops it). A failed member does not count and is replaced by a new sample.
    """

    max_members: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_members is not None and self.max_members < 1:
            raise ValueError(
                f"RandomSearch.max_members: expected None or an int >= 1, got {self.max_members}"
            )
        self._next_id = 0
        self._pending: dict[int, Job] = {}
        self._history: list[dict[str, Any]] = []
        self._trained = 0

    def ask(self) -> Job | Literal["wait", "finished"]:
        if self.max_members is not None:
            if self._trained >= self.max_members:
                return FINISHED
            # Members in flight may still complete the quota; if one fails it is replaced then.
            if self._trained + len(self._pending) >= self.max_members:
                return WAIT
        genotype = self.space.sample(self.rng)  # line 2
        job = {  # line 3: the runner trains it
            "kind": "member",
            "genotype": genotype.to_json(),
            "seed": int(self.rng.integers(_SEED_HIGH)),
            "member_id": self._next_id,
        }
        self._next_id += 1
        self._pending[job["member_id"]] = job
        return dict(job)

    def tell(self, job: Job, result: Result) -> None:
        # Our own copy of the job, not the runner's (which may carry added keys).
        mine = self._pending.pop(job.get("member_id"), None)
        if mine is None:
            raise ValueError(
                f"RandomSearch.tell: job member_id={job.get('member_id')!r} is not pending "
                "(never asked, or already told)"
            )
        ok = result.get("error") is None
        self._trained += ok
        self._history.append(
            {
                "member_id": mine["member_id"],
                "genotype": mine["genotype"],
                "seed": mine["seed"],
                "status": "ok" if ok else "failed",
            }
        )

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per told job, in order: member_id, genotype (JSON), seed, status."""
        return [dict(h) for h in self._history]

    def genotypes(self) -> list[Genotype]:
        """The genotypes trained successfully so far, in the order their results came."""
        return [Genotype.from_json(h["genotype"]) for h in self._history if h["status"] == "ok"]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            next_id=self._next_id,
            pending={k: dict(v) for k, v in self._pending.items()},
            history=[dict(h) for h in self._history],
            trained=self._trained,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._next_id = int(state["next_id"])
        self._pending = {int(k): dict(v) for k, v in state["pending"].items()}
        self._history = [dict(h) for h in state["history"]]
        self._trained = int(state["trained"])

