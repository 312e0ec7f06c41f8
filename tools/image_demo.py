"""Detect objects in images with mmdet's DetInferencer (see --help)."""

from mmdet_dyhead.cli.image_demo import main

if __name__ == '__main__':
    main()
