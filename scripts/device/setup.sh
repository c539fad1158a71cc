# Sourced first by a device run (`run(command="source scripts/device/setup.sh && ...", carry=[".whl"])`):
# the carried wheels (scripts/device/wheels.sh) and this checkout installed into /tmp/site (a
# non-editable install: what a user's wheel holds), then the card, torch and triton versions.
rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site . 2>&1 | grep -v -i warn | tail -3
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import polymodal.llm_core as m, triton, torch; print(m.__file__, torch.__version__, triton.__version__)"
