"""Command-line entry points of the package's tools.

Each module here holds one tool's logic and has ``main(argv=None)``; the
scripts in ``tools/`` (repository root, and ``.mim/tools`` in the wheel) only
call them, so the tools can be imported and tested like any other module.
"""
