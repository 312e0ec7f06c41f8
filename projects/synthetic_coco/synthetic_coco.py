"""A deterministic, COCO-format detection dataset drawn from scratch.

Each image holds a few objects of ``SYNTHETIC_CLASSES`` on a textured,
cluttered background. Object sizes are log-uniform over a wide range, so the
COCO small / medium / large buckets are all populated and a detector has to
handle very different scales (what DyHead's scale-aware attention is for).
Objects may occlude each other up to a configurable fraction; every box and
area is measured on the pixels that stay visible, like COCO's.

Everything is drawn with numpy and OpenCV. Image ``i`` of a split depends only
on ``(seed, split, i)`` and the drawing options, so a larger ``num_train``
adds images without changing the existing ones.
"""

import json
import math
import os
import os.path as osp
import shutil
from typing import Dict, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

SYNTHETIC_CLASSES = (
    'ellipse',
    'rectangle',
    'triangle',
    'star',
    'cross',
    'ring',
)

# Written next to the data; tells a later call that the folder is ours and
# which options made it.
META_FILE = 'synthetic_coco_meta.json'
FORMAT_VERSION = 1

_SPLIT_IDS = {'train': 0, 'val': 1, 'test': 2}
# Hard limits keep the errors near the mistake rather than deep in mmdet.
_MIN_IMAGE_SIDE = 32
_MAX_IMAGE_SIDE = 4096
_MIN_OBJECT_SIDE = 4


def _check_int(name: str, value, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f'{name} must be an integer, got {value!r}.')
    if value < low or (high is not None and value > high):
        rng = f'>= {low}' if high is None else f'in [{low}, {high}]'
        raise ValueError(f'{name} must be {rng}, got {value}.')
    return int(value)


def _parse_image_size(image_size) -> Tuple[int, int]:
    if isinstance(image_size, (int, np.integer)) and not isinstance(
        image_size, bool
    ):
        image_size = (image_size, image_size)
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise ValueError(
            f'image_size must be an int or a (height, width) pair, got '
            f'{image_size!r}.'
        )
    h = _check_int(
        'image_size height', image_size[0], _MIN_IMAGE_SIDE, _MAX_IMAGE_SIDE
    )
    w = _check_int(
        'image_size width', image_size[1], _MIN_IMAGE_SIDE, _MAX_IMAGE_SIDE
    )
    return h, w


def _parse_options(
    num_train,
    num_val,
    num_test,
    image_size,
    objects_per_image,
    size_range,
    aspect_range,
    min_visible,
    clutter,
    class_weights,
) -> dict:
    num_train = _check_int('num_train', num_train, 1, 1_000_000)
    num_val = _check_int('num_val', num_val, 1, 1_000_000)
    num_test = _check_int('num_test', num_test, 0, 1_000_000)
    h, w = _parse_image_size(image_size)
    if (
        not isinstance(objects_per_image, (tuple, list))
        or len(objects_per_image) != 2
    ):
        raise ValueError(
            'objects_per_image must be a (min, max) pair, got '
            f'{objects_per_image!r}.'
        )
    lo_n = _check_int('objects_per_image min', objects_per_image[0], 1, 200)
    hi_n = _check_int('objects_per_image max', objects_per_image[1], lo_n, 200)
    lo_s, hi_s = (float(v) for v in size_range)
    if not 0 < lo_s < hi_s <= 1:
        raise ValueError(
            'size_range=(min, max) is the object side as a fraction of the '
            f'shorter image side and needs 0 < min < max <= 1, got '
            f'{tuple(size_range)}.'
        )
    if min(h, w) * hi_s < _MIN_OBJECT_SIDE * 2:
        raise ValueError(
            f'image_size={h}x{w} with size_range max {hi_s} leaves objects '
            f'under {2 * _MIN_OBJECT_SIDE} px; use larger images or '
            'size_range.'
        )
    lo_a, hi_a = (float(v) for v in aspect_range)
    if not 0 < lo_a <= 1 <= hi_a:
        raise ValueError(
            'aspect_range=(min, max) (width / height) needs '
            f'0 < min <= 1 <= max, got {tuple(aspect_range)}.'
        )
    if not 0 < float(min_visible) <= 1:
        raise ValueError(
            'min_visible is the least visible fraction of an '
            f'occluded object, in (0, 1]; got {min_visible}.'
        )
    if not 0 <= float(clutter) <= 1:
        raise ValueError(f'clutter must be in [0, 1], got {clutter}.')
    if class_weights is None:
        class_weights = [1.0] * len(SYNTHETIC_CLASSES)
    class_weights = [float(v) for v in class_weights]
    if (
        len(class_weights) != len(SYNTHETIC_CLASSES)
        or min(class_weights) < 0
        or sum(class_weights) <= 0
    ):
        raise ValueError(
            f'class_weights needs {len(SYNTHETIC_CLASSES)} non-negative '
            f'values (one per class of {SYNTHETIC_CLASSES}) with a positive '
            f'sum, got {class_weights}.'
        )
    total = sum(class_weights)
    return dict(
        format_version=FORMAT_VERSION,
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        image_size=[h, w],
        objects_per_image=[lo_n, hi_n],
        size_range=[lo_s, hi_s],
        aspect_range=[lo_a, hi_a],
        min_visible=float(min_visible),
        clutter=float(clutter),
        class_weights=[v / total for v in class_weights],
    )


