"""Make a detector config exportable: DyHead on the native DCN backend only.

mmcv's ``modulated_deform_conv2d`` is a compiled kernel. The TorchScript
ONNX exporter writes it as a custom ``MMCVModulatedDeformConv2d`` node that
plain onnxruntime cannot run, so the export must use the native backend
(``dcn_backend='torch'``, written as ONNX ``DeformConv`` or as
``grid_sample`` + ``matmul``, see :mod:`.dcn_onnx`).
Both backends read the same weights, so switching needs no retraining.
"""

from typing import Any, List, Sequence, Tuple

import torch.nn as nn

# Config types that build our DCN layers and take ``dcn_backend``.
DYHEAD_TYPES = ('DyHeadNeck',)


class NativeBackendError(ValueError):
    """The model cannot be exported without a custom ONNX op."""


def _type_name(node: dict) -> str:
    # Scoped names ('mmdet.DyHeadNeck') and classes are both legal in configs.
    t = node.get('type', '')
    t = getattr(t, '__name__', t)
    return str(t).split('.')[-1]


def _walk(node: Any, path: str) -> List[Tuple[str, dict]]:
    found = []
    if isinstance(node, dict):
        if 'type' in node:
            found.append((path, node))
        for key, value in node.items():
            found += _walk(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found += _walk(value, f'{path}.{i}')
    return found


def use_native_dcn(model_cfg: dict, path: str = 'model') -> List[str]:
    """Set every DyHead ``dcn_backend`` in ``model_cfg`` to ``'torch'``, in
    place.

    ``'auto'`` (or no setting) becomes ``'torch'``, which is what ``'auto'``
    runs anyway (the package's DCN operator, which the export writes in
    standard ONNX). An explicit
    ``'mmcv'`` is refused: the config asks for the compiled op, which ONNX
    cannot express, and silently overriding an explicit choice would hide
    that from the user.

    Args:
        model_cfg (dict): The ``model`` section of a config (mmengine
            ``ConfigDict`` or plain dict).
        path (str): Name of ``model_cfg`` in messages.

    Returns:
        list[str]: Config paths whose backend was set, e.g.
        ``['model.neck.1']``.

    Raises:
        NativeBackendError: A DyHead module asks for ``dcn_backend='mmcv'``,
            or the config uses mmdet's own ``DyHead`` (mmcv kernel only).
    """
    changed = []
    for where, node in _walk(model_cfg, path):
        name = _type_name(node)
        if name == 'DyHead':
            raise NativeBackendError(
                f"{where} is mmdet's DyHead, which always calls mmcv's "
                f'compiled DCN kernel; ONNX has no such operator. Replace it '
                f"with type='DyHeadNeck' (same checkpoint keys and outputs "
                f"with preset='mmdet') and export again."
            )
        if name not in DYHEAD_TYPES:
            continue
        backend = node.get('dcn_backend', 'auto')
        if backend == 'mmcv':
            raise NativeBackendError(
                f"{where} ({name}) has dcn_backend='mmcv': mmcv's compiled "
                f'DCN kernel has no ONNX equivalent (it would export as a '
                f'custom op that onnxruntime cannot run). Export needs the '
                f'native backend: pass --cfg-options '
                f'{where}.dcn_backend=torch '
                f"(or set dcn_backend='auto' in the config; "
                f"'auto' is switched to 'torch' for export). The checkpoint "
                f'loads unchanged: both backends use the same weights.'
            )
        if backend != 'torch':
            node['dcn_backend'] = 'torch'
            changed.append(where)
    return changed


def check_exportable_modules(
    model: nn.Module, replaced: Sequence[str] = ()
) -> None:
    """Refuse a built model that still contains compiled mmcv ops.

    Catches what :func:`use_native_dcn` cannot see in the config: modules
    built with the mmcv backend by code, or other mmcv.ops layers (DCN in a
    backbone, for example).

    Args:
        model (nn.Module): The detector to export.
        replaced (Sequence[str]): Names of modules the export writes as
            standard ONNX itself (a two-stage graph's RoIAlign layers).

    Raises:
        NativeBackendError: Naming the first offending module and the fix.
    """
    for name, module in model.named_modules():
        if name in replaced:
            continue
        backend = getattr(module, 'backend', None)
        if (
            type(module).__name__ == 'ModulatedDeformConv'
            and backend == 'mmcv'
        ):
            raise NativeBackendError(
                f"module '{name}' runs DCN with backend='mmcv', which has no "
                f"ONNX equivalent. Build the model with dcn_backend='torch' "
                f"(config: dcn_backend='torch' or 'auto' on every DyHeadNeck)."
            )
        if type(module).__module__.startswith('mmcv.ops'):
            raise NativeBackendError(
                f"module '{name}' is {type(module).__module__}."
                f'{type(module).__name__}, a compiled mmcv op with no '
                f'standard ONNX equivalent; export supports models built '
                f'from standard PyTorch layers plus '
                f"DyHeadNeck(dcn_backend='torch')."
            )
