#!/usr/bin/env bash
# Reproduce the LoRA appendix (E) of Raschka, "Build a Large Language Model (From Scratch)": GPT-2 124M as an
# SMS spam classifier with LoRA r=16 on every linear layer. Published: 2,666,528 trainable parameters, test
# accuracy 96.67-97.33%.
#
#   scripts/reproduce_appendix_e.sh [lora train arguments]      e.g. --overwrite, --set train.device=cuda
#
# 1. trains configs/appendix-e-spam.yaml (downloads GPT-2 124M from the Hugging Face hub on first use; a GPU
#    is picked when there is one), extra arguments go to `lora train`;
# 2. evaluates the adapter on the held-out test split the run wrote (out_dir/test.csv, 20% of the balanced data);
# 3. prints our trainable-parameter count and test accuracy next to the published figures, and writes them to
#    out_dir/reproduction.json.
# Environment: PYTHON (default python3) runs this repository's lora_cli; EVAL_BATCH (default 8).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CONFIG="$ROOT/configs/appendix-e-spam.yaml"
lora() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m lora_cli "$@"; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "== 1/3 lora train $CONFIG $*" >&2
# stdout (the adapter path) to a file; the log to the terminal and to a file (for the parameter count)
{ lora train "$CONFIG" "$@" 2>&1 1>&3 3>&- | tee "$WORK/train.log" >&2; } 3>"$WORK/train.out"
ADAPTER="$(tail -n 1 "$WORK/train.out")"
OUT_DIR="$(dirname "$ADAPTER")"
[[ -f "$ADAPTER" && -f "$OUT_DIR/test.csv" ]] || { echo "error: no adapter or test split in $OUT_DIR" >&2; exit 1; }

echo "== 2/3 lora eval --adapter $ADAPTER --data $OUT_DIR/test.csv" >&2
lora eval --adapter "$ADAPTER" --data "$OUT_DIR/test.csv" --no-base --json --batch-size "${EVAL_BATCH:-8}" \
    > "$WORK/eval.json"

echo "== 3/3 ours vs published" >&2
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$WORK/train.log" "$WORK/eval.json" "$OUT_DIR" <<'PY'
import json, re, sys
from pathlib import Path

from lora_cli.fsutil import atomic_write_text

log, result, out_dir = Path(sys.argv[1]).read_text(), json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
found = re.search(r"trainable parameters: ([\d,]+) of ([\d,]+)", log)
trainable = int(found.group(1).replace(",", "")) if found else None
ours = {"trainable_parameters": trainable, "test_accuracy": result["accuracy"], "test_examples": result["examples"],
        "test_macro_f1": result["macro_f1"], "test_loss": result["loss"]}
published = {"trainable_parameters": 2_666_528, "test_accuracy": [0.9667, 0.9733]}
rows = [
    ("", "ours", "published (Raschka, appendix E)"),
    ("trainable parameters", f"{trainable:,}" if trainable is not None else "?", "2,666,528"),
    ("test accuracy", f"{100 * result['accuracy']:.2f}%", "96.67-97.33%"),
    ("test examples", f"{result['examples']:,}", "300 (20% of 1,494 balanced messages)"),
]
widths = [max(len(r[i]) for r in rows) for i in range(3)]
print("SMS spam classification, GPT-2 124M + LoRA r=16 on every linear layer (configs/appendix-e-spam.yaml)")
for r in rows:
    print(f"{r[0].ljust(widths[0])}  {r[1].rjust(widths[1])}  {r[2]}")
print(f"test macro-F1 {result['macro_f1']:.4f}, loss {result['loss']:.4f}; confusion matrix (rows true "
      f"{', '.join(result['labels'])}): {result['confusion_matrix']}")
report = {"config": "configs/appendix-e-spam.yaml", "adapter": result["adapter"], "test_data": result["data"],
          "ours": ours, "published": published}
atomic_write_text(out_dir / "reproduction.json", json.dumps(report, indent=2) + "\n")
print(f"written to {out_dir / 'reproduction.json'}")
PY