# ---------------------------------------------------------------- drawing --


def _random_color(rng: np.random.Generator) -> np.ndarray:
    """A saturated BGR colour (HSV with high S and V) so objects stand out."""
    hsv = np.array(
        [
            [
                [
                    rng.integers(0, 180),
                    rng.integers(120, 256),
                    rng.integers(130, 256),
                ]
            ]
        ],
        dtype=np.uint8,
    )
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _background(
    rng: np.random.Generator, h: int, w: int, clutter: float
) -> np.ndarray:
    """Smooth colour gradient + noise + distractor strokes, (H, W, 3) float."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        a, b, base = (
            rng.uniform(-40, 40),
            rng.uniform(-40, 40),
            rng.uniform(40, 120),
        )
        img[..., c] = base + a * yy / h + b * xx / w
    img += rng.normal(0, 4 + 12 * clutter, (h, w, 1)).astype(np.float32)
    # Thin strokes and small blobs of object-like colours: they share colour
    # and edges with objects but not shape, so colour alone cannot classify.
    side = min(h, w)
    for _ in range(int(round(clutter * 12))):
        color = tuple(float(v) * 0.8 for v in _random_color(rng))
        if rng.random() < 0.6:
            p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, p0, p1, color, int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            radius = int(rng.integers(1, max(2, side // 40) + 1))
            cv2.circle(img, center, radius, color, -1, cv2.LINE_AA)
    return img


def _star_polygon(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = np.arange(2 * points) * math.pi / points - math.pi / 2
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


# Unit shapes in [-1, 1]^2, stretched to the object's box later.
_POLYGONS = {
    'rectangle': np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64),
    'triangle': np.array([[0, -1], [1, 1], [-1, 1]], np.float64),
    'star': _star_polygon(),
    'cross': np.array(
        [
            [-0.33, -1],
            [0.33, -1],
            [0.33, -0.33],
            [1, -0.33],
            [1, 0.33],
            [0.33, 0.33],
            [0.33, 1],
            [-0.33, 1],
            [-0.33, 0.33],
            [-1, 0.33],
            [-1, -0.33],
            [-0.33, -0.33],
        ],
        np.float64,
    ),
}


def _shape_mask(
    name: str,
    h: int,
    w: int,
    cx: float,
    cy: float,
    bw: float,
    bh: float,
    angle: float,
) -> np.ndarray:
    """Boolean (H, W) mask of one shape centred at (cx, cy), box bw x bh."""
    canvas = np.zeros((h, w), np.uint8)
    if name in ('ellipse', 'ring'):
        axes = (max(1, int(round(bw / 2))), max(1, int(round(bh / 2))))
        center = (int(round(cx)), int(round(cy)))
        cv2.ellipse(canvas, center, axes, math.degrees(angle), 0, 360, 1, -1)
        if name == 'ring':
            inner = (max(1, int(axes[0] * 0.55)), max(1, int(axes[1] * 0.55)))
            cv2.ellipse(
                canvas, center, inner, math.degrees(angle), 0, 360, 0, -1
            )
    else:
        pts = _POLYGONS[name] * np.array([bw / 2, bh / 2])
        cos, sin = math.cos(angle), math.sin(angle)
        pts = pts @ np.array([[cos, sin], [-sin, cos]]) + np.array([cx, cy])
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)
    return canvas.astype(bool)


def _draw_image(rng: np.random.Generator, opts: dict):
    """Draw one image; return (uint8 BGR image, list of annotations)."""
    h, w = opts['image_size']
    side = min(h, w)
    img = _background(rng, h, w, opts['clutter'])
    labels = np.zeros((h, w), np.int32)  # 0 = background, k = object k
    objects = []  # (class index, full area in pixels)
    lo_n, hi_n = opts['objects_per_image']
    lo_s, hi_s = opts['size_range']
    lo_a, hi_a = opts['aspect_range']
    n_obj = int(rng.integers(lo_n, hi_n + 1))
    for _ in range(n_obj):
        cls = int(rng.choice(len(SYNTHETIC_CLASSES), p=opts['class_weights']))
        name = SYNTHETIC_CLASSES[cls]
        color = _random_color(rng)
        # A few placements per object; one that hides too much of an earlier
        # object is rejected, so occlusion stays below 1 - min_visible.
        for _attempt in range(10):
            size = math.exp(rng.uniform(math.log(lo_s), math.log(hi_s))) * side
            size = max(size, _MIN_OBJECT_SIDE)
            aspect = math.exp(rng.uniform(math.log(lo_a), math.log(hi_a)))
            bw = min(size * math.sqrt(aspect), w - 2)
            bh = min(size / math.sqrt(aspect), h - 2)
            # Small tilts keep the classes apart (a rectangle turned 45
            # degrees would look like a rotated diamond, not another class).
            angle = (
                rng.uniform(-0.35, 0.35)
                if name != 'star'
                else rng.uniform(-math.pi, math.pi)
            )
            # The rotated box must stay inside the image.
            ext_w = abs(bw * math.cos(angle)) + abs(bh * math.sin(angle))
            ext_h = abs(bw * math.sin(angle)) + abs(bh * math.cos(angle))
            ext_w, ext_h = min(ext_w, w - 2), min(ext_h, h - 2)
            cx = rng.uniform(ext_w / 2 + 1, w - ext_w / 2 - 1)
            cy = rng.uniform(ext_h / 2 + 1, h - ext_h / 2 - 1)
            mask = _shape_mask(name, h, w, cx, cy, bw, bh, angle)
            area = int(mask.sum())
            if area < _MIN_OBJECT_SIDE**2 // 2:
                continue
            lost = np.bincount(labels[mask], minlength=len(objects) + 1)
            visible = np.bincount(labels.ravel(), minlength=len(objects) + 1)
            ok = all(
                visible[k + 1] - lost[k + 1]
                >= opts['min_visible'] * objects[k][1]
                for k in range(len(objects))
            )
            if ok:
                break
        else:
            continue
        labels[mask] = len(objects) + 1
        objects.append((cls, area))
        # Flat colour with a vertical shading and grain, so objects are not
        # perfectly uniform patches.
        ys = np.nonzero(mask)[0]
        shade = 1.0 + 0.25 * (ys - cy) / max(bh, 1.0)
        grain = rng.normal(0, 6, (ys.size, 1))
        img[mask] = color[None] * shade[:, None] + grain
    img = np.clip(img, 0, 255).astype(np.uint8)

    anns = []
    for k, (cls, _full_area) in enumerate(objects):
        vis = labels == k + 1
        ys, xs = np.nonzero(vis)
        if ys.size == 0:
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        anns.append(
            dict(
                category_id=cls + 1,
                bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                area=float(ys.size),
                iscrowd=0,
                segmentation=_encode_rle(vis),
            )
        )
    return img, anns


def _encode_rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE of a boolean (H, W) mask (column-major runs)."""
    flat = mask.T.ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts  # RLE starts with a background run
    return dict(size=[int(mask.shape[0]), int(mask.shape[1])], counts=counts)


