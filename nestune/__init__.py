"""nestune: neural ensemble architecture search strategies, side by side, on Ray Tune and MLflow."""

from nestune.platform.ensemble import forward_select

__version__ = "0.1.0"

__all__ = ["__version__", "forward_select"]
