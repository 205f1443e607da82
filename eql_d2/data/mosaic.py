"""YOLOX's training augmentation as detectron2 pieces: Mosaic and MixUp (a multi-image
mapper), the random affine of a mosaic, HSV jitter (an ``Augmentation``).

Mosaic and MixUp read several images for one sample, which a per-image detectron2
``Augmentation`` cannot; :class:`MosaicMixUpMapper` wraps the per-image mapper instead and
is called by :class:`~eql_d2.data.train_loader.ResumableTrainLoader` with the training
images and the iteration of the sample. For a sample it

1. with probability ``INPUT.MOSAIC.PROB``: places the sampled image and three more, each
   resized to fit ``INPUT.MOSAIC.SIZE`` (h, w), around a random centre of a (2h, 2w) canvas
   filled with ``INPUT.MOSAIC.FILL``; boxes are moved with their image and clipped to the
   canvas;
2. warps the canvas to (h, w) with a random affine map about its centre (rotation, scale,
   shear, translation: ``INPUT.MOSAIC.DEGREES`` / ``SCALE`` / ``SHEAR`` / ``TRANSLATE``);
   each box becomes the box around its warped corners, clipped to the image, and boxes that
   became too small, too thin or lost most of their area are dropped (YOLOX's
   ``box_candidates``: sides > 2 px, aspect ratio < 20, area > 0.2 of the scaled original);
3. with probability ``INPUT.MOSAIC.MIXUP.PROB`` (when the mosaic kept a box): blends it
   half and half with one more plain image that has annotations, resized to fit (h, w),
   scaled by a factor in ``INPUT.MOSAIC.MIXUP.SCALE``, flipped with probability 0.5 and cut
   at a random offset; its boxes that survive the cut (sides > 5 px) join the sample;
4. hands the result to the per-image mapper's augmentations (detectron2's resize for
   multi-scale training and flip, and :class:`RandomHSV` when ``INPUT.HSV.ENABLED``) and
   annotation handling, as if it were one image of size (h, w).

Otherwise, and for every sample of an iteration at or after :attr:`no_aug_from_iter`
(YOLOX's last ``INPUT.MOSAIC.NO_AUG_EPOCHS``), the sample is the per-image mapper's output.
This is YOLOX's ``MosaicDetection`` of release 0.2 (``random_perspective`` about the
canvas centre); the image size of multi-scale training comes from detectron2's
``INPUT.MIN_SIZE_TRAIN`` choices per image rather than YOLOX's one size per 10 iterations.

Every random choice comes from numpy's global RNG, which the loader seeds from (seed, stream
position) for each sample, and the extra images are drawn from that RNG too: a resumed run
and any number of workers see the same augmented stream.
"""

import math
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

__all__ = ["AffineTransform", "HSVTransform", "RandomHSV", "MosaicMixUpMapper",
           "build_train_augmentations", "box_candidates", "random_affine_matrix",
           "no_augmentation_iters"]

# Where a mixed image with no annotation is looked for: tries before MixUp is skipped for
# the sample (YOLOX retries without limit; a dataset of mostly empty images would hang).
MIXUP_DRAWS = 100


def box_candidates(before: np.ndarray, after: np.ndarray, min_side: float = 2.0,
                   max_aspect_ratio: float = 20.0, min_area_ratio: float = 0.2) -> np.ndarray:
    """[N] bool: the boxes worth keeping after a geometric augmentation (YOLOX's rule).

    before, after: [N, 4] XYXY boxes before (scaled to the new resolution) and after it.
    Kept: both sides of ``after`` above `min_side` pixels, aspect ratio below
    `max_aspect_ratio`, and at least `min_area_ratio` of the area of ``before``."""
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w2 / (h2 + 1e-16), h2 / (w2 + 1e-16))
    return ((w2 > min_side) & (h2 > min_side) & (w2 * h2 / (w1 * h1 + 1e-16) > min_area_ratio)
            & (aspect < max_aspect_ratio))