# --------------------------------------------------------------- the API --


def _split_paths(out_dir: str) -> Dict[str, str]:
    return dict(
        data_root=out_dir,
        train_ann=osp.join(out_dir, 'annotations', 'instances_train.json'),
        val_ann=osp.join(out_dir, 'annotations', 'instances_val.json'),
        train_img_dir=osp.join(out_dir, 'train'),
        val_img_dir=osp.join(out_dir, 'val'),
        test_ann=osp.join(out_dir, 'annotations', 'instances_test.json'),
        test_img_dir=osp.join(out_dir, 'test'),
    )


def read_synthetic_meta(out_dir: str) -> Optional[dict]:
    """The options a folder was generated with, or None if it is not ours."""
    path = osp.join(out_dir, META_FILE)
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_split(
    split: str, count: int, opts: dict, seed: int, paths: dict
) -> None:
    img_dir = paths[f'{split}_img_dir']
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
        img, anns = _draw_image(rng, opts)
        file_name = f'{i:06d}.png'
        if not cv2.imwrite(
            osp.join(img_dir, file_name), img, [cv2.IMWRITE_PNG_COMPRESSION, 1]
        ):
            raise OSError(f'could not write {osp.join(img_dir, file_name)}.')
        image_id = i + 1
        images.append(
            dict(
                id=image_id,
                file_name=file_name,
                height=img.shape[0],
                width=img.shape[1],
            )
        )
        for ann in anns:
            ann.update(id=len(annotations) + 1, image_id=image_id)
            annotations.append(ann)
    coco = dict(
        info=dict(
            description=f'mmdet-dyhead synthetic shapes ({split})',
            version=str(FORMAT_VERSION),
        ),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=[
            dict(id=k + 1, name=n, supercategory='shape')
            for k, n in enumerate(SYNTHETIC_CLASSES)
        ],
    )
    with open(paths[f'{split}_ann'], 'w') as f:
        json.dump(coco, f, separators=(',', ':'))


