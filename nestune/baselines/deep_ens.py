"""``deep_ens``: deep ensembles of one architecture (Lakshminarayanan et al. 2017).

Algorithm (deep ensembles, as the NES papers use them as their baseline)::

    Data: an architecture alpha; ensemble size M
    1  for i = 1..M:
    2      draw a seed s_i, distinct from s_1..s_(i-1)
    3      train f(alpha) from the random initialisation of s_i (and data order of s_i)
    4  return the ensemble of the M networks (uniform average of their probabilities)

Only the random initialisation (and the order of the data) differs between members, so the
ensemble's diversity comes from training alone. The architecture is a fixed input: the name of
a published genotype (``"DARTS_V2"``, the default, or ``"DARTS_V1"``), a Genotype JSON, or a
DARTS repr string. Adversarial training, which the paper adds as an option, is not used (the
NES comparisons leave it out too).

``ask`` is lines 2-3 (training is the runner's trial); the strategy is finished once M members
trained. A failed member is replaced by one with a fresh seed; after M failures in all it gives
up rather than retrain a genotype that cannot train (out of memory, say), and the ensemble is
whatever trained. Line 4 is :meth:`Strategy.select` over the pool: with exactly M members,
ForwardSelect of size M takes them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from nestune.platform.strategy import (
    FINISHED,
    WAIT,
    Job,
    Result,
    Strategy,
    StrategyContext,
    register,
)
from nestune.search_spaces.genotype import DARTS_V1, DARTS_V2, Genotype

__all__ = ["DeepEnsemble", "parse_genotype"]

_SEED_HIGH = 2**31 - 1
NAMED_GENOTYPES: dict[str, Genotype] = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2}


def parse_genotype(text: str, field: str = "genotype") -> Genotype:
    """A genotype from a published name (``DARTS_V1``, ``DARTS_V2``), its JSON, or DARTS' repr;
    ``ValueError`` naming ``field`` otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"{field}: expected a str, got {type(text).__name__}")
    name = text.strip()
    if name in NAMED_GENOTYPES:
        return NAMED_GENOTYPES[name]
    try:
        if name.startswith("{"):
            return Genotype.from_json(name)
        if name.startswith("Genotype("):
            return Genotype.parse(name)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from exc
    raise ValueError(
        f"{field}: expected one of {sorted(NAMED_GENOTYPES)}, a Genotype JSON object or a DARTS "
        f"repr 'Genotype(normal=[...], ...)', got {text[:80]!r}"
    )


@register("deep_ens")
@dataclass
class DeepEnsemble(Strategy):
    """Deep ensemble: one genotype trained with M = ``ensemble_size`` different seeds.

    ``genotype``: ``"DARTS_V2"`` (default), ``"DARTS_V1"``, a Genotype JSON or a DARTS repr.
    """

    genotype: str = "DARTS_V2"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._genotype = parse_genotype(self.genotype, "DeepEnsemble.genotype")
        self._next_id = 0
        self._seeds: list[int] = []  # every seed asked, failed ones included: never reused
        self._pending: dict[int, Job] = {}
        self._history: list[dict[str, Any]] = []
        self._trained = 0
        self._failed = 0

    def setup(self, context: StrategyContext) -> None:
        try:
            context.space.validate(self._genotype)
        except ValueError as exc:
            raise ValueError(f"DeepEnsemble.genotype: not in the study's space: {exc}") from exc
        super().setup(context)

    @property
    def size(self) -> int:
        """M, the number of members: the study's ensemble size."""
        if self.context is None:
            raise RuntimeError("DeepEnsemble: setup(context) was not called")
        return self.context.ensemble_size

    def ask(self) -> Job | Literal["wait", "finished"]:
        if self._trained >= self.size or (self._failed >= self.size and not self._pending):
            return FINISHED
        if self._trained + len(self._pending) >= self.size or self._failed >= self.size:
            return WAIT  # the members in flight may still complete (or end) the ensemble
        seed = int(self.rng.integers(_SEED_HIGH))  # line 2
        while seed in self._seeds:
            seed = int(self.rng.integers(_SEED_HIGH))
        self._seeds.append(seed)
        job: Job = {  # line 3: the runner trains it
            "kind": "member",
            "genotype": self._genotype.to_json(),
            "seed": seed,
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
                f"DeepEnsemble.tell: job member_id={job.get('member_id')!r} is not pending "
                "(never asked, or already told)"
            )
        ok = result.get("error") is None
        self._trained += ok
        self._failed += not ok
        self._history.append(
            {"member_id": mine["member_id"], "seed": mine["seed"], "status": "ok" if ok else "failed"}
        )

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per told job, in order: member_id, seed, status."""
        return [dict(h) for h in self._history]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            next_id=self._next_id,
            seeds=list(self._seeds),
            pending={k: dict(v) for k, v in self._pending.items()},
            history=[dict(h) for h in self._history],
            trained=self._trained,
            failed=self._failed,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._next_id = int(state["next_id"])
        self._seeds = [int(s) for s in state["seeds"]]
        self._pending = {int(k): dict(v) for k, v in state["pending"].items()}
        self._history = [dict(h) for h in state["history"]]
        self._trained = int(state["trained"])
        self._failed = int(state["failed"])
