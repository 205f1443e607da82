"""Datasets: LVIS-format loading with validation and metadata, and the Synthetic-LT default."""

from .datasets import (  # noqa: F401
    ensure_synthetic_lt,
    load_category_metadata,
    load_lvis_format,
    read_lvis_categories,
    register_lvis_format,
    register_synthetic_lt,
    synthetic_lt_root,
)

register_synthetic_lt()
