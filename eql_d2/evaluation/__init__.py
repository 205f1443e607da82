"""Evaluation: LVIS with per-category outputs and AP-fixed, Open Images Challenge AP, image
classification accuracy, results files, TTA, ensembles."""

from .build import build_evaluator  # noqa: F401
from .classification import ClassificationEvaluator  # noqa: F401
from .fast_lvis import FastLVISEval  # noqa: F401
from .lvis_evaluation import LVISPerCategoryEvaluator, evaluate_lvis  # noqa: F401
from .oid_evaluation import OIDEvaluator, evaluate_oid  # noqa: F401
from .results_io import check_lvis_results, read_lvis_results  # noqa: F401
