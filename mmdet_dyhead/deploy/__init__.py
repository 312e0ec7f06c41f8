"""ONNX export of DyHead detectors without custom operators.

See docs/deploy.md. The graph holds backbone, necks and the dense head's raw
outputs; anchor decoding and NMS run outside it with mmdet's own code.
"""

from .dcn_onnx import DEFORM_CONV_MIN_OPSET, ONNX_DCN_FORMS, onnx_dcn_export
from .inputs import load_images
from .native_backend import (
    NativeBackendError,
    check_exportable_modules,
    use_native_dcn,
)
from .onnx_export import (
    DEFAULT_OPSET,
    MIN_OPSET,
    export_onnx,
    graph_op_counts,
    match_detections,
    onnxruntime_session,
    resolve_dcn_export,
    run_onnxruntime,
    verify_onnx,
)
from .tensor_forward import DetectorTensorForward, decode_raw_outputs

__all__ = [
    'load_images',
    'NativeBackendError',
    'check_exportable_modules',
    'use_native_dcn',
    'DEFAULT_OPSET',
    'MIN_OPSET',
    'export_onnx',
    'graph_op_counts',
    'match_detections',
    'onnxruntime_session',
    'resolve_dcn_export',
    'run_onnxruntime',
    'verify_onnx',
    'DetectorTensorForward',
    'decode_raw_outputs',
    'DEFORM_CONV_MIN_OPSET',
    'ONNX_DCN_FORMS',
    'onnx_dcn_export',
]
