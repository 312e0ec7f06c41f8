"""Run mmdet's own command-line tools with mmdet-dyhead registered."""
import os.path as osp
import runpy
import sys


def mmdet_tool_path(relpath: str) -> str:
    """Path of ``tools/<relpath>`` as shipped in the installed mmdet wheel."""
    import mmdet
    path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', relpath)
    if not osp.isfile(path):
        raise SystemExit(
            f"mmdet's tools/{relpath} is not at {path}. mmdet must be "
            f'installed from its wheel (pip install mmdet==3.3.0); editable '
            f'mmdet checkouts do not ship .mim/tools.')
    return path


def run_mmdet_tool(relpath: str) -> None:
    """Execute mmdet's ``tools/<relpath>`` as ``__main__``, unchanged.

    ``import mmdet_dyhead`` happens first, so configs may use this package's
    types even without ``custom_imports``.
    """
    import mmdet_dyhead  # noqa: F401
    script = mmdet_tool_path(relpath)
    sys.argv[0] = script
    runpy.run_path(script, run_name='__main__')
