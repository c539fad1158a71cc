#!/usr/bin/env bash
# Fortieth session (issue 18): what the 5.7 s and 2.4 s stalls of Mllama's captioning are
# (py-spy over the current code), then store-ahead and the cross split each switched off.
source scripts/device/setup.sh
export PATH=/tmp/site/bin:$PATH
AB="PYTHONPATH=$PWD/scripts/device/ab:$PYTHONPATH"
env $AB AB_STEPLOG=$OUT/steps_spy timeout 150 py-spy record -r 50 -f raw -o $OUT/spy.txt -- \
  python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --skip-hf > $OUT/spy_bench.txt 2>&1
echo "py-spy rc=$?: $(grep -E 'captioning images' $OUT/spy_bench.txt | tr -s ' ')"; tail -3 $OUT/spy_bench.txt
python3 scripts/device/stalls.py $OUT/steps_spy
for v in AB_STORE_AHEAD=0 AB_CROSS_SPLIT=0; do
  env $AB $v AB_STEPLOG=$OUT/steps_$v timeout 120 \
    python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --skip-hf > $OUT/b_$v.txt 2>&1
  echo "$v rc=$?: $(grep -E 'captioning images' $OUT/b_$v.txt | tr -s ' ')"
  python3 scripts/device/stalls.py $OUT/steps_$v
done
