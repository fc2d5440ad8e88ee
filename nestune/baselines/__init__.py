"""Baseline ensemble search strategies, registered by name on import.

- ``random``: NES-RS, uniform samples ensembled by ForwardSelect (:mod:`.random_search`);
- ``nes_re``: NES-RE, regularized evolution with ForwardSelect parents (:mod:`.nes_re`);
- ``deep_ens``: one genotype, M seeds (:mod:`.deep_ens`);
- ``tpe``: Optuna's TPE on single members, ensembled by ForwardSelect (:mod:`.tpe`);
- ``darts`` / ``darts_ens``: one or k DARTS searches, each derived genotype trained (:mod:`.darts`);
- ``xnas``: k XNAS searches (expert advice with wipeout), each genotype trained (:mod:`.xnas`).
"""

from nestune.baselines.darts import Darts, DartsEnsemble
from nestune.baselines.deep_ens import DeepEnsemble
from nestune.baselines.nes_re import NesRE
from nestune.baselines.random_search import RandomSearch
from nestune.baselines.tpe import TPE
from nestune.baselines.xnas import Xnas

__all__ = ["TPE", "Darts", "DartsEnsemble", "DeepEnsemble", "NesRE", "RandomSearch", "Xnas"]
