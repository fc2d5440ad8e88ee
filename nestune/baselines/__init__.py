"""Baseline ensemble search strategies, registered by name on import.

- ``random``: NES-RS, uniform samples ensembled by ForwardSelect (:mod:`.random_search`).
"""

from nestune.baselines.random_search import RandomSearch

__all__ = ["RandomSearch"]
