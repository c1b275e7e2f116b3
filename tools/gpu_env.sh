# Source me on a GPU machine that has python3 with torch but no network:
#   source tools/gpu_env.sh
# Installs the wheels in .whl/ (DeepSpeed and the packages of
# requirements/requirements-gpu-check.txt) into a private folder, with no index and no
# dependency resolution, puts it and the project on PYTHONPATH, and checks the imports the
# GPU check needs. Fill .whl/ beforehand on a machine with network (docs/gpu.md).
_gpu_env_main() {
  local py=${GPU_PY:-python3} site=${GPU_SITE:-/tmp/gpu-site} root
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if ! ls "$root"/.whl/*.whl >/dev/null 2>&1; then
    echo "gpu_env: no wheels in $root/.whl (see docs/gpu.md, 'Preparing the wheels')" >&2
    return 1
  fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$root"/.whl/*.whl || return 1
  export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
  export GPU_PY="$py"
  "$py" - <<'PY' || return 1
import importlib
needed = ["torch", "deepspeed", "yaml", "numpy", "tokenizers", "transformers", "safetensors",
          "pytest", "torchao", "pydantic", "hjson", "psutil", "ninja", "einops", "msgpack",
          "cpuinfo", "packaging", "tqdm", "rich", "ftfy", "zstandard"]
missing = []
for name in needed:
    try:
        importlib.import_module(name)
    except Exception as exc:  # a broken wheel counts as missing
        missing.append(f"{name} ({type(exc).__name__}: {exc})".splitlines()[0])
if missing:
    raise SystemExit("gpu_env: missing modules: " + "; ".join(missing))
import torch
from megatron.accelerator import gpu_present
print(f"gpu_env: torch {torch.__version__}, CUDA available: {gpu_present()}")
PY
}
_gpu_env_main
