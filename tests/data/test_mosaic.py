"""Mosaic, the random affine, MixUp and HSV jitter (eql_d2.data.mosaic) and their place in
the resumable loader: boxes follow the pixels of their objects, the stream depends on
(seed, position) only, and samples of the last epochs are plain images."""

import itertools

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetMapper
from detectron2.structures import BoxMode

from eql_d2.data.mosaic import (HSVTransform, MosaicMixUpMapper, box_candidates,
                                no_augmentation_iters)
from eql_d2.data.train_loader import ResumableTrainLoader, TrainingImages, seeded_rngs

SIZE = (64, 64)
BACKGROUND = (0, 0, 0)


def _colour(k):
    """A colour of its own for object k (never grey, so never the canvas fill 114)."""
    return (40 + 7 * k % 200, 250 - 11 * k % 180, 30 + (k * 53) % 60)


def _dataset(tmp_path, num_images=6, image_size=(64, 64), seed=0):
    """Images of known rectangles, each of a colour of its own (category id = object
    number), on a black background; returns the dataset dicts."""
    rng = np.random.default_rng(seed)
    dicts, k = [], 0
    h, w = image_size
    for i in range(num_images):
        image = np.zeros((h, w, 3), dtype=np.uint8)
        annos = []
        for _ in range(3):
            bw, bh = rng.integers(6, w // 2), rng.integers(6, h // 2)
            x, y = rng.integers(0, w - bw), rng.integers(0, h - bh)
            if image[y:y + bh, x:x + bw].any():  # overlapping: skip, every object stays whole
                continue
            image[y:y + bh, x:x + bw] = _colour(k)
            annos.append({"bbox": [int(x), int(y), int(bw), int(bh)], "bbox_mode": BoxMode.XYWH_ABS,
                          "category_id": k, "iscrowd": 0})
            k += 1
        path = str(tmp_path / f"{i}.png")
        cv2.imwrite(path, image)
        dicts.append({"file_name": path, "image_id": i, "height": h, "width": w,
                      "annotations": annos})
    return dicts


def _mapper(**kwargs):
    image_mapper = DatasetMapper(is_train=True, augmentations=[], image_format="BGR")
    settings = dict(size=SIZE, degrees=0.0, scale=(1.0, 1.0), shear=0.0, translate=0.0,
                    mixup_prob=0.0)
    settings.update(kwargs)
    return MosaicMixUpMapper(image_mapper, **settings)


def _pixel_box(image, colour):
    """XYXY box around the pixels of exactly `colour` (None when there are none)."""
    ys, xs = np.nonzero((image == np.array(colour, dtype=np.uint8)).all(axis=2))
    if not len(xs):
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


@pytest.mark.parametrize("seed", range(4))
def test_mosaic_boxes_are_the_boxes_of_their_pasted_objects(tmp_path, seed):
    """No affine change of scale or angle: every pixel moves by whole pixels, so each kept
    box is exactly the box of its object's visible pixels, and every object that stays
    visible with sides above 2 px and a fifth of its area keeps its box."""
    dicts = _dataset(tmp_path, seed=seed)
    mapper = _mapper()
    with seeded_rngs(seed):
        canvas, boxes, annos = mapper.mosaic([dicts[0], dicts[1], dicts[2], dicts[3]])
        image, kept, kept_annos = mapper.random_affine(canvas, boxes, annos)
    assert canvas.shape == (128, 128, 3) and image.shape == (64, 64, 3)
    # on the canvas: every object whole, cut at the canvas edge, or outside it (empty box)
    for box, anno in zip(boxes, annos):
        pixels = _pixel_box(canvas, _colour(anno["category_id"]))
        if pixels is None:
            assert box[0] == box[2] or box[1] == box[3]
        else:
            assert np.array_equal(box, pixels)
    for box, anno in zip(kept, kept_annos):
        assert np.array_equal(box, _pixel_box(image, _colour(anno["category_id"])))
    kept_ids = {a["category_id"] for a in kept_annos}
    for box, anno in zip(boxes, annos):
        visible = _pixel_box(image, _colour(anno["category_id"]))
        expected = visible is not None and box_candidates(box[None], visible[None])[0]
        assert (anno["category_id"] in kept_ids) == expected


@pytest.mark.parametrize("seed", range(4))
def test_affine_boxes_enclose_their_rotated_sheared_scaled_objects(tmp_path, seed):
    """YOLOX's ranges (rotation 10 degrees, scale 0.5-1.5, shear 2 degrees, translation
    0.1): a box is the box around its warped corners, so it holds every pixel of its object
    and, for an object inside the image, exceeds its pixels by the interpolated rim only."""
    dicts = _dataset(tmp_path, seed=seed)
    mapper = _mapper(degrees=10.0, scale=(0.5, 1.5), shear=2.0, translate=0.1)
    with seeded_rngs(100 + seed):
        canvas, boxes, annos = mapper.mosaic(dicts[:4])
        image, kept, kept_annos = mapper.random_affine(canvas, boxes, annos)
    assert len(kept)
    for box, anno in zip(kept, kept_annos):
        pixels = _pixel_box(image, _colour(anno["category_id"]))
        if pixels is None:  # a thin object whose pixels are all blended at its rim
            continue
        assert (pixels[:2] >= box[:2] - 0.5).all() and (pixels[2:] <= box[2:] + 0.5).all()
        inside = (box[:2] > 0).all() and box[2] < SIZE[1] and box[3] < SIZE[0]
        if inside:
            # rotation by at most 10 degrees and 2 degrees of shear enlarge the box of a
            # rectangle of side s by s (sin 10 + tan 2) at most, plus 1 px of rim each side
            size = box[2:] - box[:2]
            slack = size * (np.sin(np.radians(10)) + np.tan(np.radians(2))) + 2
            assert (pixels[:2] - box[:2] <= slack).all() and (box[2:] - pixels[2:] <= slack).all()


def test_mixup_keeps_both_images_boxes_and_blends_half_and_half(tmp_path):
    dicts = _dataset(tmp_path, num_images=5, seed=7)
    mapper = _mapper(mixup_prob=1.0, mixup_scale=(1.0, 1.0))
    images = TrainingImages(dicts[4:])  # the mixed image is the last one
    first = cv2.imread(dicts[0]["file_name"])
    first_boxes = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                            for a in dicts[0]["annotations"]], dtype=np.float64)
    other = cv2.imread(dicts[4]["file_name"])
    flips = set()
    for seed in range(6):
        with seeded_rngs(seed):
            out, boxes, annos = mapper.mixup(first, first_boxes, list(dicts[0]["annotations"]),
                                             images)
        n = len(first_boxes)
        assert np.array_equal(boxes[:n], first_boxes)
        assert [a["category_id"] for a in annos[:n]] == [a["category_id"]
                                                         for a in dicts[0]["annotations"]]
        assert len(boxes) == n + len(dicts[4]["annotations"])
        # scale 1: the mixed image is the other one as it is, or flipped
        flipped = not np.array_equal(boxes[n:], [_pixel_box(other, _colour(a["category_id"]))
                                                 for a in annos[n:]])
        flips.add(flipped)
        mixed = other[:, ::-1] if flipped else other
        for box, anno in zip(boxes[n:], annos[n:]):
            assert np.array_equal(box, _pixel_box(mixed, _colour(anno["category_id"])))
        expected = (0.5 * first.astype(np.float32) + 0.5 * mixed.astype(np.float32))
        assert np.array_equal(out, np.clip(expected, 0, 255).astype(np.uint8))
    assert flips == {False, True}


