"""EdgeNES: differentiable neural ensemble search with diversity control (Babkin 2023–24).

Importing the package registers the search method ``"edgenes"`` (``nestune.platform.search``)
and the strategy ``"edgenes"`` (``nestune.platform.strategy``).
"""

from nestune.edgenes.hypernet import (
    MLPHypernet,
    PiecewiseLinearHypernet,
    derive_at,
    make_hypernet,
    relax,
    shared_edges_relaxed,
)
from nestune.edgenes.search import EdgeNESConfig, EdgeNESResult, edgenes_job, edgenes_search
from nestune.edgenes.strategy import EdgeNES, exhaustive_select, member_disagreement

__all__ = [
    "EdgeNES",
    "EdgeNESConfig",
    "EdgeNESResult",
    "MLPHypernet",
    "PiecewiseLinearHypernet",
    "derive_at",
    "edgenes_job",
    "edgenes_search",
    "exhaustive_select",
    "make_hypernet",
    "member_disagreement",
    "relax",
    "shared_edges_relaxed",
]
