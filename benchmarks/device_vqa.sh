#!/usr/bin/env bash
# Issue 4's GPU check, prepared to fit one call of a lent GPU machine (at most 10 minutes):
# `han` (its defaults: a relation network on half of the cells with word reads, seeds 0 and 1; and
# the previous default, the top 25% of the cells without them) and the full relation network `rn`,
# trained side by side on one GPU on Sort-of-CLEVR at the paper's size -- Santoro et al. 2017:
# 10,000 scenes of 75 px with 10 non-relational and 10 relational questions each; we keep 9,800
# for training (as the public generator does) and test on 500 -- then scored by evaluate.py.
#
#   bash benchmarks/device_vqa.sh OUT                # on the GPU machine, from the repo root
#   bash benchmarks/device_vqa.sh OUT --smoke        # the same steps, tiny, on a CPU (51 s on 2 cores, 2026-12-04)
#
# Runs from a checkout with no install (PYTHONPATH=.): the GPU image already has every package
# protozoo needs. Each training is time-boxed (TRAIN_SECONDS, default 300, which leaves the data
# generation and the scoring room inside the 10 minutes) and saves the model every epoch, so a run
# cut short is still scored, from its last finished epoch; its log.jsonl says how many epochs
# that was. What comes back in OUT: each run's metrics.json and log.jsonl, the
# data-generation time and the console output (`log.txt`).
set -uo pipefail
out=${1:?usage: bash benchmarks/device_vqa.sh OUT [--smoke]}
out=$(mkdir -p "$out" && cd "$out" && pwd) || exit 1
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export PROTOZOO_CACHE=${PROTOZOO_CACHE:-/tmp/protozoo-cache}
runs=${RUNS_DIR:-/tmp/protozoo-device-runs}
seconds=${TRAIN_SECONDS:-300}

if [[ ${2:-} == --smoke ]]; then
  n_train=60; n_test=20
  han_epochs=${HAN_EPOCHS:-1}; rn_epochs=${RN_EPOCHS:-1}; device=cpu; workers=0
else
  n_train=9800; n_test=500
  han_epochs=${HAN_EPOCHS:-45}; rn_epochs=${RN_EPOCHS:-45}; device=cuda; workers=4
fi
data=(--dataset sort-of-clevr --num-train "$n_train" --num-test "$n_test")
rm -rf "$runs" && mkdir -p "$runs"
exec > >(tee "$out/log.txt") 2>&1

python3 - <<'EOF'
import torch
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

# generate the data once, before the two trainings would race to write the same cache
started=$(date +%s)
python3 -c "import sys; from protozoo.data import build_data; build_data('sort-of-clevr', \
num_train=int(sys.argv[1]), num_test=int(sys.argv[2]))" "$n_train" "$n_test" || exit 1
echo "data ready in $(( $(date +%s) - started )) s"

train() {  # name, epochs, model arguments...
  local name=$1 epochs=$2; shift 2
  timeout --signal=INT "$seconds" python3 train.py "${data[@]}" --device "$device" \
    --workers "$workers" --epochs "$epochs" --no-report --out "$runs/$name" "$@" \
    > "$runs/$name.console" 2>&1
  echo "$name: train.py exit $? after $(grep -c '"epoch"' "$runs/$name/log.jsonl" 2>/dev/null) logged epochs"
}
train han "$han_epochs" --model han --seed 0 & han_pid=$!
train han_s1 "$han_epochs" --model han --seed 1 & s1_pid=$!
# the default before 2026-12-04: 7 of 25 cells, no word reads (docs/han-relational.md)
train han_quarter "$han_epochs" --model han --model-arg top_k=0.25 --model-arg split_film=false \
  --model-arg word_reads=false & quarter_pid=$!
train rn "$rn_epochs" --model rn & rn_pid=$!
# not a bare wait: it would also wait for the tee above
wait "$han_pid" "$s1_pid" "$quarter_pid" "$rn_pid"

for name in han han_s1 han_quarter rn; do
  tail -n 3 "$runs/$name.console"
  if [[ -f $runs/$name/model.safetensors ]]; then
    python3 evaluate.py "$runs/$name" --device "$device" --no-report | tail -n 4
    cp "$runs/$name/metrics.json" "$out/$name-metrics.json" 2>/dev/null
  fi
  cp "$runs/$name/log.jsonl" "$out/$name-log.jsonl" 2>/dev/null
done
exit 0
