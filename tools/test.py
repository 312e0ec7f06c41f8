"""mmdet's tools/test.py, unchanged, with mmdet-dyhead registered.

Usage is exactly mmdet's: python tools/test.py CONFIG ... (see --help).
"""
from mmdet_dyhead.utils.mmdet_tools import run_mmdet_tool

if __name__ == '__main__':
    run_mmdet_tool('test.py')
