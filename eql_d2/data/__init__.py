"""Datasets: LVIS-format loading with validation and metadata, and the generated Synthetic-LT
(default) and Synthetic-LVIS (large-vocabulary presets: long-tailed and balanced) datasets.

Importing this package registers nothing; call :func:`register_all` for the built-in names
(``synthetic_lt_*``, ``synthetic_lvis*_*`` and detectron2's LVIS splits with the checked
loader), or :func:`register_lvis_format` for a dataset of your own. Training reads these
datasets from a compact form converted once per machine (:mod:`eql_d2.data.compact`).
"""

from .datasets import (  # noqa: F401
    ensure_synthetic_lt,
    ensure_synthetic_lvis,
    ensure_synthetic_preset,
    load_category_metadata,
    load_lvis_format,
    metadata_cache_file,
    read_lvis_categories,
    register_all,
    register_builtin_lvis,
    register_lvis_format,
    register_synthetic_lt,
    register_synthetic_lvis,
    register_synthetic_presets,
    synthetic_lt_root,
    synthetic_lvis_root,
    synthetic_preset_root,
)
