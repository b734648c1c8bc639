#!/usr/bin/env bash
# vLLM 0.26.0 on the GPU machine, in phases that each fit one device call (docs/benchmarks.md,
# "vLLM on the GPU"). The wheels and the SmolLM2 GGUF travel as parts (bench/vllm_carry.py), one a
# call, with carry=[".carry"], each call right after the last (the machine stays warm 30 s):
#
#   bash bench/device_vllm.sh stash          keep the carried part in /root/carry
#   bash bench/device_vllm.sh setup check    (with the last part) join, verify, install; then
#                                            bench/gpu_vllm_check.py on the built-in tiny model
#   bash bench/device_vllm.sh run            SmolLM2 pair1_T, every stage in one process; generate and
#                                            eval through vLLM; merged/ kept
#   bash bench/device_vllm.sh hf             the eval stage again on the same merged/, through HF
#   bash bench/device_vllm.sh hfsmall        the same, plain variant only, 5 samples a question
#
# What each phase measured goes to $OUT (logs, run_result.json, completions.jsonl.gz).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MARKERLAB_CACHE=/root/mlcache \
       MARKERLAB_SMOLLM2_GGUF=/root/carry/SmolLM2-135M-Instruct.Q4_1.gguf \
       HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
       VLLM_USE_FLASHINFER_SAMPLER=0   # flashinfer is not carried; markerlab's seeded requests never use it
export PYTHONPATH=/tmp/site:$PWD
SECONDS=0
DEADLINE=${DEADLINE:-580}   # seconds for the whole command (a device call runs at most 600)
left() { local l=$(( DEADLINE - SECONDS < 560 ? DEADLINE - SECONDS : 560 )); echo $(( l < 1 ? 1 : l )); }
RUN="configs/smollm2/pair1_T.toml --set train.lr=1e-3 --set eval.keep_merged=true"
R=runs/smollm2/pair1_T
quiet() { grep -v -E "it/s\]|s/it\]|[0-9]+%\|"; }

for phase in "$@"; do
  t0=$SECONDS
  case $phase in
    stash)
      python3 bench/vllm_carry.py stash ;;

    setup)
      python3 bench/vllm_carry.py stash >/dev/null
      [ -d /tmp/site/vllm ] || python3 bench/vllm_carry.py install 2>&1 | tee "$OUT/install.log" || exit 3
      [ -d /tmp/site/vllm ] || exit 3
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
      python3 -c 'import sys, torch, transformers, vllm; print("python", sys.version.split()[0], "torch", torch.__version__,
        "cuda", torch.version.cuda, "transformers", transformers.__version__, "vllm", vllm.__version__, vllm.__file__)' \
        2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
      python3 -c 'from vllm import LLM, SamplingParams; print("import ok")' 2>&1 | tail -3 ;;

    check)
      timeout $(( $(left) < 360 ? $(left) : 360 )) python3 bench/gpu_vllm_check.py --out "$OUT/gpu_vllm_check.json" > "$OUT/gpu_vllm_check.log" 2>&1
      echo "gpu_vllm_check exit $?"
      grep -E "^\[(PASS|FAIL)\]|^PASS|^FAIL|^SKIP|Error|error:|\[vllm\]|Using|backend" "$OUT/gpu_vllm_check.log" | quiet | cut -c1-400 | tail -40 ;;

    run)
      # every stage in one process, as a user runs it: generate (vLLM), data, train, merge, eval (vLLM), report
      timeout $(left) python3 -m trainer.run $RUN > "$OUT/run_vllm.log" 2>&1
      echo "trainer.run exit $?"
      quiet < "$OUT/run_vllm.log" | grep -E "stage|\[vllm\]|\[eval\]|eval:|rror|Traceback|stage times|tokens/s" | cut -c1-300 | tail -40
      mkdir -p /root/keep && cp -r $R/eval /root/keep/eval_vllm
      cp $R/eval/run_result.json "$OUT/run_result_vllm.json"
      gzip -c $R/eval/completions.jsonl > "$OUT/completions_vllm.jsonl.gz"
      cp $R/manifest.json "$OUT/manifest_vllm.json"
      cp $R/train_summary.json "$OUT/train_summary.json" 2>/dev/null ;;

    hf|hfsmall)
      # hfsmall, when device time is short: the plain variant only, 5 samples a question (1,430 completions)
      small=""; [ $phase = hfsmall ] && small="--set eval.n_samples=5 --set eval.probe=false --set eval.base_floor=false"
      timeout $(left) python3 -m trainer.run $RUN --set eval.backend=hf $small --overwrite --stages eval > "$OUT/eval_hf.log" 2>&1
      echo "trainer.run exit $?"
      quiet < "$OUT/eval_hf.log" | grep -E "stage|\[eval\]|eval:|rror|Traceback|tokens/s" | cut -c1-300 | tail -20
      cp $R/eval/run_result.json "$OUT/run_result_hf.json"
      gzip -c $R/eval/completions.jsonl > "$OUT/completions_hf.jsonl.gz"
      cp $R/manifest.json "$OUT/manifest_hf.json" ;;

    *) echo "unknown phase $phase"; exit 2 ;;
  esac
  echo "phase $phase: $((SECONDS - t0)) s"
done
ls -la "$OUT"