def test_a_full_sample_carries_the_mosaic_boxes_as_instances(tmp_path):
    dicts = _dataset(tmp_path, seed=3)
    mapper = _mapper(mixup_prob=1.0)
    images = TrainingImages(dicts)
    with seeded_rngs(11):
        out = mapper(dicts[0], images=images, iteration=0)
    image = out["image"].permute(1, 2, 0).numpy()
    assert image.shape == (64, 64, 3) and (out["height"], out["width"]) == SIZE
    instances = out["instances"]
    assert len(instances) > 0
    # mixed colours are not their objects' colours: check the boxes on the unmixed sample
    mapper = _mapper()
    with seeded_rngs(11):
        out = mapper(dicts[0], images=images, iteration=0)
    image = out["image"].permute(1, 2, 0).numpy()
    for box, cls in zip(out["instances"].gt_boxes.tensor.numpy(),
                        out["instances"].gt_classes.tolist()):
        assert np.allclose(box, _pixel_box(image, _colour(cls)))


def test_samples_of_the_last_epochs_are_plain_images(tmp_path):
    dicts = _dataset(tmp_path, seed=2, image_size=(48, 80))
    mapper = _mapper(mixup_prob=1.0, no_aug_from_iter=5)
    plain = DatasetMapper(is_train=True, augmentations=[], image_format="BGR")
    images = TrainingImages(dicts)
    for iteration in (0, 4, 5, 9):
        with seeded_rngs(iteration):
            out = mapper(dicts[1], images=images, iteration=iteration)
        if iteration < 5:
            assert tuple(out["image"].shape[1:]) == SIZE
        else:
            assert torch.equal(out["image"], plain(dicts[1])["image"])
            assert torch.equal(out["instances"].gt_boxes.tensor,
                               plain(dicts[1])["instances"].gt_boxes.tensor)


