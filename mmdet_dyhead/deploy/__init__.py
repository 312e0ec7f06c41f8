"""ONNX export of DyHead detectors without custom operators.

See docs/deploy.md. The graph holds backbone, necks and the dense head's raw
outputs (decoded outside it with mmdet's own code), or, exported with
``postprocess=True``, also priors, decoding and NMS: final detections.
:mod:`.runtime` runs such a file with numpy, OpenCV and onnxruntime only;
it imports nothing from this package, so it is not re-exported here.
"""

from .dcn_onnx import DEFORM_CONV_MIN_OPSET, ONNX_DCN_FORMS, onnx_dcn_export
from .inputs import load_images, preprocess_settings
from .native_backend import (
    NativeBackendError,
    check_exportable_modules,
    use_native_dcn,
)
from .onnx_export import (
    DEFAULT_OPSET,
    DEPLOY_FORMAT,
    MIN_OPSET,
    deploy_metadata,
    detections_from_outputs,
    export_onnx,
    graph_op_counts,
    img_shapes,
    match_detections,
    onnxruntime_session,
    resolve_dcn_export,
    run_onnxruntime,
    verify_end_to_end,
    verify_onnx,
)
from .postprocess import (
    DetectorWithPostprocess,
    PostprocessError,
    postprocess_settings,
)
from .tensor_forward import DetectorTensorForward, decode_raw_outputs
from .two_stage import TwoStageWithPostprocess, two_stage_settings

__all__ = [
    'load_images',
    'preprocess_settings',
    'DEPLOY_FORMAT',
    'deploy_metadata',
    'detections_from_outputs',
    'img_shapes',
    'verify_end_to_end',
    'DetectorWithPostprocess',
    'TwoStageWithPostprocess',
    'two_stage_settings',
    'PostprocessError',
    'postprocess_settings',
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
