#!/usr/bin/env bash
# Installs the peers of the generic-objective benchmark (poolings.bench.generic) into $VENV
# (default .venv), beside the torch that is already there. Idempotent: re-running it only
# installs what is missing, and it never changes a package that is already installed.
#
#   torchopt 0.7.3   goes in with --no-deps, so that it can never replace the torch in $VENV;
#                    its import needs optree and graphviz (the Python package; numpy and
#                    typing-extensions come with torch).
#   jax, jaxlib      CPU wheels; jaxopt 0.8.5 is pure Python on top of them.
#
# When jax would need other versions of packages already in $VENV (numpy, scipy), the script
# refuses to touch $VENV and puts jax into JAX_VENV instead (default: $VENV-jax); the benchmark
# then runs the jax side in a subprocess of that interpreter (JAX_PYTHON=$JAX_VENV/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
JAX_VENV=${JAX_VENV:-$VENV-jax}
TORCHOPT="torchopt==0.7.3"
TORCHOPT_DEPS=("optree>=0.11" "graphviz")
JAX=("jax==0.10.2" "jaxlib==0.10.2" "jaxopt==0.8.5")

if [ ! -x "$VENV/bin/python" ]; then
    echo "no Python environment at $VENV: run scripts/setup_env.sh first (or set VENV)" >&2
    exit 1
fi
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check"

# torchopt without its dependencies (they would replace torch), then what its import needs.
if ! "$PY" -c "import torchopt" 2>/dev/null; then
    $PIP install -q "${TORCHOPT_DEPS[@]}"
    $PIP install -q --no-deps "$TORCHOPT"
fi

# jax: into $VENV when that changes nothing already installed, else into its own environment.
if ! "$PY" -c "import jax, jaxopt" 2>/dev/null; then
    report=$(mktemp)
    $PIP install -q --dry-run --report "$report" "${JAX[@]}"
    changes=$("$PY" - "$report" <<'PY'
import importlib.metadata as md, json, sys
report = json.load(open(sys.argv[1]))
for item in report.get("install", []):
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        continue
    if have != version:
        print(f"{name} {have} -> {version}")
PY
)
    rm -f "$report"
    if [ -z "$changes" ]; then
        $PIP install -q "${JAX[@]}"
    else
        echo "jax would change packages in $VENV ($changes): installing it into $JAX_VENV instead" >&2
        if [ ! -x "$JAX_VENV/bin/python" ]; then
            "$PY" -c "import sys; print(sys._base_executable)" | xargs -I{} {} -m venv "$JAX_VENV"
        fi
        "$JAX_VENV/bin/python" -m pip --disable-pip-version-check install -q "${JAX[@]}"
        echo "run the benchmark with JAX_PYTHON=$JAX_VENV/bin/python" >&2
    fi
fi

"$PY" - <<'PY'
import warnings
warnings.filterwarnings("ignore")
import torch, torchopt
print(f"torchopt {torchopt.__version__} beside torch {torch.__version__}")
try:
    import jax, jaxopt
    from importlib.metadata import version
    print(f"jax {jax.__version__}, jaxopt {version('jaxopt')} in this environment")
except ImportError:
    print("jax is not in this environment (see JAX_PYTHON above)")
PY