class AffineTransform(T.Transform):
    """The affine map ``[x', y'] = matrix @ [x, y, 1]`` onto an image of (height, width):
    ``cv2.warpAffine`` (bilinear, borders filled with `fill`) for images, the matrix for
    coordinates; detectron2's ``apply_box`` then gives the box around a box's four warped
    corners."""

    def __init__(self, matrix: np.ndarray, height: int, width: int, fill: int = 114):
        super().__init__()
        self._set_attributes(dict(matrix=np.asarray(matrix, dtype=np.float64)[:2],
                                  height=int(height), width=int(width), fill=int(fill)))

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        channels = img.shape[2] if img.ndim == 3 else 1
        return cv2.warpAffine(img, self.matrix, (self.width, self.height),
                              flags=cv2.INTER_LINEAR, borderValue=(self.fill,) * channels)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords @ self.matrix[:, :2].T + self.matrix[:, 2]

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return cv2.warpAffine(segmentation, self.matrix, (self.width, self.height),
                              flags=cv2.INTER_NEAREST, borderValue=0)


def random_affine_matrix(in_size: Tuple[int, int], out_size: Tuple[int, int], *,
                         degrees: float, scale: Tuple[float, float], shear: float,
                         translate: float) -> Tuple[np.ndarray, float]:
    """YOLOX's random affine map from an image of `in_size` (h, w) to one of `out_size`:
    the input's centre moved to the origin, rotated by U(-degrees, degrees) and scaled by
    s ~ U(scale), sheared by U(-shear, shear) degrees along each axis, then moved to
    U(0.5 -/+ translate) x the output size. Returns the [3, 3] matrix and s (numpy's RNG)."""
    (in_h, in_w), (out_h, out_w) = in_size, out_size
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -in_w / 2, -in_h / 2
    rotation = np.eye(3)
    angle = np.random.uniform(-degrees, degrees)
    s = np.random.uniform(scale[0], scale[1])
    rotation[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=angle, scale=s)
    shearing = np.eye(3)
    shearing[0, 1] = math.tan(np.random.uniform(-shear, shear) * math.pi / 180)
    shearing[1, 0] = math.tan(np.random.uniform(-shear, shear) * math.pi / 180)
    translation = np.eye(3)
    translation[0, 2] = np.random.uniform(0.5 - translate, 0.5 + translate) * out_w
    translation[1, 2] = np.random.uniform(0.5 - translate, 0.5 + translate) * out_h
    return translation @ shearing @ rotation @ centre, s


class HSVTransform(T.Transform):
    """Multiply an image's hue, saturation and value by `gains` (hue modulo OpenCV's 180),
    through lookup tables as YOLOX does; coordinates do not change."""

    def __init__(self, gains: Sequence[float], image_format: str = "BGR"):
        super().__init__()
        self._set_attributes(dict(gains=np.asarray(gains, dtype=np.float64),
                                  image_format=image_format))

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        to_hsv, from_hsv = ((cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB) if self.image_format == "RGB"
                            else (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR))
        hue, sat, val = cv2.split(cv2.cvtColor(np.ascontiguousarray(img), to_hsv))
        x = np.arange(256, dtype=np.float64)
        luts = ((x * self.gains[0]) % 180, np.clip(x * self.gains[1], 0, 255),
                np.clip(x * self.gains[2], 0, 255))
        hsv = cv2.merge([cv2.LUT(ch, lut.astype(np.uint8)) for ch, lut in zip((hue, sat, val), luts)])
        return cv2.cvtColor(hsv, from_hsv)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def inverse(self) -> T.Transform:
        return T.NoOpTransform()


class RandomHSV(T.Augmentation):
    """With probability `prob`, :class:`HSVTransform` with gains 1 + U(-g, g) for the hue,
    saturation and value gains g of `gains` (YOLOX: 0.015, 0.7, 0.4)."""

    def __init__(self, gains: Sequence[float], prob: float = 1.0, image_format: str = "BGR"):
        super().__init__()
        if image_format not in ("BGR", "RGB"):
            raise ValueError(f"INPUT.HSV needs colour images: INPUT.FORMAT {image_format!r} is "
                             "not BGR or RGB")
        self._init(dict(gains=np.asarray(gains, dtype=np.float64), prob=float(prob),
                        image_format=image_format))

    def get_transform(self, image):
        if self._rand_range() >= self.prob:
            return T.NoOpTransform()
        return HSVTransform(np.random.uniform(-1, 1, 3) * self.gains + 1, self.image_format)


