"""Test helpers, like ``mmdet.testing``: tiny detector configs built from
mmdet's own configs, for unit tests and quick runs."""

from .tiny_configs import mmdet_config_path, shrink_model, tiny_detector_cfg

__all__ = ['mmdet_config_path', 'shrink_model', 'tiny_detector_cfg']
