from .deform_conv import (
    DCN_BACKENDS,
    ModulatedDeformConv,
    SharedMaps,
    deform_conv2d,
    deform_conv_output_size,
    exporting,
    mmcv_ops_available,
    modulated_deform_conv2d,
    resolve_dcn_backend,
)

__all__ = [
    'DCN_BACKENDS',
    'ModulatedDeformConv',
    'SharedMaps',
    'deform_conv2d',
    'deform_conv_output_size',
    'exporting',
    'mmcv_ops_available',
    'modulated_deform_conv2d',
    'resolve_dcn_backend',
]