def build_train_augmentations(cfg):
    """The training augmentations of detectron2's ``DatasetMapper`` for `cfg` (crop, resize
    from INPUT.MIN_SIZE_TRAIN, flip), preceded by :class:`RandomHSV` when
    ``INPUT.HSV.ENABLED`` (YOLOX jitters colours first)."""
    from detectron2.data import DatasetMapper

    augs = list(DatasetMapper.from_config(cfg, True)["augmentations"])
    hsv = cfg.INPUT.HSV
    if hsv.ENABLED:
        if len(hsv.GAINS) != 3 or any(g < 0 for g in hsv.GAINS):
            raise ValueError(f"INPUT.HSV.GAINS {tuple(hsv.GAINS)} must be three non-negative "
                             "gains (hue, saturation, value)")
        _check_probability("INPUT.HSV.PROB", hsv.PROB)
        augs.insert(0, RandomHSV(hsv.GAINS, hsv.PROB, cfg.INPUT.FORMAT))
    return augs


def no_augmentation_iters(cfg, images_per_epoch: float) -> int:
    """Iterations of YOLOX's last phase without Mosaic and MixUp: ``INPUT.MOSAIC.NO_AUG_EPOCHS``
    epochs of ``images_per_epoch`` at ``SOLVER.IMS_PER_BATCH``, at most ``SOLVER.MAX_ITER``."""
    from ..solver import epoch_length

    epochs = cfg.INPUT.MOSAIC.NO_AUG_EPOCHS
    if epochs < 0:
        raise ValueError(f"INPUT.MOSAIC.NO_AUG_EPOCHS must be >= 0, got {epochs}")
    per_epoch = epoch_length(images_per_epoch, cfg.SOLVER.IMS_PER_BATCH)
    return min(round(epochs * per_epoch), cfg.SOLVER.MAX_ITER)


def _resize(image, boxes, height, width):
    """cv2's bilinear resize (as YOLOX; several times faster than detectron2's PIL resize of
    uint8 images), with detectron2's ``ResizeTransform`` moving the boxes."""
    h0, w0 = image.shape[:2]
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    if resized.ndim < image.ndim:  # cv2 drops a single channel
        resized = resized[..., None]
    return resized, T.ResizeTransform(h0, w0, height, width).apply_box(boxes)


def _check_probability(key, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key} must lie in [0, 1], got {value}")


def _check_range(key, value, low=0.0):
    if len(value) != 2 or not low < value[0] <= value[1]:
        raise ValueError(f"{key} {tuple(value)} must be (min, max) with {low} < min <= max")


