#!/usr/bin/env bash
# Installs mmdet-dyhead and its tested stack into a local virtual env.
#
# Idempotent: a second run only re-installs the package itself (about a
# minute: it compiles the package's C++ DCN kernel when a compiler is there). mmcv 2.1.0 has no wheels for current torch, so it is built from
# source once (about 8 minutes on 2 cores); pip keeps the built wheel in its
# cache and later installs reuse it.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
MMCV_VERSION=2.1.0
STACK=("mmengine==0.10.7" "mmdet==3.3.0" "pycocotools>=2.0.8")
# openmim's own requirement list drags in openxlab, which downgrades
# setuptools below what torch needs; install it without deps plus what it uses.
MIM_DEPS=("click" "colorama" "model-index" "pandas" "rich" "tabulate" "requests")

log() { printf '[install] %s\n' "$*"; }
die() { printf '\n[install] ERROR: %s\n' "$*" >&2; exit 1; }

# Filters pip's output (stdin to stdout). Drops the "Location ... is ignored"
# lines some machines' pip.conf produce, and the one dependency conflict this
# script causes on purpose: openmim is installed without opendatalab (see
# MIM_DEPS), so pip's resolver check ends an install with
#   ERROR: pip's dependency resolver does not currently take into account ...
#   openmim 0.3.9 requires opendatalab, which is not installed.
# Only that line goes (and the ERROR line when nothing else follows it); any
# other conflict is printed with the ERROR line, and every other line as is.
pip_filter() {
  awk '
    function end_paragraph() {
      if (header != "" && !dropped) print header
      header = ""; dropped = 0; para = 0
    }
    /is ignored: it is neither a file nor a directory/ { next }
    /^ERROR: pip.s dependency resolver does not currently take into account/ {
      end_paragraph(); header = $0; para = 1; next
    }
    para && /^openmim [^ ]+ requires (opendatalab|openxlab)[^,]*, which is not installed\.$/ {
      dropped = 1; next
    }
    para && /^[^ ]+ [^ ]+ (requires|has requirement) / {
      if (header != "") print header
      header = ""; print; fflush(); next
    }
    para { end_paragraph() }
    { print; fflush() }
    END { end_paragraph() }
  '
}

# pip, with its output through pip_filter; returns pip's exit status.
pip_run() {
  "${PIP[@]}" "$@" 2>&1 | pip_filter
  return "${PIPESTATUS[0]}"
}

# What the mmcv build is doing, read from pip's verbose log ($1). torch's
# BuildExtension compiles with ninja, which prints "[n/m] c++ ..." as the
# n-th of m sources is done (pip indents the line); the objects are then
# linked into mmcv/_ext and the wheel is packed.
mmcv_build_status() {
  local step n m
  if grep -qE 'Using cached mmcv-[^ ]*\.whl' "$1"; then
    echo "installing the wheel pip cached from an earlier build"
    return 0
  fi
  step=$(grep -oE '^[[:space:]]*\[[0-9]+/[0-9]+\]' "$1" | tail -n 1 | tr -dc '0-9/' || true)
  if [ -z "$step" ]; then
    echo "preparing the build (nothing compiled yet)"
  else
    n=${step%/*} m=${step#*/}
    if [ "$n" -lt "$m" ]; then
      echo "compiled $n/$m C++ sources ($((100 * n / m))%)"
    else
      echo "compiled all $m C++ sources; linking and packing the wheel"
    fi
  fi
}

# `source scripts/install.sh` (the tests do) defines the functions above and
# stops here.
if [ "${BASH_SOURCE[0]}" != "$0" ]; then return 0; fi

cd "$(dirname "$0")/.."
ROOT=$(pwd)

command -v "$PYTHON" >/dev/null 2>&1 ||
  die "'$PYTHON' not found. Install Python 3.10-3.12 or set PYTHON=/path/to/python3."
"$PYTHON" - <<'PYEOF' || die "Python 3.10-3.12 is required (torch 2.13 needs >= 3.10, mmcv 2.1.0 builds up to 3.12). Set PYTHON=/path/to/python3.x."
import sys
sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)
PYEOF

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual env $VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create a virtual env (Debian: apt-get install python3-venv)."
fi
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

STAMP="$VENV/.mmdet-dyhead-stack"
want_stamp=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)

stack_ok() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] &&
    "$PY" -c "import mmcv._ext, mmdet, mmengine, pycocotools, pytest" >/dev/null 2>&1
}

if stack_ok; then
  log "stack already installed (torch, mmcv $MMCV_VERSION with ops, mmengine, mmdet)"
else
  # --- torch -----------------------------------------------------------------
  torch_ver=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
  if [ -z "$torch_ver" ]; then
    log "installing $TORCH_SPEC"
    pip_run install -q "$TORCH_SPEC" || die "could not install $TORCH_SPEC. Set TORCH_SPEC to a torch>=2.0,<2.14 you can install."
  else
    "$PY" - "$torch_ver" <<'PYEOF' || die "torch $torch_ver is in $VENV, but mmcv $MMCV_VERSION only builds against torch>=2.0,<2.14 (torch 2.14 needs C++20, mmcv pins C++17). Fix: $VENV/bin/pip install 'torch==2.13.0' and run this again."
