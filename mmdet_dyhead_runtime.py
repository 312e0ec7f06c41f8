"""Run an end-to-end ONNX detector with numpy, OpenCV and onnxruntime or
OpenVINO only: the torch-free runner of mmdet-dyhead.

For files written by ``tools/export_onnx.py --postprocess``
(``dyhead-export-onnx``): the file's metadata holds the test pipeline's
resize, the normalisation and padding, the class names and the baked-in
test_cfg, so this module needs neither torch nor mmdet/mmcv/mmengine. It
is a top-level module of the mmdet-dyhead wheel, apart from the
``mmdet_dyhead`` package because that package's ``__init__`` imports
torch (it registers the models). Three ways to run it, none of which
imports torch::

    dyhead-run-onnx model.onnx img1.jpg img2.jpg \\
        [--out-json dets.json] [--show-dir vis/] [--show-thr 0.3] \\
        [--backend {onnxruntime,openvino}]
    python -m mmdet_dyhead_runtime model.onnx img1.jpg ...
    python mmdet_dyhead_runtime.py model.onnx img1.jpg ...  # a copy

It prints one JSON object per image: boxes in the original image's pixels
(x1, y1, x2, y2), scores and labels (with names when the file has them).
The same steps as mmdet's inference: ``cv2.imread`` (BGR), the config's
``Resize`` (mmcv's rounding), BGR->RGB, ``(x - mean) / std``, zero padding
to the size divisor; boxes scaled back by mmdet's ``scale_factor``.
"""

import argparse
import json
import math
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

__all__ = [
    'BACKENDS',
    'DEPLOY_FORMAT',
    'OPENVINO_CHECKED',
    'OnnxDetector',
    'OpenVinoSession',
    'MAX_RESIZE_SIDE',
    'add_deform_conv_extension',
    'check_preprocess',
    'deform_conv_converter',
    'draw',
    'main',
    'make_session',
    'parse_args',
    'preprocess',
    'read_image',
    'read_metadata',
    'resize',
    'to_json',
]

# Must equal mmdet_dyhead.deploy.onnx_export.DEPLOY_FORMAT.
DEPLOY_FORMAT = 'mmdet_dyhead.detections.v1'

_INTERPOLATION = {
    'nearest': cv2.INTER_NEAREST,
    'bilinear': cv2.INTER_LINEAR,
    'bicubic': cv2.INTER_CUBIC,
    'area': cv2.INTER_AREA,
    'lanczos': cv2.INTER_LANCZOS4,
}


# Where the metadata of a bad file comes from, and how to replace it.
_EXPORT_AGAIN = (
    'export the model again with tools/export_onnx.py --postprocess '
    '(dyhead-export-onnx)'
)
# The longest side a resize may produce: one 8192 x 8192 image is 805 MB of
# float32 (an 800 x 1333 one 13 MB), so a larger scale is a corrupt file,
# refused before anything is allocated.
MAX_RESIZE_SIDE = 8192
_PREPROCESS_KEYS = (
    'resize',
    'mean',
    'std',
    'bgr_to_rgb',
    'pad_size_divisor',
    'pad_value',
)


def _refuse(onnx_file: str, key: str, problem: str, fix: str = '') -> str:
    """One line: the file, the metadata key, what is wrong, the fix."""
    return f'{onnx_file}: metadata {key} {problem}; {fix or _EXPORT_AGAIN}.'


