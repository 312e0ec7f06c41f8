"""FLOP counting rules for deformable convolutions in mmengine's analyzer.

mmengine's ``FlopAnalyzer`` (used by ``get_model_complexity_info`` and
mmdet's ``tools/analysis_tools/get_flops.py``) traces the model with
``torch.jit.trace`` and counts the ops it has handles for. Autograd
functions appear as ``prim::PythonOp.<FunctionName>`` and are skipped with
an "unsupported operator" warning, so DyHead's deformable convs counted as
zero. The rules here count a deformable conv like the conv it generalises,
one multiply-add per weight per output pixel (mmengine's convention for
conv, matmul and linear):

    FLOPs = N * C_out * H_out * W_out * (C_in / groups) * kh * kw

Bilinear sampling and the mask multiply are not counted, just as a plain
conv's im2col is not. Handles are registered for:

- ``ModulatedDeformConv2dFunction`` (mmcv DCNv2, what mmdet's DyHead runs)
  and ``DeformConv2dFunction`` (mmcv DCNv1);
- ``mmdet_dyhead::modulated_deform_conv2d``: this package's DCN operator
  (``dcn_backend='torch'`` or ``'auto'``), one map per call.

Nothing is registered on import. Either set the handles on an analyzer of
your own (``FlopAnalyzer(model, inputs).set_op_handle(**FLOP_HANDLES)``),
or let :func:`flop_handles_registered` add them to mmengine's defaults for
the duration of a ``with`` block (what ``tools/get_flops.py`` does around
``get_model_complexity_info`` and mmdet's ``get_flops.py``).
"""

import contextlib
from typing import Any, Iterator, List

from mmengine.analysis.jit_handles import get_shape

MMCV_DCNV2_OP = 'prim::PythonOp.ModulatedDeformConv2dFunction'
MMCV_DCNV1_OP = 'prim::PythonOp.DeformConv2dFunction'
NATIVE_DCN_OP = 'mmdet_dyhead::modulated_deform_conv2d'


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def mmcv_deform_conv_flop_jit(weight_index: int):
    """Handle for a DCN op whose weight is input ``weight_index``.

    mmcv's functions take (input, offset, [mask,] weight, bias, stride,
    padding, dilation, groups, deform_groups), the package's operator
    (input, offset, mask, weight, bias, geometry); the weight is
    (C_out, C_in / groups, kh, kw) and the single output (N, C_out, H, W).
    """

    def handle(inputs: List[Any], outputs: List[Any]) -> int:
        out_shape = get_shape(outputs[0])
        w_shape = get_shape(inputs[weight_index])
        return _prod(out_shape) * _prod(w_shape[1:])

    return handle


def _output_elements(outputs: List[Any]) -> int:
    return sum(_prod(get_shape(out)) for out in outputs)


def deform_conv_activation_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Activations of a deformable conv: its output elements, as mmengine
    counts a conv's. ``get_model_complexity_info`` runs an
    ``ActivationAnalyzer`` beside the ``FlopAnalyzer``, with a handle table
    of its own; without an entry it calls the op unsupported."""
    return _output_elements(outputs)


FLOP_HANDLES = {
    MMCV_DCNV2_OP: mmcv_deform_conv_flop_jit(3),
    MMCV_DCNV1_OP: mmcv_deform_conv_flop_jit(2),
    NATIVE_DCN_OP: mmcv_deform_conv_flop_jit(3),
}
ACTIVATION_HANDLES = {op: deform_conv_activation_jit for op in FLOP_HANDLES}


@contextlib.contextmanager
def flop_handles_registered() -> Iterator[None]:
    """Count deformable convs in every analyzer built inside the block.

    ``FlopAnalyzer.__init__`` and ``ActivationAnalyzer.__init__`` (and so
    ``get_model_complexity_info``) copy mmengine's default handle tables,
    which have no entry for these ops. Both tables are extended on entry and
    restored on exit, so analyzers outside the block behave as mmengine
    ships them.
    """
    from mmengine.analysis import complexity_analysis as ca

    tables = (
        (ca._DEFAULT_SUPPORTED_FLOP_OPS, FLOP_HANDLES),
        (ca._DEFAULT_SUPPORTED_ACT_OPS, ACTIVATION_HANDLES),
    )
    saved = [dict(table) for table, _ in tables]
    for table, handles in tables:
        table.update(handles)
    try:
        yield
    finally:
        for (table, _), old in zip(tables, saved):
            table.clear()
            table.update(old)
