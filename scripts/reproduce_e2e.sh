#!/usr/bin/env bash
# Reproduce the LoRA paper's E2E NLG Challenge row (Hu et al. 2021, Table 3): GPT-2 Medium + LoRA r=4 on W_q
# and W_v (393,216 trainable parameters), beam search on the test set, scored against all references of each
# meaning representation. Published: BLEU 70.4, NIST 8.85, METEOR 46.8, ROUGE-L 71.8, CIDEr 2.53 (people
# rerunning microsoft/LoRA report BLEU 68.6-68.9).
#
#   scripts/reproduce_e2e.sh [lora train arguments]      e.g. --overwrite, --set train.device=cuda:1
#
# 1. scripts/get_e2e_data.sh: the training set at data/e2e/trainset.csv (skipped when an argument sets data.train);
# 2. trains configs/e2e-lora-paper.yaml (26,290 steps of batch 8; downloads GPT-2 Medium on first use);
# 3. `lora eval --generate` on the test set (630 MRs, 4,693 references): beam 10, length penalty 0.9,
#    no-repeat n-gram 4, at most 64 new tokens (the paper's Table 11 and --eval_len 64), BLEU and NIST
#    case-insensitive as the E2E scoring script does, METEOR when pycocoevalcap and Java are installed;
# 4. prints our table next to the paper's and writes out_dir/reproduction.json (and out_dir/test_predictions.jsonl).
# Environment (defaults): PYTHON (python3), TEST_DATA (data/e2e_test.csv), NUM_BEAMS (10), LENGTH_PENALTY (0.9),
# NO_REPEAT_NGRAM (4), MAX_NEW_TOKENS (64), EVAL_BATCH (8 prompts per batch), METEOR (auto | 0 | 1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CONFIG="$ROOT/configs/e2e-lora-paper.yaml"
TEST_DATA="${TEST_DATA:-$ROOT/data/e2e_test.csv}"
lora() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m lora_cli "$@"; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

case " $* " in
    *" data.train="*) echo "== 1/4 data.train is set on the command line: not fetching the E2E training set" >&2 ;;
    *) echo "== 1/4 scripts/get_e2e_data.sh" >&2; "$ROOT/scripts/get_e2e_data.sh" >&2 ;;
esac

echo "== 2/4 lora train $CONFIG $*" >&2
# stdout (the adapter path) to a file; the log to the terminal and to a file (for the parameter count)
{ lora train "$CONFIG" "$@" 2>&1 1>&3 3>&- | tee "$WORK/train.log" >&2; } 3>"$WORK/train.out"
ADAPTER="$(tail -n 1 "$WORK/train.out")"
OUT_DIR="$(dirname "$ADAPTER")"
[[ -f "$ADAPTER" ]] || { echo "error: no adapter at $ADAPTER" >&2; exit 1; }

METEOR_FLAG=()
WHY_NO_METEOR="$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
    'from lora_cli.metrics import meteor_unavailable as m; print(m() or "")')"
case "${METEOR:-auto}" in
    1) METEOR_FLAG=(--meteor) ;;
    auto) if [[ -z "$WHY_NO_METEOR" ]]; then METEOR_FLAG=(--meteor); fi ;;
    *) WHY_NO_METEOR="METEOR=0" ;;
esac

echo "== 3/4 lora eval --generate on $TEST_DATA" >&2
lora eval --adapter "$ADAPTER" --data "$TEST_DATA" --no-base --json --generate \
    --num-beams "${NUM_BEAMS:-10}" --length-penalty "${LENGTH_PENALTY:-0.9}" \
    --no-repeat-ngram-size "${NO_REPEAT_NGRAM:-4}" --max-new-tokens "${MAX_NEW_TOKENS:-64}" \
    --batch-size "${EVAL_BATCH:-8}" --lowercase "${METEOR_FLAG[@]}" \
    --predictions "$OUT_DIR/test_predictions.jsonl" > "$WORK/eval.json"

echo "== 4/4 ours vs the LoRA paper" >&2
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$WORK/train.log" "$WORK/eval.json" "$OUT_DIR" \
    "$WHY_NO_METEOR" <<'PY'
import json, re, sys
from pathlib import Path

from lora_cli.fsutil import atomic_write_text

log, result = Path(sys.argv[1]).read_text(), json.loads(Path(sys.argv[2]).read_text())
out_dir, why_no_meteor = Path(sys.argv[3]), sys.argv[4]
gen = result["generation"]
found = re.search(r"trainable parameters: ([\d,]+) of ([\d,]+)", log)
trainable = int(found.group(1).replace(",", "")) if found else None
paper = {"trainable_parameters": "0.35M (r=4 on W_q, W_v of GPT-2 Medium: 393,216)", "bleu": 70.4, "nist": 8.85,
         "meteor": 46.8, "rouge_l": 71.8, "cider": 2.53}
rows = [("", "ours", "LoRA paper (Table 3)"),
        ("trainable parameters", f"{trainable:,}" if trainable is not None else "?", paper["trainable_parameters"]),
        ("BLEU", f"{gen['bleu']:.2f}", "70.4 (reruns of microsoft/LoRA: 68.6-68.9)"),
        ("NIST", f"{gen['nist']:.4f}", "8.85"),
        ("METEOR", f"{gen['meteor']:.2f}" if "meteor" in gen else "n/a", "46.8"),
        ("ROUGE-L", f"{gen['rouge_l']:.2f}", "71.8"),
        ("CIDEr", f"{gen['cider']:.4f}", "2.53")]
widths = [max(len(r[i]) for r in rows) for i in range(3)]
print(f"E2E NLG test set: {gen['prompts']:,} MRs, {gen['references']:,} references (configs/e2e-lora-paper.yaml)")
for r in rows:
    print(f"{r[0].ljust(widths[0])}  {r[1].rjust(widths[1])}  {r[2]}")
print(f"decoding: {gen['num_beams']} beams, length penalty {gen['length_penalty']:g}, no-repeat n-gram "
      f"{gen['no_repeat_ngram_size']}, at most {gen['max_new_tokens']} new tokens; test loss {result['loss']:.4f}")
print("scoring: BLEU (sacrebleu, 13a) and NIST (mteval-v13a) case-insensitive, as the E2E script (e2e-metrics);\n"
      "  ROUGE-L is rouge-score's F1 of the best reference (e2e-metrics: COCO's F(beta=1.2) of the best precision\n"
      "  and the best recall); CIDEr-D and METEOR on a Python approximation of COCO's PTB tokenizer")
if "meteor" not in gen:
    print(f"METEOR not computed: {why_no_meteor or 'not requested'}")
ours = {k: gen[k] for k in ("bleu", "nist", "meteor", "rouge_l", "cider", "prompts", "references") if k in gen}
report = {"config": "configs/e2e-lora-paper.yaml", "adapter": result["adapter"], "test_data": result["data"],
          "predictions": result.get("predictions"),
          "decoding": {k: gen[k] for k in ("num_beams", "length_penalty", "no_repeat_ngram_size", "max_new_tokens")},
          "ours": {"trainable_parameters": trainable, **ours}, "paper": paper}
atomic_write_text(out_dir / "reproduction.json", json.dumps(report, indent=2) + "\n")
print(f"written to {out_dir / 'reproduction.json'}; outputs in {result.get('predictions')}")
PY
