"""Baseline ensemble search strategies, registered by name on import.

- ``random``: NES-RS, uniform samples ensembled by ForwardSelect (:mod:`.random_search`);
- ``nes_re``: NES-RE, regularized evolution with ForwardSelect parents (:mod:`.nes_re`);
- ``deep_ens``: one genotype, M seeds (:mod:`.deep_ens`);
- ``tpe``: Optuna's TPE on single members, ensembled by ForwardSelect (:mod:`.tpe`).
"""

from nestune.baselines.deep_ens import DeepEnsemble
from nestune.baselines.nes_re import NesRE
from nestune.baselines.random_search import RandomSearch
from nestune.baselines.tpe import TPE

__all__ = ["TPE", "DeepEnsemble", "NesRE", "RandomSearch"]
