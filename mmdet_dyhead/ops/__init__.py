from .dcn_op import (
    BACKWARD_OP_NAME,
    CPU_IMPL_ENV,
    OP_NAME,
    dcn_cpu_implementation,
    modulated_deform_conv2d_op,
)
from .deform_conv import (
    DCN_BACKENDS,
    ModulatedDeformConv,
    deform_conv2d,
    deform_conv_output_size,
    mmcv_ops_available,
    modulated_deform_conv2d,
    resolve_dcn_backend,
)
from .export_state import exporting

__all__ = [
    'BACKWARD_OP_NAME',
    'CPU_IMPL_ENV',
    'DCN_BACKENDS',
    'ModulatedDeformConv',
    'OP_NAME',
    'dcn_cpu_implementation',
    'deform_conv2d',
    'deform_conv_output_size',
    'exporting',
    'mmcv_ops_available',
    'modulated_deform_conv2d',
    'modulated_deform_conv2d_op',
    'resolve_dcn_backend',
]