def generate_synthetic_coco(
    out_dir: str,
    num_train: int = 400,
    num_val: int = 100,
    num_test: int = 0,
    image_size: Union[int, Tuple[int, int]] = 192,
    seed: int = 0,
    overwrite: bool = False,
    objects_per_image: Sequence[int] = (2, 8),
    size_range: Sequence[float] = (0.05, 0.9),
    aspect_range: Sequence[float] = (0.5, 2.0),
    min_visible: float = 0.5,
    clutter: float = 0.5,
    class_weights: Optional[Sequence[float]] = None,
    reuse: bool = False,
) -> Dict[str, str]:
    """Write a deterministic COCO-format detection dataset to ``out_dir``.

    Layout: ``out_dir/annotations/instances_{train,val,test}.json``,
    ``out_dir/{train,val,test}/NNNNNN.png`` (BGR, 8 bit; test only when
    ``num_test > 0``) and
    ``out_dir/synthetic_coco_meta.json`` (the options used).

    Args:
        out_dir (str): Output folder. It may not exist, be empty, or have
            been made by this function; anything else raises.
        num_train (int): Training images (>= 1).
        num_val (int): Validation images (>= 1).
        num_test (int): Test images (>= 0), a third split drawn like the
            others, for numbers that no tuning decision looked at.
        image_size (int | tuple[int, int]): Side, or (height, width), in
            pixels; each in [32, 4096].
        seed (int): Seed; the same seed and options give identical files.
        overwrite (bool): Replace an earlier dataset in ``out_dir`` (also
            one made with other options). Without it an existing dataset
            raises ``FileExistsError``.
        objects_per_image (tuple[int, int]): Inclusive (min, max) number of
            objects drawn per image (fewer if placements keep failing the
            occlusion limit).
        size_range (tuple[float, float]): Object side (sqrt of box area
            before the aspect stretch) as a fraction of the shorter image
            side; sampled log-uniformly, so every octave is equally likely.
        aspect_range (tuple[float, float]): Box width / height, log-uniform.
        min_visible (float): Least visible fraction of an object once later
            objects are drawn over it, in (0, 1].
        clutter (float): Background noise and distractor strokes, in [0, 1].
        class_weights (Sequence[float], optional): Relative frequency of
            each class of ``SYNTHETIC_CLASSES``; uniform by default.
        reuse (bool): If ``out_dir`` already holds a dataset made with the
            same options and seed, return it without redrawing.

    Returns:
        dict[str, str]: absolute ``data_root``, ``train_ann``, ``val_ann``,
        ``train_img_dir``, ``val_img_dir`` and, when ``num_test > 0``,
        ``test_ann`` and ``test_img_dir``.
    """
    opts = _parse_options(
        num_train,
        num_val,
        num_test,
        image_size,
        objects_per_image,
        size_range,
        aspect_range,
        min_visible,
        clutter,
        class_weights,
    )
    opts['seed'] = _check_int('seed', seed, 0)
    out_dir = osp.abspath(out_dir)
    paths = _split_paths(out_dir)
    splits = ('train', 'val', 'test') if num_test else ('train', 'val')
    if not num_test:
        paths = {k: v for k, v in paths.items() if 'test' not in k}
    if osp.exists(out_dir) and not osp.isdir(out_dir):
        raise FileExistsError(f'{out_dir} exists and is not a folder.')
    if osp.isdir(out_dir) and os.listdir(out_dir):
        meta = read_synthetic_meta(out_dir)
        if meta is None:
            raise FileExistsError(
                f'{out_dir} is not empty and was not made by '
                f'generate_synthetic_coco (no {META_FILE}); refusing to write '
                f'into it. Choose an empty or new folder.'
            )
        complete = meta.pop('complete', False)
        if (
            reuse
            and complete
            and meta == opts
            and all(osp.exists(p) for p in paths.values())
        ):
            return paths
        if not overwrite:
            raise FileExistsError(
                f'{out_dir} already holds a synthetic dataset; pass '
                f'overwrite=True (--overwrite) to replace it, or reuse=True '
                f'to keep it when the options match.'
            )
        # Only what this function writes is removed; other files stay.
        for sub in ('annotations', 'train', 'val', 'test'):
            shutil.rmtree(osp.join(out_dir, sub), ignore_errors=True)
    # The marker is written first (so an interrupted run leaves a folder that
    # is recognised as ours) and flagged complete last (so it is not reused).
    os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
    _write_meta(out_dir, opts, complete=False)
    for split in splits:
        _write_split(split, opts[f'num_{split}'], opts, opts['seed'], paths)
    _write_meta(out_dir, opts, complete=True)
    return paths


def _write_meta(out_dir: str, opts: dict, complete: bool) -> None:
    with open(osp.join(out_dir, META_FILE), 'w') as f:
        json.dump(dict(opts, complete=complete), f, indent=1)
