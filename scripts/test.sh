#!/usr/bin/env bash
# The project's test command (README). GPU tests skip themselves without CUDA.
# On a machine where only the README's install command ran, the test dependencies (the
# `test` extra and the extras whose code the tests exercise) are installed first, once.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! python - 2>/dev/null <<'PY'
import importlib.util, sys
need = ["pytest", "pytest_timeout", "skimage", "matplotlib", "openai", "httpx", "selenium",
        "fastapi", "uvicorn", "prometheus_client", "gradio", "pyarrow", "ray", "compressed_tensors",
        "torchaudio", "soundfile", "av", "peft", "sentence_transformers"]
sys.exit(any(importlib.util.find_spec(name) is None for name in need))
PY
then
  echo "installing the test dependencies: pip install -e '.[test,audio,serve,demo,batch]'"
  python -m pip install -q -e ".[test,audio,serve,demo,batch]"
fi
python -m pytest -q --timeout=900 "$@"
