"""Plot what DyHead's attentions do (paper Figures 3 and 4).

    python tools/visualize_attention.py CONFIG CHECKPOINT \
        --images a.jpg b.jpg --out-dir vis/ [--blocks 2 4 6] [--layer NAME] \
        [--ratio-images DIR_OR_FILES ...] [--levels 0 1 2]

Writes, in --out-dir:
- ``features_<image>.png``: per image, activation maps (channel L2 norm)
  of each pyramid level before the first block and after the selected
  blocks (Figure 4);
- ``scale_ratios_block<k>.png``: per selected block, the histogram over
  --ratio-images (default: --images) of the learned scale ratio per level,
  w(higher resolution) / w(lower resolution) (Figure 3);
- ``scale_ratios.json``: those ratios as numbers.
The blocks record their attentions only while the tool runs them (their
``record_attention`` switch); their outputs are the same either way.
"""

import argparse
import glob
import json
import os
import os.path as osp
import sys

import torch

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def parse_args(argv=None):
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', help='config file')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument(
        '--images',
        nargs='+',
        required=True,
        help='images (or folders of images) for the feature-map figure',
    )
    p.add_argument('--out-dir', required=True, help='folder for the PNGs')
    p.add_argument(
        '--blocks',
        nargs='+',
        type=int,
        default=None,
        help='1-based blocks to show (default: 2 4 6 as in the '
        'paper, those that exist; else all)',
    )
    p.add_argument(
        '--layer',
        default=None,
        help='DyHeadNeck or DynamicHeadBlock to record (default: the '
        'first DyHeadNeck); an unknown name lists the choices',
    )
    p.add_argument(
        '--levels',
        nargs='+',
        type=int,
        default=None,
        help='pyramid levels in the feature figure (default: all)',
    )
    p.add_argument(
        '--ratio-images',
        nargs='+',
        default=None,
        help='image files or folders for the scale-ratio '
        'histogram (default: --images)',
    )
    p.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings',
    )
    p.add_argument(
        '--allow-partial-checkpoint',
        action='store_true',
        help='plot with a checkpoint that leaves model weights unloaded '
        '(they keep their initial values); refused by default',
    )
    return p.parse_args(argv)


def expand_images(items):
    """Files as given; folders replaced by the images they contain."""
    out = []
    for item in items:
        if osp.isdir(item):
            out += sorted(
                f
                for f in glob.glob(osp.join(item, '*'))
                if f.lower().endswith(IMAGE_EXTS)
            )
        else:
            out.append(item)
    return out


def network_image(model, inputs, sample):
    """The RGB uint8 image the network saw (resized, padding cut off)."""
    pre = model.data_preprocessor
    img = inputs[0] * pre.std.cpu() + pre.mean.cpu()
    if not getattr(pre, '_channel_conversion', False):
        img = img[[2, 1, 0]]  # the batch is still BGR: show RGB
    h, w = sample.metainfo['img_shape']
    return img[:, :h, :w].clamp(0, 255).byte().permute(1, 2, 0).numpy()


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmdet.apis import init_detector
    from mmengine.config import Config

    import mmdet_dyhead  # noqa: F401  (registers DyHeadNeck)
    from mmdet_dyhead.checkpoint import CheckpointError, load_checkpoint
    from mmdet_dyhead.deploy import load_images
    from mmdet_dyhead.visualization import (
        AttentionRecorder,
        plot_feature_stages,
        plot_scale_ratio_histograms,
        resolve_layer,
    )

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    model = init_detector(cfg, device='cpu')
    try:
        load_checkpoint(
            model, args.checkpoint, allow_partial=args.allow_partial_checkpoint
        )
    except CheckpointError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    try:
        name, layer = resolve_layer(model, args.layer)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    num_blocks = len(getattr(layer, 'dyhead_blocks', [layer]))
    blocks = args.blocks or (
        [b for b in (2, 4, 6) if b <= num_blocks]
        or list(range(1, num_blocks + 1))
    )
    bad = [b for b in blocks if not 1 <= b <= num_blocks]
    if bad:
        print(
            f'error: --blocks {bad} out of range: {name} has blocks '
            f'1..{num_blocks} (1-based).',
            file=sys.stderr,
        )
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    written = []

    with AttentionRecorder(layer) as feats, torch.no_grad():
        for path in expand_images(args.images):
            inputs, samples = load_images(model, [path])
            model.extract_feat(inputs)
            feats.collect()
            num_levels = len(feats.stages[0])
            levels = args.levels or list(range(num_levels))
            bad = [lv for lv in levels if not 0 <= lv < num_levels]
            if bad:
                print(
                    f'error: --levels {bad} out of range: the pyramid has '
                    f'levels 0..{num_levels - 1}.',
                    file=sys.stderr,
                )
                return 2
            out = osp.join(
                args.out_dir,
                f'features_{osp.splitext(osp.basename(path))[0]}.png',
            )
            plot_feature_stages(
                network_image(model, inputs, samples[0]),
                {
                    k: v
                    for k, v in feats.stages.items()
                    if k == 0 or k in blocks
                },
                0,
                samples[0].metainfo['img_shape'],
                tuple(inputs.shape[-2:]),
                out,
                levels,
                title=f'{osp.basename(path)}: {name}',
            )
            written.append(out)

    ratio_images = expand_images(args.ratio_images or args.images)
    with AttentionRecorder(layer) as scale, torch.no_grad():
        for path in ratio_images:
            inputs, _ = load_images(model, [path])
            model.extract_feat(inputs)
            scale.collect()
    summary = {}
    for b in blocks:
        if b not in scale.scale_weights:
            print(f'block {b} has no scale-aware attention: no histogram.')
            continue
        ratios = scale.scale_ratios(b)
        out = osp.join(args.out_dir, f'scale_ratios_block{b}.png')
        plot_scale_ratio_histograms(
            ratios, out, title=f'{name}, block {b}: {len(ratio_images)} images'
        )
        written.append(out)
        summary[str(b)] = {str(lv): r.tolist() for lv, r in ratios.items()}
    json_file = osp.join(args.out_dir, 'scale_ratios.json')
    with open(json_file, 'w') as f:
        json.dump(dict(layer=name, images=ratio_images, blocks=summary), f)
    written.append(json_file)
    print('wrote:\n  ' + '\n  '.join(written))
    return 0


if __name__ == '__main__':
    sys.exit(main())
