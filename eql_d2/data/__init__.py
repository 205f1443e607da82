"""Datasets: LVIS-format loading with validation and metadata, and the generated Synthetic-LT
(default) and Synthetic-LVIS (large-vocabulary presets: long-tailed and balanced) datasets.

Importing this package registers nothing; call :func:`register_all` for the built-in names
(``synthetic_lt_*``, ``synthetic_lvis*_*``, detectron2's LVIS splits with the checked
loader, ``oid_challenge_2019_*`` and ``synthetic_oid_*``), or :func:`register_lvis_format`
(:func:`register_openimages`) for a dataset of your own. Training reads LVIS-format
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
    register_builtin_lvis,
    register_lvis_format,
    register_synthetic_lt,
    register_synthetic_lvis,
    register_synthetic_presets,
    synthetic_lt_root,
    synthetic_lvis_root,
    synthetic_preset_root,
)
from .openimages import (  # noqa: F401
    register_builtin_openimages,
    register_openimages,
    register_synthetic_oid,
)
from .datasets import register_all as _register_lvis_format_builtins


def register_all():
    """Register the built-in datasets: Synthetic-LT, the Synthetic-LVIS presets and
    detectron2's LVIS splits (:func:`eql_d2.data.datasets.register_all`), Open Images
    Challenge 2019 (:func:`register_builtin_openimages`) and Synthetic-OID
    (:func:`register_synthetic_oid`). Names already registered are left as they are, so a
    second call changes nothing."""
    _register_lvis_format_builtins()
    register_builtin_openimages()
    register_synthetic_oid()
