"""Build hook: ship configs/, tools/ and model-index.yml inside the wheel,
and compile the optional C++ CPU kernel of the deformable convolution.

mim looks for the first three under ``mmdet_dyhead/.mim/``. They live at the
repository root (one copy, the one users read), and are copied into the build
tree here, the way OpenMMLab's own setup.py files do for ``bdist_wheel``.

The kernel (``mmdet_dyhead._ext``, from ``mmdet_dyhead/ops/csrc/``) is built
like mmcv's ops, with torch's ``CppExtension``, when torch is importable at
build time (``pip install --no-build-isolation .``, as scripts/install.sh
does) and a C++ compiler is found. Otherwise, or when the compiler fails, or
with ``MMDET_DYHEAD_WITH_OPS=0``, the package is built without it (a pure
wheel) and uses its pure-PyTorch implementation.
"""

import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

MIM_ITEMS = ('configs', 'tools', 'model-index.yml')
KERNEL_NAME = 'mmdet_dyhead._ext'
KERNEL_SOURCES = ['mmdet_dyhead/ops/csrc/deform_conv_cpu.cpp']


def note(message):
    print(f'[mmdet-dyhead] {message}', file=sys.stderr, flush=True)


class BuildWithMim(build_py):
    def run(self):
        super().run()
        root = os.path.dirname(os.path.abspath(__file__))
        mim_dir = os.path.join(self.build_lib, 'mmdet_dyhead', '.mim')
        os.makedirs(mim_dir, exist_ok=True)
        for item in MIM_ITEMS:
            src = os.path.join(root, item)
            dst = os.path.join(mim_dir, item)
            if not os.path.exists(src):
                continue
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            if os.path.isdir(src):
                shutil.copytree(
                    src,
                    dst,
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'),
                )
            else:
                shutil.copy2(src, dst)


def compile_flags():
    """(compile, link) flags. OpenMP as torch's own build uses it, so that
    ``at::parallel_for`` runs threads and follows torch.set_num_threads;
    no -march=native (the binary may run on another CPU)."""
    if os.name == 'nt':
        return ['/O2', '/openmp'], []
    if sys.platform == 'darwin':  # Apple clang has no -fopenmp: serial
        return ['-O3', '-g0'], []
    return ['-O3', '-g0', '-fopenmp'], ['-fopenmp']


def kernel_build():
    """(ext_modules, cmdclass) for the C++ kernel, or why it is skipped."""
    if os.environ.get('MMDET_DYHEAD_WITH_OPS', '1') == '0':
        note('MMDET_DYHEAD_WITH_OPS=0: not building the C++ DCN kernel.')
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        note(
            'torch is not importable at build time: building without the '
            'C++ DCN kernel (the package uses its pure-PyTorch DCN). To '
            'build it, install torch first and run `pip install '
            '--no-build-isolation .`.'
        )
        return [], {}
    compiler = os.environ.get('CXX', 'c++').split()[0]
    if shutil.which(compiler) is None and shutil.which('g++') is None:
        note(
            f'no C++ compiler ({compiler!r}) found: building without the C++ '
            'DCN kernel (the package uses its pure-PyTorch DCN).'
        )
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Builds the kernel; a failure leaves the package without it."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler errors of any kind
                self.extensions = []
                note(
                    f'compiling the C++ DCN kernel failed ({exc}); the '
                    'package uses its pure-PyTorch DCN.'
                )
            else:
                note(f'built the C++ DCN kernel {KERNEL_NAME}.')

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

    cflags, lflags = compile_flags()
    ext = CppExtension(
        KERNEL_NAME,
        KERNEL_SOURCES,
        extra_compile_args={'cxx': cflags},
        extra_link_args=lflags,
    )
    return [ext], {'build_ext': OptionalBuildExtension}


ext_modules, ext_cmdclass = kernel_build()
setup(
    cmdclass={'build_py': BuildWithMim, **ext_cmdclass},
    ext_modules=ext_modules,
)
