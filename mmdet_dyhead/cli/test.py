"""``tools/test.py``: mmdet's test script with this package's steps.

Same command line as mmdet's ``tools/test.py`` (see ``--help``), plus
``--allow-partial-checkpoint``: without it a checkpoint that leaves model
weights unloaded is refused with the grouped key report. What else is added
is described in :mod:`mmdet_dyhead.cli.mmdet_tools`.
"""

from typing import List, Optional

from .mmdet_tools import run_mmdet_tool


def main(argv: Optional[List[str]] = None) -> None:
    run_mmdet_tool('test.py', argv)


if __name__ == '__main__':
    main()
