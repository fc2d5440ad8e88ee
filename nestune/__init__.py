"""nestune: neural ensemble architecture search strategies, side by side, on Ray Tune and MLflow."""

__version__ = "0.1.0"
