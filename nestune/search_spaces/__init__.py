"""Search spaces: the DARTS cell space shared by every strategy."""

from nestune.search_spaces.darts import (
    DARTS_V1,
    DARTS_V2,
    DartsSpace,
    Network,
    Supernet,
    network,
    supernet,
)
from nestune.search_spaces.genotype import Genotype
from nestune.search_spaces.ops import PRIMITIVES

__all__ = [
    "DARTS_V1",
    "DARTS_V2",
    "PRIMITIVES",
    "DartsSpace",
    "Genotype",
    "Network",
    "Supernet",
    "network",
    "supernet",
]
