"""Evaluation: LVISEvaluator / COCOEvaluator chosen by dataset type."""

from .build import build_evaluator  # noqa: F401
