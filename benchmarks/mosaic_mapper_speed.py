"""Cost of a training sample with YOLOX's recipe on the CPU: detectron2's DatasetMapper with
HSV jitter, multi-scale resize and flip, against the same behind
:class:`~eql_d2.data.mosaic.MosaicMixUpMapper` (Mosaic of 4 images, random affine, MixUp
with a fifth), at YOLOX's settings and 640 px mosaics.

The images are ``--images`` JPEGs of 640x480 random pixels (COCO's typical size) with 7
boxes each, written to a temporary folder; each mapper maps ``--samples`` samples (RNGs
seeded per sample, as the training loader does) after one warm-up sample, in one process
with one OpenCV and one torch thread: the cost of one data-loader worker.

    OMP_NUM_THREADS=1 python benchmarks/mosaic_mapper_speed.py [--samples 40]
"""

import argparse
import os
import tempfile
import time

import cv2
import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from eql_d2.data.mosaic import MosaicMixUpMapper, RandomHSV
from eql_d2.data.train_loader import TrainingImages, seeded_rngs


def _dataset(folder, num_images, rng):
    dicts = []
    for i in range(num_images):
        path = os.path.join(folder, f"{i}.jpg")
        cv2.imwrite(path, rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
        annos = [{"bbox": [float(x), float(y), 60.0, 40.0], "bbox_mode": BoxMode.XYWH_ABS,
                  "category_id": 1, "iscrowd": 0} for x, y in rng.integers(0, 400, (7, 2))]
        dicts.append({"file_name": path, "image_id": i, "height": 480, "width": 640,
                      "annotations": annos})
    return dicts


def _ms_per_sample(fn, dicts, samples):
    fn(dicts[0], 0)
    start = time.perf_counter()
    for k in range(samples):
        with seeded_rngs(k):
            fn(dicts[k % len(dicts)], k)
    return (time.perf_counter() - start) / samples * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        dicts = _dataset(folder, args.images, np.random.default_rng(0))
        sizes = tuple(range(448, 833, 32))  # YOLOX's multi-scale range at 640
        augs = [RandomHSV((0.015, 0.7, 0.4)), T.ResizeShortestEdge(sizes, 832, "choice"),
                T.RandomFlip()]
        plain = DatasetMapper(is_train=True, augmentations=augs, image_format="BGR")
        mosaic = MosaicMixUpMapper(plain, size=(640, 640))
        images = TrainingImages(dicts)
        rows = [("plain image + HSV + resize + flip",
                 _ms_per_sample(lambda d, k: plain(d), dicts, args.samples)),
                ("Mosaic + affine + MixUp + HSV + resize + flip",
                 _ms_per_sample(lambda d, k: mosaic(d, images=images, iteration=k), dicts,
                                args.samples))]
    for name, ms in rows:
        print(f"{name:48s} {ms:7.1f} ms per sample")


if __name__ == "__main__":
    main()
