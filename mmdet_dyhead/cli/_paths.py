"""Where the tools find the repository's configs/ and docs/.

From a checkout the package sits next to ``configs/`` and ``docs/``; an
installed wheel ships the configs in ``mmdet_dyhead/.mim/configs`` (and no
docs).
"""

import os.path as osp
from typing import Optional

PACKAGE_DIR = osp.dirname(osp.dirname(osp.abspath(__file__)))


def repo_root() -> Optional[str]:
    """The checkout this package is imported from, or None (installed)."""
    root = osp.dirname(PACKAGE_DIR)
    if osp.isfile(osp.join(root, 'pyproject.toml')) and osp.isdir(
        osp.join(root, 'configs')
    ):
        return root
    return None


def config_path(*parts: str) -> str:
    """``configs/<parts>`` of the checkout, or of the installed package."""
    root = repo_root()
    base = (
        osp.join(root, 'configs')
        if root is not None
        else osp.join(PACKAGE_DIR, '.mim', 'configs')
    )
    return osp.join(base, *parts)


def docs_path(name: str) -> str:
    """``docs/<name>`` of the checkout; relative to the working directory
    when the package is installed (the wheel has no docs/)."""
    root = repo_root()
    return (
        osp.join(root, 'docs', name)
        if root is not None
        else osp.join('docs', name)
    )
