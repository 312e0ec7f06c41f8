"""OpenVINO runs ONNX ``DeformConv`` as its own ``DeformableConvolution``.

The runner's conversion extension (``mmdet_dyhead_runtime``) on one-node
``DeformConv`` graphs, against three implementations that do not share
its code: onnxruntime's ``DeformConv`` kernel, the package's native
PyTorch DCN and mmcv's compiled kernel. The sampling points are spread
over the whole map and a band around it, so that every border case of
mmcv's bilinear rule (a tap in (-1, H) x (-1, W) interpolates with zero
corners, a tap further out gives 0) is hit, on non-square maps with and
without bias, stride 1 and 2. The detector end to end is in
tests/test_deploy_e2e.py.
"""

import numpy as np
import pytest
import torch

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')
pytest.importorskip('openvino')

from mmdet_dyhead.ops import (  # noqa: E402
    mmcv_ops_available,
    modulated_deform_conv2d,
)
from mmdet_dyhead_runtime import OpenVinoSession  # noqa: E402

# size (H, W), stride, pad, dilation, groups, offset groups, bias.
CASES = {
    'stride1_bias': ((11, 13), 1, 1, 1, 1, 1, True),
    'stride2_bias': ((20, 9), 2, 1, 1, 1, 1, True),
    'stride1_no_bias': ((11, 13), 1, 1, 1, 1, 1, False),
    'stride2_no_bias': ((9, 16), 2, 1, 1, 1, 1, False),
    'dilation2_pad2': ((12, 10), 1, 2, 2, 1, 1, True),
    'groups2_offset_groups2': ((9, 14), 1, 1, 1, 2, 2, True),
}
N, C_IN, C_OUT, K = 2, 8, 6, 3


def out_size(size, stride, pad, dilation):
    return tuple(
        (s + 2 * pad - dilation * (K - 1) - 1) // stride + 1 for s in size
    )


def dcn_graph(path, size, stride, pad, dilation, groups, offset_groups, bias):
    """One ``DeformConv`` node (opset 19): X, offset and mask are graph
    inputs, W and B initialisers; without bias B is an empty input name
    (the mask stays the fifth input). Returns the weight and bias."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((C_OUT, C_IN // groups, K, K))
    weight = weight.astype(np.float32)
    b = rng.standard_normal(C_OUT).astype(np.float32) if bias else None
    ho, wo = out_size(size, stride, pad, dilation)
    taps = offset_groups * K * K
    shapes = {
        'X': [N, C_IN, *size],
        'offset': [N, 2 * taps, ho, wo],
        'mask': [N, taps, ho, wo],
    }
    node = helper.make_node(
        'DeformConv',
        ['X', 'W', 'offset', 'B' if bias else '', 'mask'],
        ['Y'],
        kernel_shape=[K, K],
        strides=[stride, stride],
        pads=[pad] * 4,
        dilations=[dilation, dilation],
        group=groups,
        offset_group=offset_groups,
    )
    inits = [numpy_helper.from_array(weight, 'W')]
    if bias:
        inits.append(numpy_helper.from_array(b, 'B'))
    graph = helper.make_graph(
        [node],
        'one_deform_conv',
        [
            helper.make_tensor_value_info(k, TensorProto.FLOAT, v)
            for k, v in shapes.items()
        ],
        [helper.make_tensor_value_info('Y', TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid('', 19)]
    )
    onnx.save(model, path)
    return weight, b


def dcn_inputs(size, stride, pad, dilation, offset_groups, seed=1):
    """Features, offsets and masks; each tap samples a point drawn over
    the map and 2.5 px around it (never on an integer)."""
    rng = np.random.default_rng(seed)
    h, w = size
    ho, wo = out_size(size, stride, pad, dilation)
    x = rng.standard_normal((N, C_IN, h, w)).astype(np.float32)
    taps = offset_groups * K * K
    # Where the taps would sample without offsets, (taps, ho, wo).
    tap = np.arange(K * K)
    base_y = (
        np.arange(ho)[None, :, None] * stride
        - pad
        + np.tile(tap // K * dilation, offset_groups)[:, None, None]
    )
    base_x = (
        np.arange(wo)[None, None, :] * stride
        - pad
        + np.tile(tap % K * dilation, offset_groups)[:, None, None]
    )
    target_y = rng.uniform(-2.5, h + 1.5, (N, taps, ho, wo)) + 0.013
    target_x = rng.uniform(-2.5, w + 1.5, (N, taps, ho, wo)) + 0.013
    offset = np.stack((target_y - base_y, target_x - base_x), axis=2)
    offset = offset.reshape(N, 2 * taps, ho, wo).astype(np.float32)
    mask = rng.random((N, taps, ho, wo)).astype(np.float32)
    # Every zone of mmcv's rule is sampled: inside, the partial band
    # (-1, 0) / (H - 1, H), and outside it.
    for t, n in ((target_y, h), (target_x, w)):
        assert ((t > -1) & (t < 0)).any() and ((t > n - 1) & (t < n)).any()
        assert (t <= -1).any() and (t >= n).any()
    return x, offset, mask


@pytest.mark.parametrize('case', sorted(CASES))
def test_openvino_deform_conv_equals_onnxruntime_torch_and_mmcv(
    case, tmp_path
):
    size, stride, pad, dilation, groups, offset_groups, bias = CASES[case]
    path = str(tmp_path / f'{case}.onnx')
    weight, b = dcn_graph(
        path, size, stride, pad, dilation, groups, offset_groups, bias
    )
    x, offset, mask = dcn_inputs(size, stride, pad, dilation, offset_groups)
    feeds = {'X': x, 'offset': offset, 'mask': mask}
    (ours,) = OpenVinoSession(path, num_threads=1).run(None, feeds)
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    refs = {'onnxruntime': session.run(None, feeds)[0]}
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    tw = torch.from_numpy(weight)
    tb = None if b is None else torch.from_numpy(b)
    with torch.no_grad():
        if groups == offset_groups == 1:  # the package's DCN: one group
            refs['torch'] = modulated_deform_conv2d(
                t['X'], t['offset'], t['mask'], tw, tb,
                stride, pad, dilation, backend='torch',
            ).numpy()  # fmt: skip
        if mmcv_ops_available():
            from mmcv.ops import modulated_deform_conv2d as mmcv_dcn

            refs['mmcv'] = mmcv_dcn(
                t['X'], t['offset'], t['mask'], tw, tb,
                stride, pad, dilation, groups, offset_groups,
            ).numpy()  # fmt: skip
    assert ours.shape == (N, C_OUT, *out_size(size, stride, pad, dilation))
    errors = {k: float(np.abs(ours - r).max()) for k, r in refs.items()}
    print(f'{case}: max abs difference of OpenVINO to', errors)
    assert max(errors.values()) < 1e-4, errors
    # Not a zero map, where any rule would agree.
    assert np.abs(refs['onnxruntime']).max() > 1