def _is_number(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def check_preprocess(settings, onnx_file: str = 'the file') -> None:
    """Refuse ``preprocess`` metadata the runner cannot apply correctly.

    The checks stand where a wrong value would otherwise give wrong
    detections without a word (a negative or zero ``std``), a traceback
    (pad divisor 0, an unknown interpolation, a missing key) or an
    allocation of the size the file asks for (an absurd resize scale).

    Args:
        settings (dict): The file's ``mmdet_dyhead.preprocess`` metadata
            (:func:`mmdet_dyhead.deploy.preprocess_settings` writes it).
        onnx_file (str): Named in the message.

    Raises:
        ValueError: One line naming the file, the key and the fix.
    """
    key = 'mmdet_dyhead.preprocess'
    if not isinstance(settings, dict):
        raise ValueError(
            _refuse(onnx_file, key, f'is {settings!r}, not a JSON object')
        )
    for name in _PREPROCESS_KEYS:
        if name not in settings:
            raise ValueError(_refuse(onnx_file, f'{key}.{name}', 'is missing'))
    resize = settings['resize']
    if resize is not None:
        _check_resize(resize, onnx_file, f'{key}.resize')
    mean, std = settings['mean'], settings['std']
    if (mean is None) != (std is None):
        raise ValueError(
            _refuse(
                onnx_file,
                f'{key}.mean/std',
                f'are {mean!r} and {std!r}: both or neither must be set',
            )
        )
    for name, values in (('mean', mean), ('std', std)):
        if values is None:
            continue
        if (
            not isinstance(values, list)
            or len(values) not in (1, 3)
            or not all(map(_is_number, values))
        ):
            raise ValueError(
                _refuse(
                    onnx_file,
                    f'{key}.{name}',
                    f'is {values!r}, not 1 or 3 finite numbers',
                )
            )
    if std is not None and min(std) <= 0:
        raise ValueError(
            _refuse(
                onnx_file,
                f'{key}.std',
                f'is {std!r}; a standard deviation must be positive (0 '
                f'divides by zero, a negative one flips the image)',
                'set model.data_preprocessor.std in the config to the '
                f'training values and {_EXPORT_AGAIN}',
            )
        )
    if not isinstance(settings['bgr_to_rgb'], bool):
        raise ValueError(
            _refuse(
                onnx_file,
                f'{key}.bgr_to_rgb',
                f'is {settings["bgr_to_rgb"]!r}, not true or false',
            )
        )
    div = settings['pad_size_divisor']
    if (
        isinstance(div, bool)
        or not isinstance(div, int)
        or not 1 <= div <= MAX_RESIZE_SIDE
    ):
        raise ValueError(
            _refuse(
                onnx_file,
                f'{key}.pad_size_divisor',
                f'is {div!r}, not a whole number from 1 to {MAX_RESIZE_SIDE}',
                'set model.data_preprocessor.pad_size_divisor in the '
                f'config (1: no padding, 32: the usual) and {_EXPORT_AGAIN}',
            )
        )
    if not _is_number(settings['pad_value']):
        raise ValueError(
            _refuse(
                onnx_file,
                f'{key}.pad_value',
                f'is {settings["pad_value"]!r}, not a finite number',
            )
        )


def _check_resize(resize, onnx_file: str, key: str) -> None:
    if not isinstance(resize, dict):
        raise ValueError(
            _refuse(onnx_file, key, f'is {resize!r}, not a JSON object')
        )
    for name in ('scale', 'keep_ratio', 'interpolation'):
        if name not in resize:
            raise ValueError(_refuse(onnx_file, f'{key}.{name}', 'is missing'))
    scale = resize['scale']
    if (
        not isinstance(scale, list)
        or len(scale) != 2
        or not all(
            isinstance(v, int)
            and not isinstance(v, bool)
            and 1 <= v <= MAX_RESIZE_SIDE
            for v in scale
        )
    ):
        raise ValueError(
            _refuse(
                onnx_file,
                f'{key}.scale',
                f'is {scale!r}, not [width, height] in whole pixels from 1 '
                f'to {MAX_RESIZE_SIDE}',
                "set the test pipeline's Resize scale in the config (e.g. "
                f'(1333, 800)) and {_EXPORT_AGAIN}',
            )
        )
    if not isinstance(resize['keep_ratio'], bool):
        raise ValueError(
            _refuse(
                onnx_file,
                f'{key}.keep_ratio',
                f'is {resize["keep_ratio"]!r}, not true or false',
            )
        )
    if resize['interpolation'] not in _INTERPOLATION:
        raise ValueError(
            _refuse(
                onnx_file,
                f'{key}.interpolation',
                f'is {resize["interpolation"]!r}, not one of '
                f'{tuple(_INTERPOLATION)}',
                "set the test pipeline's Resize interpolation in the config "
                f'to one of them and {_EXPORT_AGAIN}',
            )
        )


def read_metadata(session, onnx_file: str = 'the file') -> Dict:
    """The ``mmdet_dyhead.*`` metadata of an end-to-end file, checked.

    Args:
        session (onnxruntime.InferenceSession | OpenVinoSession): The
            loaded file.
        onnx_file (str): Its path, named in the messages.

    Returns:
        dict: ``preprocess``, ``postprocess`` (dicts), ``classes`` (list).

    Raises:
        ValueError: Not an end-to-end file of this format (a raw-map
            export, or another tool's), metadata that is missing, not JSON
            or out of range (see :func:`check_preprocess`), or
            preprocessing the runner cannot reproduce. The message is one
            line naming the file, the key and what to do.
    """
    props = session.get_modelmeta().custom_metadata_map
    fmt = props.get('mmdet_dyhead.format')
    if fmt != DEPLOY_FORMAT:
        raise ValueError(
            f'{onnx_file} is not an end-to-end export (metadata '
            f'mmdet_dyhead.format={fmt!r}, expected {DEPLOY_FORMAT!r}). '
            f'Export it with tools/export_onnx.py --postprocess; raw-map '
            f'files need mmdet_dyhead.deploy.decode_raw_outputs (torch).'
        )
    meta = {}
    for name, kind in (
        ('preprocess', dict),
        ('postprocess', dict),
        ('classes', list),
    ):
        key = f'mmdet_dyhead.{name}'
        if key not in props:
            raise ValueError(_refuse(onnx_file, key, 'is missing'))
        try:
            meta[name] = json.loads(props[key])
        except ValueError as e:
            raise ValueError(
                _refuse(onnx_file, key, f'is not valid JSON ({e})')
            ) from None
        if not isinstance(meta[name], kind):
            raise ValueError(
                _refuse(
                    onnx_file,
                    key,
                    f'is {type(meta[name]).__name__}, not a JSON '
                    f'{"object" if kind is dict else "list"}',
                )
            )
    if not all(isinstance(c, str) for c in meta['classes']):
        raise ValueError(
            _refuse(onnx_file, 'mmdet_dyhead.classes', 'holds non-strings')
        )
    if 'unsupported' in meta['preprocess']:
        raise ValueError(
            f"{onnx_file}: the config's test pipeline has a step this "
            f'runner does not reproduce '
            f'({meta["preprocess"]["unsupported"]}); preprocess the images '
            f'yourself and call OnnxDetector.run(batch, img_shape).'
        )
    check_preprocess(meta['preprocess'], onnx_file)
    return meta


def make_session(onnx_file: str, num_threads: Optional[int] = None):
    """An onnxruntime CPU session; a clear error for an old onnxruntime.

    Args:
        onnx_file (str): The end-to-end model.
        num_threads (int, optional): Intra-op threads (None: default).

    Raises:
        RuntimeError: This onnxruntime has no ``DeformConv`` kernel; the
            message names both ways out.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
    _check_file(onnx_file)
    try:
        return ort.InferenceSession(
            onnx_file, options, providers=['CPUExecutionProvider']
        )
    except Exception as e:
        if 'DeformConv' not in str(e):
            raise RuntimeError(
                _unreadable(onnx_file, f'onnxruntime {ort.__version__}', e)
            ) from e
        raise RuntimeError(
            f'onnxruntime {ort.__version__} cannot run the DeformConv nodes '
            f'of {onnx_file} (its CPU kernel needs onnxruntime >= 1.25). '
            f'Upgrade onnxruntime (pip install "onnxruntime>=1.25"), run '
            f'the file with --backend openvino, or export again with '
            f'--dcn-export grid_sample.'
        ) from e


def _check_file(onnx_file: str) -> None:
    if not osp.isfile(onnx_file):
        raise FileNotFoundError(
            f'{onnx_file}: no such file; give the path of a file written '
            f'by tools/export_onnx.py --postprocess.'
        )


def _unreadable(onnx_file: str, runtime: str, error: Exception) -> str:
    """One line for a file the runtime cannot load (truncated, not ONNX,
    ...), with the runtime's own reason (its last line, the specific one)."""
    lines = [line.strip() for line in str(error).splitlines()]
    reason = next((line for line in reversed(lines) if line), repr(error))
    return (
        f'{onnx_file}: {runtime} cannot load it ({reason}); if the file is '
        f'truncated or not an ONNX model, {_EXPORT_AGAIN}.'
    )


def resize(image: np.ndarray, settings: Dict) -> Tuple[np.ndarray, Tuple]:
    """The config's ``Resize`` with mmcv's rounding.

    Args:
        image (np.ndarray): (H, W, 3) uint8 BGR.
        settings (dict): ``scale`` [w, h], ``keep_ratio``,
            ``interpolation`` (the file's ``preprocess.resize``), or None
            for no resize.

    Returns:
        tuple: The resized image and mmdet's ``scale_factor``
        (new_w / w, new_h / h).
    """
    if not settings:
        return image, (1.0, 1.0)
    h, w = image.shape[:2]
    sw, sh = settings['scale']
    if settings['keep_ratio']:
        # mmcv.rescale_size: fit the long side to the long edge of the
        # scale and the short side to its short edge; round half up.
        factor = min(max(sw, sh) / max(h, w), min(sw, sh) / min(h, w))
        new_w, new_h = int(w * factor + 0.5), int(h * factor + 0.5)
    else:
        new_w, new_h = sw, sh
    out = cv2.resize(
        image,
        (new_w, new_h),
        interpolation=_INTERPOLATION[settings['interpolation']],
    )
    return out, (new_w / w, new_h / h)


def preprocess(
    images: Sequence[np.ndarray], settings: Dict
) -> Tuple[np.ndarray, np.ndarray, List[Tuple[float, float]]]:
    """Images -> the graph's ``input`` and ``img_shape`` (mmdet's steps).

    Args:
        images (Sequence[np.ndarray]): (H, W, 3) uint8 BGR, as cv2.imread.
        settings (dict): The file's ``preprocess`` metadata.

    Returns:
        tuple: ``batch`` (N, 3, H, W) float32 (normalised, zero-padded to
        the size divisor and to the largest image), ``img_shape`` (N, 2)
        float32 (height, width before padding) and each image's
        ``scale_factor`` (w, h).
    """
    arrays, shapes, factors = [], [], []
    mean = settings['mean']
    std = settings['std']
    for image in images:
        img, factor = resize(image, settings['resize'])
        if settings['bgr_to_rgb']:
            img = img[..., ::-1]
        x = img.astype(np.float32)
        if mean is not None:
            x = (x - np.asarray(mean, np.float32)) / np.asarray(
                std, np.float32
            )
        arrays.append(x.transpose(2, 0, 1))
        shapes.append(img.shape[:2])
        factors.append(factor)
    div = settings['pad_size_divisor']
    h = max(s[0] for s in shapes)
    w = max(s[1] for s in shapes)
    h, w = -(-h // div) * div, -(-w // div) * div
    batch = np.full(
        (len(arrays), 3, h, w), settings['pad_value'], dtype=np.float32
    )
    for i, x in enumerate(arrays):
        batch[i, :, : x.shape[1], : x.shape[2]] = x
    return batch, np.asarray(shapes, np.float32), factors


# The OpenVINO release the DeformConv conversion below was checked on.
OPENVINO_CHECKED = '2026.4.1'


def _omitted(output) -> bool:
    """True for an optional ONNX input left empty (the frontend's
    ``NullNode``)."""
    return output.get_node().get_type_name() == 'NullNode'


def deform_conv_converter(opset):
    """ONNX ``DeformConv`` as OpenVINO's ``DeformableConvolution`` (v8).

    A converter for ``openvino.frontend.ConversionExtension('DeformConv',
    ...)``: OpenVINO 2026.4 has no conversion rule of its own for the
    standard ONNX operator. Both operators read the offsets alike, (dy, dx)
    per kernel tap with the taps in row-major order and ``offset_group``
    blocks of them along the channels, which is mmcv's layout too, so
    offsets and masks pass through unchanged (checked numerically against
    onnxruntime and mmcv in tests/test_openvino.py). The rest is mapped:

    - ``B`` (optional in ONNX, absent in OpenVINO): added after, per
      output channel.
    - ``pads`` [top, left, bottom, right]: ``pads_begin`` [top, left],
      ``pads_end`` [bottom, right]; ``strides``, ``dilations``, ``group``
      and ``offset_group`` (``deformable_group``) as they are, with ONNX's
      defaults when absent.
    - The border: ``bilinear_interpolation_pad=True`` is mmcv's (and
      onnxruntime's) rule: a tap inside (-1, H) x (-1, W) is interpolated
      with zeros for the corners outside the map, a tap further out gives
      0. With ``False`` OpenVINO drops every tap outside
      [0, H - 1] x [0, W - 1] whole.
    - ``mask`` omitted: the mask-less form, i.e. a mask of ones.

    Args:
        opset: OpenVINO's ``opset8`` module.

    Returns:
        callable: ``NodeContext -> [Output]``.
    """

    def convert(node):
        count = node.get_input_size()
        data, weight, offset = (node.get_input(i) for i in range(3))
        bias = node.get_input(3) if count > 3 else None
        mask = node.get_input(4) if count > 4 else None
        pads = list(node.get_attribute('pads', [0, 0, 0, 0]))
        strides = list(node.get_attribute('strides', [1, 1]))
        dilations = list(node.get_attribute('dilations', [1, 1]))
        if (len(pads), len(strides), len(dilations)) != (4, 2, 2):
            raise ValueError(
                f'only 2-D DeformConv converts to OpenVINO (pads {pads}, '
                f'strides {strides}, dilations {dilations}).'
            )
        out = opset.deformable_convolution(
            data,
            offset,
            weight,
            strides,
            pads[:2],
            pads[2:],
            dilations,
            mask=None if mask is None or _omitted(mask) else mask,
            group=node.get_attribute('group', 1),
            deformable_group=node.get_attribute('offset_group', 1),
            bilinear_interpolation_pad=True,
        )
        if bias is not None and not _omitted(bias):
            per_channel = opset.constant(np.array([1, -1, 1, 1], np.int64))
            out = opset.add(
                out, opset.reshape(bias, per_channel, special_zero=False)
            )
        return [out.output(0)]

    return convert


def add_deform_conv_extension(core) -> bool:
    """Teach ``core``'s ONNX frontend the ONNX ``DeformConv`` operator.

    Args:
        core (openvino.Core): Before its ``read_model``.

    Returns:
        bool: False where this OpenVINO lacks what the conversion needs
        (``openvino.frontend.ConversionExtension``, ``opset8``).
    """
    try:
        from openvino.frontend import ConversionExtension
    except ImportError:
        return False
    try:
        import openvino.opset8 as opset
    except ImportError:  # releases before 2025 keep it in openvino.runtime
        try:
            from openvino.runtime import opset8 as opset
        except ImportError:
            return False
    core.add_extension(
        ConversionExtension('DeformConv', deform_conv_converter(opset))
    )
    return True


class _Meta:
    """``get_modelmeta()``'s answer: the ``custom_metadata_map``."""

    def __init__(self, props: Dict[str, str]) -> None:
        self.custom_metadata_map = props


class OpenVinoSession:
    """OpenVINO (CPU) behind onnxruntime's ``run``/``get_modelmeta``.

    Runs both forms of the export: ``DeformConv`` nodes become OpenVINO's
    own ``DeformableConvolution`` (:func:`deform_conv_converter`), the
    ``grid_sample`` form converts as it is. OpenVINO's CPU plugin fails on
    the dynamic-shape graph (a Reshape in DyHead's high branch, whose shape
    it infers wrongly while onnxruntime runs it), so one static-shape model
    is compiled per input size and kept (a keep-ratio resize produces few
    sizes).

    Args:
        onnx_file (str): An end-to-end file (either DCN form), or any ONNX
            file whose ops OpenVINO converts.
        num_threads (int, optional): ``INFERENCE_NUM_THREADS``.

    Raises:
        RuntimeError: No OpenVINO is installed, or it cannot convert the
            file's ``DeformConv`` nodes (too old for the conversion
            extension); the message names the ways out.
    """

    def __init__(self, onnx_file: str, num_threads: Optional[int] = None):
        try:
            import openvino as ov
        except ImportError as e:
            raise RuntimeError(
                'the openvino backend needs OpenVINO: pip install openvino.'
            ) from e
        self.core = ov.Core()
        extended = add_deform_conv_extension(self.core)
        self.config = {'INFERENCE_PRECISION_HINT': 'f32'}
        if num_threads:
            self.config['INFERENCE_NUM_THREADS'] = num_threads
        _check_file(onnx_file)
        version = getattr(ov, '__version__', '?').split('-')[0]
        try:
            self.model = self.core.read_model(onnx_file)
        except Exception as e:
            if 'DeformConv' not in str(e):
                raise RuntimeError(
                    _unreadable(onnx_file, f'OpenVINO {version}', e)
                ) from e
            why = (
                'the conversion to its DeformableConvolution failed'
                if extended
                else 'it has no openvino.frontend.ConversionExtension or '
                'opset8, which this runner maps DeformConv with'
            )
            raise RuntimeError(
                f'OpenVINO {version} cannot convert the DeformConv nodes of '
                f'{onnx_file} ({why}). Upgrade OpenVINO (pip install -U '
                f'openvino; {OPENVINO_CHECKED} runs them), export again '
                f'with --dcn-export grid_sample, or run this file with '
                f'--backend onnxruntime (>= 1.25).'
            ) from e
        # The ONNX frontend keeps metadata_props under rt_info 'framework'.
        info = self.model.get_rt_info()
        framework = info['framework'] if 'framework' in info else {}
        self.meta = _Meta({k: str(v.value) for k, v in framework.items()})
        self.compiled = {}

    def get_modelmeta(self) -> _Meta:
        return self.meta

    def run(self, output_names, feeds: Dict[str, np.ndarray]):
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        key = tuple(sorted(shapes.items()))
        if key not in self.compiled:
            model = self.model.clone()
            model.reshape({k: list(v) for k, v in shapes.items()})
            self.compiled[key] = self.core.compile_model(
                model, 'CPU', self.config
            )
        compiled = self.compiled[key]
        out = compiled({k: v for k, v in feeds.items()})
        return [out[o] for o in compiled.outputs]


BACKENDS = ('onnxruntime', 'openvino')


class OnnxDetector:
    """An end-to-end detector file, ready to run on images.

    Args:
        onnx_file (str): Written by ``tools/export_onnx.py --postprocess``.
        num_threads (int, optional): Intra-op threads of the backend.
        backend (str): ``'onnxruntime'`` (CPU) or ``'openvino'`` (CPU,
            either DCN form, see :class:`OpenVinoSession`).
    """

    def __init__(
        self,
        onnx_file: str,
        num_threads: Optional[int] = None,
        backend: str = 'onnxruntime',
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f'backend {backend!r}: choose one of {BACKENDS}')
        if backend == 'openvino':
            self.session = OpenVinoSession(onnx_file, num_threads)
        else:
            self.session = make_session(onnx_file, num_threads)
        meta = read_metadata(self.session, onnx_file)
        self.preprocess_settings = meta['preprocess']
        self.postprocess_settings = meta['postprocess']
        self.classes = meta['classes']

    def run(
        self, batch: np.ndarray, img_shape: np.ndarray
    ) -> Tuple[np.ndarray, np.ndarray]:
        """The graph on a preprocessed batch.

        Args:
            batch (np.ndarray): (N, 3, H, W) float32.
            img_shape (np.ndarray): (N, 2) float32 (height, width).

        Returns:
            tuple: ``dets`` (N, K, 5) and ``labels`` (N, K), in input
            pixels, unused rows with label -1.
        """
        dets, labels = self.session.run(
            None,
            {
                'input': np.ascontiguousarray(batch, np.float32),
                'img_shape': np.asarray(img_shape, np.float32),
            },
        )
        return dets, labels

    def __call__(
        self, images: Sequence[Union[str, np.ndarray]]
    ) -> List[Dict[str, np.ndarray]]:
        """Detections in each original image's pixels.

        Args:
            images (Sequence[str | np.ndarray]): Image files, or (H, W, 3)
                uint8 BGR arrays; run as one batch.

        Returns:
            list[dict]: Per image ``bboxes`` (k, 4) float32 x1, y1, x2, y2,
            ``scores`` (k,), ``labels`` (k,) int64, best first.
        """
        arrays = [read_image(i) if isinstance(i, str) else i for i in images]
        batch, shapes, factors = preprocess(arrays, self.preprocess_settings)
        dets, labels = self.run(batch, shapes)
        results = []
        for d, lab, (fw, fh) in zip(dets, labels, factors):
            used = lab >= 0
            # mmdet's rescale: boxes times (1 / w_scale, 1 / h_scale).
            inv = np.asarray([1 / fw, 1 / fh, 1 / fw, 1 / fh], np.float32)
            results.append(
                dict(
                    bboxes=d[used, :4] * inv,
                    scores=d[used, 4],
                    labels=lab[used].astype(np.int64),
                )
            )
        return results


def read_image(path: str) -> np.ndarray:
    """``path`` as (H, W, 3) uint8 BGR, as mmcv's ``LoadImageFromFile``
    (cv2 backend, ``color_type='color'``) decodes it.

    Raises:
        FileNotFoundError, ValueError: Missing, empty or undecodable file.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'image file not found: {path}')
    with open(path, 'rb') as f:
        data = np.frombuffer(f.read(), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError(
            f'image file {path} is empty or not an image OpenCV can read.'
        )
    return image


def draw(
    image: np.ndarray,
    result: Dict[str, np.ndarray],
    classes: Sequence[str],
    score_thr: float,
) -> np.ndarray:
    """A copy of ``image`` with the boxes scoring >= ``score_thr``."""
    out = image.copy()
    for box, score, label in zip(
        result['bboxes'], result['scores'], result['labels']
    ):
        if score < score_thr:
            continue
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        hue = int(label) * 47 % 180
        color = cv2.cvtColor(np.uint8([[[hue, 200, 255]]]), cv2.COLOR_HSV2BGR)[
            0, 0
        ].tolist()
        cv2.rectangle(out, (x1, y1), (x2, y2), color, 1)
        name = classes[label] if label < len(classes) else str(label)
        cv2.putText(
            out,
            f'{name} {score:.2f}',
            (x1, max(y1 - 2, 8)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.35,
            color,
            1,
        )
    return out


def to_json(
    path: str, result: Dict[str, np.ndarray], classes: Sequence[str]
) -> Dict:
    """One image's detections as JSON-ready lists."""
    labels = result['labels'].tolist()
    return dict(
        image=path,
        bboxes=np.round(result['bboxes'].astype(float), 3).tolist(),
        scores=np.round(result['scores'].astype(float), 5).tolist(),
        labels=labels,
        names=[classes[i] if i < len(classes) else str(i) for i in labels],
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Detect objects with an end-to-end ONNX file of '
        'mmdet-dyhead (numpy, OpenCV and onnxruntime or OpenVINO; no torch).'
    )
    parser.add_argument('model', help='file of export_onnx.py --postprocess')
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument(
        '--batch-size', type=int, default=1, help='images per run'
    )
    parser.add_argument(
        '--out-json', help='also write the detections to this JSON file'
    )
    parser.add_argument(
        '--show-dir', help='write each image with its boxes here'
    )
    parser.add_argument(
        '--show-thr',
        type=float,
        default=0.3,
        help='score from which --show-dir draws a box',
    )
    parser.add_argument(
        '--threads', type=int, default=None, help='backend threads'
    )
    parser.add_argument(
        '--backend',
        choices=BACKENDS,
        default='onnxruntime',
        help='runtime of the graph (default: %(default)s); openvino runs '
        'both --dcn-export forms',
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        detector = OnnxDetector(args.model, args.threads, args.backend)
    except (OSError, ValueError, RuntimeError) as e:
        # One line, also where a runtime's own message had several.
        print('error: ' + ' '.join(str(e).split()), file=sys.stderr)
        return 2
    records = []
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        try:
            arrays = [read_image(p) for p in paths]
        except (FileNotFoundError, ValueError) as e:
            print(f'error: {e}', file=sys.stderr)
            return 1
        for path, image, result in zip(paths, arrays, detector(arrays)):
            record = to_json(path, result, detector.classes)
            records.append(record)
            print(json.dumps(record))
            if args.show_dir:
                os.makedirs(args.show_dir, exist_ok=True)
                cv2.imwrite(
                    osp.join(args.show_dir, osp.basename(path)),
                    draw(image, result, detector.classes, args.show_thr),
                )
    if args.out_json:
        with open(args.out_json, 'w') as f:
            json.dump(records, f)
    return 0


if __name__ == '__main__':
    sys.exit(main())
