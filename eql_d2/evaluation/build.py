import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator

from .classification import ClassificationEvaluator
from .lvis_evaluation import LVISPerCategoryEvaluator
from .oid_evaluation import OIDEvaluator

__all__ = ["build_evaluator"]


def build_evaluator(cfg, dataset_name, output_folder=None):
    """LVISPerCategoryEvaluator for LVIS-type datasets (standard AP capped at
    TEST.EVAL.MAX_DETS_PER_IMAGE, optional AP-fixed, per-category CSV and plots in
    `output_folder`), COCOEvaluator for COCO-type ones, ClassificationEvaluator for image
    classification datasets."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
    max_dets = cfg.TEST.DETECTIONS_PER_IMAGE
    if evaluator_type == "lvis":
        ev = cfg.TEST.EVAL
        return LVISPerCategoryEvaluator(
            dataset_name, output_dir=output_folder, max_dets_per_image=ev.MAX_DETS_PER_IMAGE,
            ap_fixed_dets_per_class=ev.AP_FIXED_DETS_PER_CLASS if ev.AP_FIXED else 0,
            train_dataset_name=cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None,
            per_category_outputs=ev.PER_CATEGORY_OUTPUTS, backend=ev.BACKEND)
    if evaluator_type == "classification":
        # top-1 / top-5 and many / medium / few-shot accuracy; per-class CSV and plot
        return ClassificationEvaluator(
            dataset_name, output_folder if cfg.TEST.EVAL.PER_CATEGORY_OUTPUTS else None)
    if evaluator_type == "oid":
        ev = cfg.TEST.OID_EVAL
        return OIDEvaluator(
            dataset_name, output_dir=output_folder, iou_threshold=ev.IOU_THRESHOLD,
            group_of_weight=ev.GROUP_OF_WEIGHT, expand_detections=ev.EXPAND_DETECTIONS,
            num_groups=ev.NUM_GROUPS, group_by=ev.GROUP_BY, rarest_first=ev.RAREST_FIRST,
            train_dataset_name=cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None,
            per_category_outputs=cfg.TEST.EVAL.PER_CATEGORY_OUTPUTS)
    if evaluator_type == "coco":
        # the fast COCO evaluator needs detectron2's compiled _C, which eql_d2 does not require
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False,
                             max_dets_per_image=max_dets)
    raise ValueError(
        f"Dataset '{dataset_name}' has evaluator_type={evaluator_type!r}; eql_d2 evaluates "
        "'lvis', 'oid', 'coco' and 'classification' datasets (set it in the dataset's "
        "MetadataCatalog entry)"
    )
