from .deform_conv import (
    DCN_BACKENDS,
    DEFORM_CONV_MIN_OPSET,
    ONNX_DCN_FORMS,
    ModulatedDeformConv,
    deform_conv_output_size,
    mmcv_ops_available,
    modulated_deform_conv2d,
    onnx_dcn_export,
    resolve_dcn_backend,
)

__all__ = [
    'DCN_BACKENDS',
    'DEFORM_CONV_MIN_OPSET',
    'ONNX_DCN_FORMS',
    'ModulatedDeformConv',
    'deform_conv_output_size',
    'mmcv_ops_available',
    'modulated_deform_conv2d',
    'onnx_dcn_export',
    'resolve_dcn_backend',
]
