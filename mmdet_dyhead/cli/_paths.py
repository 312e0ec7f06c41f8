"""Where the tools find the repository's configs/.

From a checkout the package sits next to ``configs/``; an
installed wheel ships the configs in ``mmdet_dyhead/.mim/configs``.
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
