#!/usr/bin/env bash
# Eighteenth session, run a: the server burst (256 streamed 448 px image requests) on main and
# on servetrial (main + branch servettft: read-back catch-up, encoder-budget admission), the
# trial unpacked first as an ignored folder: `git archive servetrial | tar -x -C
# artifacts/trialsrc` (carried: carry=[".whl", "artifacts/trialsrc"]).
source scripts/device/setup.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/trial \
  ./artifacts/trialsrc 2>&1 | grep -v -i warn | tail -1
show() { grep -A12 "^NVIDIA" "$1" | cut -c1-160; tail -3 "$1" | grep -i "error\|Trace" ; }
timeout 180 python3 -m polymodal.cli bench --workload serve --json $OUT/serve_main.json \
  > $OUT/serve_main.log 2>&1; echo "== main"; show $OUT/serve_main.log
export PYTHONPATH=/tmp/trial:/tmp/site
python3 -c "import polymodal, inspect; from polymodal.llm_core.engine import Engine; print(polymodal.__file__, hasattr(Engine, 'read_back'))"
timeout 180 python3 -m polymodal.cli bench --workload serve --json $OUT/serve_trial.json \
  > $OUT/serve_trial.log 2>&1; echo "== trial"; show $OUT/serve_trial.log
timeout 180 python3 -m polymodal.cli bench --workload serve --server-args '--max-num-batched-tokens 8192' \
  --json $OUT/serve_trial8k.json > $OUT/serve_trial8k.log 2>&1; echo "== trial 8192"; show $OUT/serve_trial8k.log
