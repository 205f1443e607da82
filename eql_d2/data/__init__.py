"""Datasets: LVIS-format loading with validation and metadata, and the generated Synthetic-LT
(default) and Synthetic-LVIS (large-vocabulary presets: long-tailed and balanced) datasets."""

from .datasets import (  # noqa: F401
    ensure_synthetic_lt,
    ensure_synthetic_lvis,
    ensure_synthetic_preset,
    load_category_metadata,
    load_lvis_format,
    metadata_cache_file,
    read_lvis_categories,
    register_builtin_lvis,
    register_lvis_format,
    register_synthetic_lt,
    register_synthetic_lvis,
    register_synthetic_presets,
    synthetic_lt_root,
    synthetic_lvis_root,
    synthetic_preset_root,
)

register_synthetic_lt()
register_synthetic_presets()
register_builtin_lvis()
