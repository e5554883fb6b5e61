"""selfalign: a reproducible SELF-ALIGN pipeline (Sun et al. 2023) on DVC and MLflow."""

__version__ = "0.1.0"