class MosaicMixUpMapper:
    """Training mapper with Mosaic, the random affine and MixUp (see the module doc) around a
    per-image ``DatasetMapper``.

    :class:`~eql_d2.data.train_loader.ResumableTrainLoader` calls it as
    ``mapper(record, images=..., iteration=...)`` (``multi_image``): `images` is the training
    set, indexable and with ``draw()`` giving an index as the sampler weights images;
    `iteration` the training iteration whose batch the sample is in.
    """

    multi_image = True

    @configurable
    def __init__(self, image_mapper, *, size: Tuple[int, int], prob: float = 1.0,
                 degrees: float = 10.0, scale: Tuple[float, float] = (0.1, 2.0),
                 shear: float = 2.0, translate: float = 0.1, fill: int = 114,
                 mixup_prob: float = 1.0, mixup_scale: Tuple[float, float] = (0.5, 1.5),
                 no_aug_from_iter: Optional[int] = None):
        """
        Args:
            image_mapper: detectron2 ``DatasetMapper`` (training): its image format,
                augmentations and annotation handling finish every sample.
            size: (h, w) of a mosaic after the affine map (YOLOX's input size).
            prob: probability of a mosaic per sample.
            degrees, scale, shear, translate: the random affine (:func:`random_affine_matrix`).
            fill: value of the canvas outside the pasted images.
            mixup_prob: probability of MixUp per mosaic (0: never).
            mixup_scale: range of the mixed image's scale factor.
            no_aug_from_iter: samples of this iteration on are plain images (None: never).
        """
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"INPUT.MOSAIC.SIZE {tuple(size)} must be (height, width) > 0")
        _check_probability("INPUT.MOSAIC.PROB", prob)
        _check_probability("INPUT.MOSAIC.MIXUP.PROB", mixup_prob)
        _check_range("INPUT.MOSAIC.SCALE", scale)
        _check_range("INPUT.MOSAIC.MIXUP.SCALE", mixup_scale)
        if not 0.0 <= translate <= 0.5:
            raise ValueError(f"INPUT.MOSAIC.TRANSLATE must lie in [0, 0.5], got {translate}")
        if getattr(image_mapper, "use_instance_mask", False) or getattr(
                image_mapper, "use_keypoint", False):
            raise ValueError("INPUT.MOSAIC moves boxes only: it cannot train masks or keypoints "
                             "(MODEL.MASK_ON / MODEL.KEYPOINT_ON)")
        self.image_mapper = image_mapper
        self.size = (int(size[0]), int(size[1]))
        self.prob = float(prob)
        self.degrees, self.scale = float(degrees), tuple(scale)
        self.shear, self.translate = float(shear), float(translate)
        self.fill = int(fill)
        self.mixup_prob, self.mixup_scale = float(mixup_prob), tuple(mixup_scale)
        self.no_aug_from_iter = no_aug_from_iter

    @classmethod
    def from_config(cls, cfg, image_mapper):
        mosaic = cfg.INPUT.MOSAIC
        return {"image_mapper": image_mapper, "size": tuple(mosaic.SIZE), "prob": mosaic.PROB,
                "degrees": mosaic.DEGREES, "scale": tuple(mosaic.SCALE), "shear": mosaic.SHEAR,
                "translate": mosaic.TRANSLATE, "fill": mosaic.FILL,
                "mixup_prob": mosaic.MIXUP.PROB if mosaic.MIXUP.ENABLED else 0.0,
                "mixup_scale": tuple(mosaic.MIXUP.SCALE)}

    # ------------------------------------------------------------------ one sample

    def __call__(self, record, *, images, iteration: int):
        if ((self.no_aug_from_iter is not None and iteration >= self.no_aug_from_iter)
                or np.random.uniform() >= self.prob):
            return self.image_mapper(record)
        image, boxes, annos = self.mosaic([record] + [images[images.draw()] for _ in range(3)])
        image, boxes, annos = self.random_affine(image, boxes, annos)
        if len(boxes) and self.mixup_prob > 0 and np.random.uniform() < self.mixup_prob:
            image, boxes, annos = self.mixup(image, boxes, annos, images)
        return self._finish(record, image, boxes, annos)

    def _load(self, record):
        """Image (the mapper's format), [N, 4] XYXY boxes and the annotations they belong to."""
        image = utils.read_image(record["file_name"], format=self.image_mapper.image_format)
        utils.check_image_size(record, image)
        annos = [{"category_id": a["category_id"], "iscrowd": a.get("iscrowd", 0)}
                 for a in record.get("annotations", ())]
        boxes = np.array([BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
                          for a in record.get("annotations", ())],
                         dtype=np.float64).reshape(-1, 4)
        return image, boxes, annos

    def _fit(self, image, boxes):
        """Resize to fit in ``size`` keeping the aspect ratio (YOLOX's rule), boxes too."""
        h0, w0 = image.shape[:2]
        r = min(self.size[0] / h0, self.size[1] / w0)
        return _resize(image, boxes, int(h0 * r), int(w0 * r)) + (r,)

    def mosaic(self, records):
        """The four images of `records` around a random centre of the (2h, 2w) canvas;
        returns it, the [N, 4] boxes clipped to it and their annotations."""
        h, w = self.size
        yc = int(np.random.uniform(0.5 * h, 1.5 * h))
        xc = int(np.random.uniform(0.5 * w, 1.5 * w))
        canvas, all_boxes, all_annos = None, [], []
        for k, record in enumerate(records):
            image, boxes, annos = self._load(record)
            image, boxes, _ = self._fit(image, boxes)
            ih, iw = image.shape[:2]
            if canvas is None:
                canvas = np.full((2 * h, 2 * w) + image.shape[2:], self.fill, dtype=np.uint8)
            # the image's corner at the centre: top-left, top-right, bottom-left, bottom-right
            x1, x2 = (max(xc - iw, 0), xc) if k in (0, 2) else (xc, min(xc + iw, 2 * w))
            y1, y2 = (max(yc - ih, 0), yc) if k in (0, 1) else (yc, min(yc + ih, 2 * h))
            sx1 = iw - (x2 - x1) if k in (0, 2) else 0
            sy1 = ih - (y2 - y1) if k in (0, 1) else 0
            canvas[y1:y2, x1:x2] = image[sy1:sy1 + (y2 - y1), sx1:sx1 + (x2 - x1)]
            all_boxes.append(boxes + [x1 - sx1, y1 - sy1, x1 - sx1, y1 - sy1])
            all_annos.extend(annos)
        boxes = np.concatenate(all_boxes, axis=0)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, 2 * w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, 2 * h)
        return canvas, boxes, all_annos

    def random_affine(self, canvas, boxes, annos):
        """The canvas warped to ``size`` by :func:`random_affine_matrix`; boxes warped,
        clipped, and filtered by :func:`box_candidates`."""
        h, w = self.size
        matrix, s = random_affine_matrix(canvas.shape[:2], (h, w), degrees=self.degrees,
                                         scale=self.scale, shear=self.shear,
                                         translate=self.translate)
        affine = AffineTransform(matrix, h, w, self.fill)
        image = affine.apply_image(canvas)
        if not len(boxes):
            return image, boxes, annos
        warped = affine.apply_box(boxes)
        warped[:, 0::2] = warped[:, 0::2].clip(0, w)
        warped[:, 1::2] = warped[:, 1::2].clip(0, h)
        keep = box_candidates(boxes * s, warped)
        return image, warped[keep], [a for a, k in zip(annos, keep) if k]

    def mixup(self, image, boxes, annos, images):
        """Blend with one more image that has annotations (YOLOX's ``mixup``); unchanged
        when none of its boxes survives the cut, or none is found in MIXUP_DRAWS draws."""
        for _ in range(MIXUP_DRAWS):
            record = images[images.draw()]
            if record.get("annotations"):
                break
        else:
            return image, boxes, annos
        jitter = np.random.uniform(*self.mixup_scale)
        flip = np.random.uniform() > 0.5
        other, other_boxes, other_annos = self._load(record)
        other, other_boxes, _ = self._fit(other, other_boxes)
        h, w = self.size
        placed = np.full((h, w) + other.shape[2:], self.fill, dtype=np.uint8)
        placed[:other.shape[0], :other.shape[1]] = other
        placed, other_boxes = _resize(placed, other_boxes, int(h * jitter), int(w * jitter))
        if flip:
            hflip = T.HFlipTransform(placed.shape[1])
            placed, other_boxes = hflip.apply_image(placed), hflip.apply_box(other_boxes)
        # zero padding up to the sample's size, then a random cut of that size (YOLOX's)
        ph, pw = max(placed.shape[0], h), max(placed.shape[1], w)
        padded = np.zeros((ph, pw) + placed.shape[2:], dtype=np.uint8)
        padded[:placed.shape[0], :placed.shape[1]] = placed
        y0 = np.random.randint(0, ph - h) if ph > h else 0
        x0 = np.random.randint(0, pw - w) if pw > w else 0
        cut = padded[y0:y0 + h, x0:x0 + w]
        moved = other_boxes - [x0, y0, x0, y0]
        moved[:, 0::2] = moved[:, 0::2].clip(0, w)
        moved[:, 1::2] = moved[:, 1::2].clip(0, h)
        keep = box_candidates(other_boxes, moved, min_side=5.0)
        if not keep.any():
            return image, boxes, annos
        # floor((a + b) / 2): YOLOX's uint8(0.5 a + 0.5 b), without float images
        blended = ((image.astype(np.uint16) + cut) >> 1).astype(np.uint8)
        return (blended, np.concatenate([boxes, moved[keep]], axis=0),
                annos + [a for a, k in zip(other_annos, keep) if k])

    def _finish(self, record, image, boxes, annos):
        """The per-image mapper's augmentations and annotation handling on the composed
        image (whose size is the sample's ``height`` / ``width``)."""
        mapper = self.image_mapper
        out = {"file_name": record["file_name"], "image_id": record.get("image_id"),
               "height": image.shape[0], "width": image.shape[1],
               "annotations": [dict(a, bbox=b.tolist(), bbox_mode=BoxMode.XYXY_ABS)
                               for a, b in zip(annos, boxes)]}
        aug_input = T.AugInput(image)
        transforms = mapper.augmentations(aug_input)
        image = aug_input.image
        out["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        mapper._transform_annotations(out, transforms, image.shape[:2])
        return out