import sys
v = tuple(int(p) for p in sys.argv[1].split('+')[0].split('.')[:2])
sys.exit(0 if (2, 0) <= v < (2, 14) else 1)
PYEOF
    log "torch $torch_ver already installed"
  fi
  log "installing build tools (setuptools>=77.0.3,<80.9 keeps pkg_resources, which mmcv/mmengine/mim import, without the UserWarning that 80.9 and later print on every import)"
  pip_run install -q "setuptools>=77.0.3,<80.9" wheel ninja ||
    die "could not install setuptools<80.9/wheel/ninja (see above)."

  # --- mmcv with compiled ops ---------------------------------------------------
  if "$PY" -c "import mmcv, mmcv._ext, sys; sys.exit(mmcv.__version__ != '$MMCV_VERSION')" >/dev/null 2>&1; then
    log "mmcv $MMCV_VERSION with compiled ops already installed"
  else
    if "$PY" -c "import mmcv" >/dev/null 2>&1; then
      log "found mmcv $("$PY" -c 'import mmcv; print(mmcv.__version__)') without compiled ops or of another version: replacing it"
      "${PIP[@]}" uninstall -y -q mmcv mmcv-lite mmcv-full >/dev/null 2>&1 || true
    fi
    if ! "${PIP[@]}" download --no-deps --no-binary=:all: -q -d "$(mktemp -d)" "mmcv==$MMCV_VERSION" >/dev/null 2>&1; then
      die "cannot fetch the mmcv==$MMCV_VERSION sdist from the package index. Check network/pip config."
    fi
    CXX_BIN=${CXX:-c++}
    command -v "$CXX_BIN" >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 ||
      die "no C++ compiler found; mmcv's ops must be compiled. Debian/Ubuntu: apt-get install g++ (then run this again)."
    log "building mmcv $MMCV_VERSION with its compiled ops from source (once; ~8 min on 2 cores, cached by pip afterwards)"
    build_log=$(mktemp)
    MAX_JOBS=${MAX_JOBS:-$(nproc)} "${PIP[@]}" install -v --no-build-isolation "mmcv==$MMCV_VERSION" >"$build_log" 2>&1 &
    pid=$!
    start=$(date +%s)
    shown=$start
    while kill -0 "$pid" 2>/dev/null; do
      sleep 1
      if [ $(( $(date +%s) - shown )) -ge 20 ]; then
        shown=$(date +%s)
        log "  mmcv build, $(( shown - start ))s: $(mmcv_build_status "$build_log")"
      fi
    done
    if ! wait "$pid"; then
      tail -40 "$build_log" >&2
      die "mmcv build failed (log: $build_log). Common causes: no g++ (apt-get install g++), torch>=2.14 (use torch==2.13.0), setuptools>=82 (pip install 'setuptools<82')."
    fi
    "$PY" -c "import mmcv._ext" >/dev/null 2>&1 ||
      die "mmcv installed but without compiled ops (mmcv._ext missing). It must be built with --no-build-isolation after torch; see $build_log."
    how="built"
    if grep -qE 'Using cached mmcv-[^ ]*\.whl' "$build_log"; then how="installed from pip's cached wheel"; fi
    log "mmcv $MMCV_VERSION $how in $(( $(date +%s) - start ))s"
  fi

  # --- the rest of the stack -------------------------------------------------------
  log "installing ${STACK[*]} and test/plot/export extras"
  pip_run install -q "${STACK[@]}" pytest pytest-timeout matplotlib seaborn onnx onnxruntime openvino "ruff==0.17.6" ||
    die "could not install ${STACK[*]} (see above)."
  log "installing openmim 0.3.9 without its dependency opendatalab, on purpose: it pulls in openxlab, which downgrades setuptools; only 'mim download --dataset' uses it (pip's note that it is missing is not shown)"
  pip_run install -q --no-deps "openmim==0.3.9" || die "could not install openmim (see above)."
  pip_run install -q "${MIM_DEPS[@]}" || die "could not install mim's dependencies (see above)."
  "$PY" -c "import pkg_resources" >/dev/null 2>&1 ||
    die "setuptools in $VENV has no pkg_resources (setuptools>=82?). Fix: $VENV/bin/pip install 'setuptools>=77.0.3,<80.9'."
  echo "$want_stamp" >"$STAMP"
fi

# --- the package itself (non-editable: mim needs the shipped .mim/ folder) ----------
# Without build isolation setup.py sees this torch and compiles the C++ CPU
# kernel of the deformable convolution (mmdet_dyhead._ext); with no compiler,
# or if compiling fails, the package installs without it and uses its
# pure-PyTorch DCN. The last line below says which one was installed.
log "installing mmdet-dyhead from $ROOT (compiling its C++ DCN kernel when a compiler is found)"
pip_run install -q --no-deps --no-build-isolation --force-reinstall "$ROOT" ||
  die "pip install . failed (see above)."
rm -rf "$ROOT/build" "$ROOT"/*.egg-info
# The tests and tools/ of a checkout import the checkout's package, not the
# installed copy: give the checkout the kernel just built (or remove a stale
# one when none was built), so both run the same DCN.
rm -f "$ROOT"/mmdet_dyhead/_ext*.so
installed_ext=$(cd / && "$PY" -c "import importlib.util as u; s = u.find_spec('mmdet_dyhead._ext'); print(s.origin if s else '')" 2>/dev/null || true)
if [ -n "$installed_ext" ]; then cp "$installed_ext" "$ROOT/mmdet_dyhead/"; fi
"$PY" - "$VENV" <<'PYEOF' || die "mmdet_dyhead does not import after install (see the traceback above)."
import sys

import mmdet_dyhead

try:
    from mmdet_dyhead import _ext  # noqa: F401

    kernel = 'with its compiled CPU DCN kernel (mmdet_dyhead._ext)'
except ImportError as exc:
    kernel = (
        f'without the compiled CPU DCN kernel ({exc}), using the '
        'pure-PyTorch DCN; a C++ compiler (g++) and a rerun build it'
    )
print(f'[install] mmdet_dyhead {mmdet_dyhead.__version__} ready in '
      f'{sys.argv[1]}, {kernel}')
PYEOF
