"""Metrics on predicted probabilities (public home of :mod:`nestune.platform.metrics`).

``import nestune.metrics`` or ``from nestune.metrics import nll``; see
:mod:`nestune.platform.metrics` for shapes, dtypes and conventions.
"""

from nestune.platform.metrics import brier, disagreement, ece, error, nll, oracle_nll

__all__ = ["nll", "error", "ece", "brier", "oracle_nll", "disagreement"]
