#!/usr/bin/env bash
# Create .venv-recbole with RecBole 1.2.1 for the side-by-side speed job
# (jobs/recbole_compare.py). RecBole needs numpy<2 and pandas<2, which clash
# with kd-dagfm's own environment, so it lives in a virtual environment of its
# own and is never a dependency of the kd-dagfm package.
#
# Usage: bash scripts/setup_recbole_venv.sh [VENV_DIR]   (default .venv-recbole)
# Does nothing when VENV_DIR already imports recbole 1.2.1.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${1:-.venv-recbole}"
python="${PYTHON:-python3}"
torch_pin="torch==2.13.0"

if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c \
    "import recbole, sys; sys.exit(recbole.__version__ != '1.2.1')" 2>/dev/null; then
    exit 0
fi

echo "setting up $venv with RecBole 1.2.1; this takes a few minutes the first time" >&2
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# torch first, so that recbole's resolver keeps this build instead of pulling
# another one in.
"$venv/bin/python" -m pip install --quiet "$torch_pin"
"$venv/bin/python" -m pip install --quiet "recbole==1.2.1" "$torch_pin" \
    "numpy<2" "pandas<2" "setuptools<81"
"$venv/bin/python" -c "import recbole, torch; print('recbole', recbole.__version__, 'torch', torch.__version__)" || {
    echo "error: $venv does not import recbole; see the pip output above" >&2
    exit 1
}
