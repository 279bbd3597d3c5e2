#!/usr/bin/env bash
# Create or update .venv with the pinned CPU stack (or the GPU stack with
# KD_DAGFM_VARIANT=gpu). Does nothing when the requirement files did not
# change since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."

variant="${KD_DAGFM_VARIANT:-cpu}"
requirements="requirements-${variant}.txt"
if [[ ! -f "$requirements" ]]; then
    echo "error: KD_DAGFM_VARIANT=$variant has no $requirements; use cpu or gpu" >&2
    exit 2
fi
python="${PYTHON:-python3}"
stamp=".venv/.kd-dagfm-installed"
digest="$(cat "$requirements" requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)-$variant"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$digest" ]]; then
    exit 0
fi

echo "setting up .venv ($variant); this takes a few minutes the first time" >&2
"$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r "$requirements" -r requirements-dev.txt
# torchrec's metadata requires the CUDA fbgemm-gpu, which would replace
# fbgemm-gpu-cpu on a CPU machine, so it goes in without dependencies.
.venv/bin/python -m pip install --quiet --no-deps "torchrec==1.8.0"
.venv/bin/python -m pip install --quiet --no-deps -e .
.venv/bin/python -c "import torchrec, fbgemm_gpu, kd_dagfm" 2>/dev/null || {
    echo "error: the environment does not import torchrec/fbgemm_gpu; see the pip output above" >&2
    exit 1
}
echo "$digest" > "$stamp"
