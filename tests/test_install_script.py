"""scripts/install.sh stops with a message that names the fix."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'install.sh')


def _run(env_overrides):
    env = dict(os.environ, **env_overrides)
    return subprocess.run(
        ['bash', SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_python_is_reported():
    proc = _run(
        {'PYTHON': '/nonexistent/python3', 'VENV': '/nonexistent/venv'}
    )
    assert proc.returncode != 0
    assert "'/nonexistent/python3' not found" in proc.stderr


def test_torch_too_new_for_mmcv_is_reported_with_the_fix(tmp_path):
    # A venv whose python sees a torch 2.14 (a stub package on its path).
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    stub = tmp_path / 'stub' / 'torch'
    stub.mkdir(parents=True)
    (stub / '__init__.py').write_text("__version__ = '2.14.1+cpu'\n")
    python = venv / 'bin' / 'python'
    python.write_text(
        f'#!/bin/sh\nPYTHONPATH={stub.parent} exec {sys.executable} -S "$@"\n'
    )
    python.chmod(0o755)
    proc = _run({'VENV': str(venv)})
    assert proc.returncode != 0
    assert 'torch 2.14.1+cpu' in proc.stderr
    assert "pip install 'torch==2.13.0'" in proc.stderr


def _source_and_run(command, stdin=''):
    """Run ``command`` in bash after sourcing install.sh (functions only)."""
    return subprocess.run(
        ['bash', '-c', f'source "{SCRIPT}" && {command}'],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


RESOLVER = (
    "ERROR: pip's dependency resolver does not currently take into account "
    'all the packages that are installed. This behaviour is the source of '
    'the following dependency conflicts.'
)
OPENMIM = 'openmim 0.3.9 requires opendatalab, which is not installed.'


def test_sourcing_defines_the_functions_and_installs_nothing(tmp_path):
    venv = tmp_path / 'venv'
    proc = subprocess.run(
        [
            'bash',
            '-c',
            f'source "{SCRIPT}" && type pip_filter >/dev/null && echo sourced',
        ],
        cwd=REPO,
        env=dict(os.environ, VENV=str(venv)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == 'sourced\n'
    assert not venv.exists()


def test_pip_filter_drops_openmims_known_conflict():
    # What `pip install` printed after openmim went in with --no-deps.
    pip_output = '\n'.join(
        [
            'Collecting click',
            "WARNING: Location 'file:///opt/pypi/simple/click/' is ignored: "
            'it is neither a file nor a directory.',
            'Successfully installed click-8.1.8',
            RESOLVER,
            OPENMIM,
            '',
        ]
    )
    proc = _source_and_run('pip_filter', pip_output)
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout == 'Collecting click\nSuccessfully installed click-8.1.8\n'
    )


def test_pip_filter_keeps_every_other_conflict_and_error():
    real = (
        'mmdet 3.3.0 requires mmcv<2.2.0,>=2.0.0rc4, but you have mmcv '
        '2.2.0 which is incompatible.'
    )
    # An opendatalab that is installed but of the wrong version is a real
    # conflict, not the one the script causes.
    wrong_version = (
        'openmim 0.3.9 requires opendatalab>=1.0, but you have opendatalab '
        '0.0.1 which is incompatible.'
    )
    pip_output = '\n'.join(
        [
            RESOLVER,
            OPENMIM,
            real,
            wrong_version,
            'ERROR: No matching distribution found for mmcv==9.9',
            '',
        ]
    )
    proc = _source_and_run('pip_filter', pip_output)
    assert proc.stdout.splitlines() == [
        RESOLVER,
        real,
        wrong_version,
        'ERROR: No matching distribution found for mmcv==9.9',
    ]
    # Same when the real conflict comes before the known one.
    proc = _source_and_run('pip_filter', f'{RESOLVER}\n{real}\n{OPENMIM}\n')
    assert proc.stdout.splitlines() == [RESOLVER, real]


def test_pip_run_filters_and_returns_pips_status(tmp_path):
    # A stand-in for pip: some output on both streams, then a failure.
    fake_pip = tmp_path / 'pip.sh'
    fake_pip.write_text(
        'echo "Collecting x"\n'
        f'cat >&2 <<"EOF"\n{RESOLVER}\n{OPENMIM}\nEOF\n'
        'echo "ERROR: could not build x" >&2\n'
        'exit 3\n'
    )
    proc = _source_and_run(
        f'PIP=(bash "{fake_pip}"); set +e; pip_run install x; echo "status $?"'
    )
    assert proc.stdout == (
        'Collecting x\nERROR: could not build x\nstatus 3\n'
    )


# pip install -v of an sdist built by torch's BuildExtension (ninja): the
# lines pip relays from the build are indented by two spaces.
BUILD_LOG_HEAD = """\
Processing /tmp/pip-download/mmcv-2.1.0.tar.gz
  Preparing metadata (setup.py): started
  Running command python setup.py egg_info
  Preparing metadata (setup.py): finished with status 'done'
Building wheels for collected packages: mmcv
  Building wheel for mmcv (setup.py): started
  Running command python setup.py bdist_wheel
  running build_ext
  building 'mmcv._ext' extension
"""
NINJA_LINE = (
    '  [{}/77] c++ -MMD -MF /tmp/pip-install/build/temp.linux-x86_64-'
    'cpython-311/./mmcv/ops/csrc/pytorch/op{}.o.d -c op{}.cpp\n'
)


def _status(tmp_path, text):
    log = tmp_path / 'build.log'
    log.write_text(text)
    proc = _source_and_run(f'mmcv_build_status "{log}"')
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_mmcv_build_progress_counts_ninjas_compile_steps(tmp_path):
    assert _status(tmp_path, BUILD_LOG_HEAD) == (
        'preparing the build (nothing compiled yet)'
    )
    steps = ''.join(NINJA_LINE.format(i, i, i) for i in range(1, 24))
    # Warnings between the steps do not hide the last count.
    log = BUILD_LOG_HEAD + steps + '  op23.cpp:1: warning: unused [-Wx]\n'
    assert _status(tmp_path, log) == 'compiled 23/77 C++ sources (29%)'
    steps = ''.join(NINJA_LINE.format(i, i, i) for i in range(1, 78))
    log = BUILD_LOG_HEAD + steps + '  g++ -shared op1.o ... -o _ext.so\n'
    assert _status(tmp_path, log) == (
        'compiled all 77 C++ sources; linking and packing the wheel'
    )


def test_mmcv_build_progress_recognises_the_cached_wheel(tmp_path):
    # The sdist itself may come from pip's download cache: still a build.
    log = 'Collecting mmcv==2.1.0\n  Using cached mmcv-2.1.0.tar.gz (471 kB)\n'
    assert _status(tmp_path, log) == (
        'preparing the build (nothing compiled yet)'
    )
    log = (
        'Collecting mmcv==2.1.0\n'
        '  Using cached mmcv-2.1.0-cp311-cp311-linux_x86_64.whl\n'
    )
    assert _status(tmp_path, log) == (
        'installing the wheel pip cached from an earlier build'
    )
