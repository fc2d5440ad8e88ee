"""nestune: neural ensemble architecture search strategies, side by side, on Ray Tune and MLflow."""

from typing import TYPE_CHECKING, Any

from nestune.platform.ensemble import forward_select

__version__ = "0.1.0"

__all__ = ["Budget", "Study", "StudyResult", "__version__", "forward_select"]

# Imported on first use, so that `import nestune` does not import Ray, MLflow or torch.
_LAZY = {
    "Study": "nestune.platform.study",
    "StudyResult": "nestune.platform.study",
    "Budget": "nestune.platform.runner",
}

if TYPE_CHECKING:  # pragma: no cover
    from nestune.platform.runner import Budget
    from nestune.platform.study import Study, StudyResult


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nestune' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
