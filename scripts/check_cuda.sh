#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, which CI does not have. From the repository root of a machine with one and the
# project's dependencies (installed, or PYTHONPATH=. with them present):
#   bash scripts/check_cuda.sh [WORK_DIR]          # default /tmp/lora-cuda-check; a few minutes on one GPU
# 1. the CUDA tests: CUDA-graph and eager decoding vs the sequential reference for every family in fp32, bf16 and
#    fp16; the fused AdamW and a CPU optimizer state resumed on the GPU
# 2. the commands on cuda, on the offline configs (random weights, no download): train in fp32, bf16 and fp16,
#    then eval and generate (fp32 greedy: CUDA graph vs --no-cache, the same text); merge; a Llama-family run
# 3. figures: generation side by side (ours with and without the CUDA graph, transformers generate; batch 1 and 8,
#    fp32/bf16/fp16), lora serve with 1/4/8 clients, and the training benchmark (ours vs transformers + PEFT)
# Prints one "FAILED" line per failed check; exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/lora-cuda-check}
mkdir -p "$work"
export PYTHONUNBUFFERED=1
failed=0
check() { echo "== $*"; "$@" || { echo "FAILED (exit $?): $*"; failed=1; }; }
lora() { python3 -m lora_cli "$@"; }
same_output() {  # same_output A B: two commands' stdout, equal
  local a b; a=$(eval "$1") && b=$(eval "$2") && [ "$a" = "$b" ] && echo "same output: ${a:0:80}..."
}

python3 -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name(), "| CUDA", torch.version.cuda)'
check python3 -m pytest -q -p no:cacheprovider tests/test_decoding.py tests/test_optim.py -k cuda

for p in fp32 bf16 fp16; do
  run=$work/gpt2-$p
  check lora train configs/offline.yaml --overwrite --set out_dir="$run" --set train.device=cuda \
    --set train.precision=$p --set train.max_steps=6 --set train.eval_every=3 --set train.save_every=3 \
    --set train.log_every=3
  check lora eval --adapter "$run" --data data/instruction-data.json --device cuda --precision $p --json -q
  check lora generate --adapter "$run" --device cuda --precision $p --max-new-tokens 40 "Name a color." "Say hi."
done
# fp32: the CUDA graph's tokens equal recomputing the whole sequence (bf16 near-ties may round either way)
check same_output "lora generate --adapter $work/gpt2-fp32 --device cuda --max-new-tokens 60 'Name a color.'" \
  "lora generate --adapter $work/gpt2-fp32 --device cuda --max-new-tokens 60 --no-cache 'Name a color.'"
check lora merge --adapter "$work/gpt2-bf16" --out "$work/merged" --overwrite
check lora generate --model "$work/merged" --device cuda --precision bf16 --no-template --max-new-tokens 20 "Hello"
run=$work/smollm2
check lora train configs/smollm2-offline.yaml --overwrite --set out_dir="$run" --set train.device=cuda
check same_output "lora generate --adapter $run --device cuda --max-new-tokens 60 'A B C' 'Name a color.'" \
  "lora generate --adapter $run --device cuda --max-new-tokens 60 --no-cache 'A B C' 'Name a color.'"
check lora generate --adapter "$run" --device cuda --precision bf16 --max-new-tokens 40 "Name a color."

check python3 scripts/bench_generate.py --side-by-side --device cuda --new-tokens 256
if python3 -c 'import fastapi, uvicorn' 2>/dev/null; then
  check python3 scripts/bench_generate.py --serve --device cuda --new-tokens 128
else
  echo "skipped: the lora serve figures need fastapi and uvicorn (pip install 'lora-cli[serve]')"
fi
check python3 scripts/benchmark.py --model smollm2-135m --device cuda --steps 10 --warmup-steps 2
check python3 scripts/benchmark.py --model smollm2-135m --device cuda --steps 10 --warmup-steps 2 --precision bf16
[ $failed = 0 ] && echo "all CUDA checks passed" || echo "some CUDA checks FAILED"
exit $failed
