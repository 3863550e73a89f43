#!/usr/bin/env bash
# Creates .venv with everything the project, its tests and its references need.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch 2.14.1 and torchvision 0.29.1 are on this machine's disk for Python 3.11.
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"

# torch and torchvision first, pinned together (PyPI's torchvision does not
# work beside a CPU-only torch of another release).
$PIP install -q "torch==2.14.1" "torchvision==0.29.1"
# The project with every optional part (video, cvxpylayers, theseus deps, dev tools).
$PIP install -q setuptools wheel
$PIP install -q -e ".[all]"
# theseus-ai 0.2.3: no wheel for Python 3.11, and its source build fails under
# build isolation; installed without its (over-pinned) dependencies.
$PIP install -q --no-deps --no-build-isolation \
    "theseus-ai==0.2.3" "torchlie==0.1.0" "torchkin==0.1.1" "semantic-version==2.10.0" "urdf_parser_py==0.0.4"
"$VENV/bin/python" - <<'PY'
import warnings
warnings.filterwarnings("ignore")
import torch, torchvision, sklearn, av, cvxpylayers, theseus  # noqa: F401
print(f"environment ready: torch {torch.__version__}, torchvision {torchvision.__version__}, theseus {theseus.__version__}")
PY
