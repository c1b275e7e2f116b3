#!/usr/bin/env bash
# Create the virtual environment and install the project without pulling CUDA wheels on CPU
# machines: an importable torch is reused (system site packages), otherwise torch==2.13.0 is
# installed first and pinned for every later step.
set -euo pipefail
venv=${1:-.venv}
py=${PYTHON:-python3}

if "$py" -c "import torch" >/dev/null 2>&1; then
    echo "reusing the torch that $py already imports ($("$py" -c 'import torch; print(torch.__version__)'))"
    "$py" -m venv --system-site-packages "$venv"
else
    "$py" -m venv "$venv"
fi
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    $pip install -q "torch==2.13.0"
fi
torch_version=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
constraints="$venv/constraints.txt"
echo "torch==${torch_version}" > "$constraints"
$pip install -q -c "$constraints" -e ".[dev,wandb,eval,mpi]"
"$venv/bin/python" -c "import torch, deepspeed, megatron; print('installed: torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
