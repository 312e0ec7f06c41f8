"""Whether an exporter or compiler that needs standard ops is running."""

import torch


def exporting() -> bool:
    """Whether an exporter or compiler, which needs standard ops, is running.

    The task attention's Eq. 5 function switches to plain ops when it is
    True. Plain ``torch.jit.trace`` (mmengine's FLOP counter) keeps the fast
    path: it records the autograd function as one op.
    """
    if torch.onnx.is_in_onnx_export() or torch.jit.is_scripting():
        return True
    compiler = getattr(torch, 'compiler', None)
    return bool(compiler is not None and compiler.is_compiling())
