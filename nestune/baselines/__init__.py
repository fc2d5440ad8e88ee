"""Baseline ensemble search strategies, registered by name on import.

- ``random``: NES-RS, uniform samples ensembled by ForwardSelect (:mod:`.random_search`);
- ``nes_re``: NES-RE, regularized evolution with ForwardSelect parents (:mod:`.nes_re`).
"""

from nestune.baselines.nes_re import NesRE
from nestune.baselines.random_search import RandomSearch

__all__ = ["NesRE", "RandomSearch"]