def _batches(loader, n):
    return [[(d["image"], d["instances"].gt_boxes.tensor, d["instances"].gt_classes)
             for d in batch] for batch in itertools.islice(iter(loader), n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_mosaic_stream_resumes_exactly_and_switches_at_its_iteration(tmp_path, workers):
    """Batches 3..5 of a loader started at batch 3 (with 0 or 2 workers) are those of the
    uninterrupted loader; with repeat factor sampling the extra images are drawn by their
    repeat factors; from the switch iteration on every sample is a plain image."""
    dicts = _dataset(tmp_path, num_images=8, seed=5, image_size=(48, 80))
    factors = torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0])

    def loader(start, num_workers):
        mapper = _mapper(mixup_prob=0.5, degrees=10.0, scale=(0.5, 1.5), shear=2.0,
                         translate=0.1, no_aug_from_iter=4)
        result = ResumableTrainLoader(
            dicts, mapper, total_batch_size=2, seed=9, sampler="RepeatFactorTrainingSampler",
            repeat_factors=factors, aspect_ratio_grouping=False, num_workers=num_workers)
        result.start_iter = start
        return result

    whole = _batches(loader(0, 0), 6)
    resumed = _batches(loader(3, workers), 3)
    for a, b in zip(whole[3:], resumed):
        for (ia, ba, ca), (ib, bb, cb) in zip(a, b):
            assert torch.equal(ia, ib) and torch.equal(ba, bb) and torch.equal(ca, cb)
    shapes = [[tuple(s[0].shape[1:]) for s in batch] for batch in whole]
    assert shapes[:4] == [[SIZE, SIZE]] * 4
    assert shapes[4:] == [[(48, 80), (48, 80)]] * 2


def test_extra_images_are_drawn_as_the_sampler_weights_them():
    images = TrainingImages(list(range(3)), weights=torch.tensor([1.0, 0.0, 3.0]))
    with seeded_rngs(0):
        draws = np.array([images.draw() for _ in range(4000)])
    assert not (draws == 1).any()
    assert abs((draws == 2).mean() - 0.75) < 0.03
    uniform = TrainingImages(list(range(4)))
    with seeded_rngs(0):
        draws = np.array([uniform.draw() for _ in range(4000)])
    assert np.abs(np.bincount(draws, minlength=4) / 4000 - 0.25).max() < 0.03


def test_hsv_jitter_of_a_grey_image_scales_its_value():
    """A grey pixel has saturation 0 and value = its level: the gains' closed form is
    level -> floor(level x value gain), whatever the hue and saturation gains."""
    levels = np.arange(0, 256, 5, dtype=np.uint8)
    image = np.repeat(levels[:, None, None], 3, axis=2).repeat(2, axis=1)
    out = HSVTransform((1.3, 0.6, 0.7)).apply_image(image)
    expected = np.floor(levels.astype(np.float64) * 0.7).astype(np.uint8)
    assert np.array_equal(out[:, 0, 0], expected) and (out == out[:, :1, :1]).all()
    assert np.array_equal(HSVTransform((1.0, 1.0, 1.0)).apply_image(image), image)


def test_no_augmentation_iterations_are_whole_epochs_of_the_sampler():
    from eql_d2.config import get_eql_cfg

    cfg = get_eql_cfg(opts=["SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "1000",
                            "INPUT.MOSAIC.NO_AUG_EPOCHS", "15.0"])
    # 10 images per epoch at batch 4: 3 iterations per epoch, 45 for 15 epochs
    assert no_augmentation_iters(cfg, 10) == 45
    cfg.INPUT.MOSAIC.NO_AUG_EPOCHS = 1000.0
    assert no_augmentation_iters(cfg, 10) == 1000
    cfg.INPUT.MOSAIC.NO_AUG_EPOCHS = -1.0
    with pytest.raises(ValueError, match="NO_AUG_EPOCHS"):
        no_augmentation_iters(cfg, 10)


def test_bad_settings_are_refused_with_their_key():
    with pytest.raises(ValueError, match="INPUT.MOSAIC.SCALE"):
        _mapper(scale=(2.0, 1.0))
    with pytest.raises(ValueError, match="INPUT.MOSAIC.MIXUP.PROB"):
        _mapper(mixup_prob=1.5)
    masks = DatasetMapper(is_train=True, augmentations=[], image_format="BGR",
                          use_instance_mask=True)
    with pytest.raises(ValueError, match="MASK_ON"):
        MosaicMixUpMapper(masks, size=SIZE)
