"""Write data/sms_spam_test.csv: the held-out test split of configs/spam.yaml, exactly as `lora train` builds it.

    python scripts/make_spam_test_split.py            # writes data/sms_spam_test.csv
    python scripts/make_spam_test_split.py --check    # exit 1 unless the file on disk is exactly that split

The split is the one training holds out (data.load_splits: ham undersampled to the 747 spam messages with
train.seed, then a stratified seeded 70/10/20 split), written as training writes out_dir/test.csv (the source
rows, a `label,text` header, CSV quoting). configs/appendix-e-spam.yaml has the same data file, balance, seed and
fractions, so its test split is the same rows: the script checks that too. So

    lora eval --adapter runs/spam/adapter.safetensors --data data/sms_spam_test.csv

scores data that neither config trained or validated on, without training first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_cli.config import load_config  # noqa: E402
from lora_cli.data import load_splits  # noqa: E402
from lora_cli.fsutil import atomic_write_text  # noqa: E402

CONFIGS = (ROOT / "configs" / "spam.yaml", ROOT / "configs" / "appendix-e-spam.yaml")
OUT = ROOT / "data" / "sms_spam_test.csv"


def test_split_csv(config: Path) -> tuple[str, int]:
    """The CSV text of the config's test split (what train.py's write_split writes to out_dir/test.csv) and its
    number of rows."""
    cfg = load_config(config)
    splits = load_splits(cfg, context_length=cfg.data.max_length)
    rows = [ex.row for ex in splits.test]
    return splits.frame.to_csv(rows), len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help=f"compare with {OUT.relative_to(ROOT)} instead of writing it")
    args = parser.parse_args()
    (text, rows), (other, _) = (test_split_csv(c) for c in CONFIGS)
    if text != other:
        print(f"error: {CONFIGS[0].name} and {CONFIGS[1].name} hold out different test rows", file=sys.stderr)
        return 1
    if args.check:
        same = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print(f"{OUT.relative_to(ROOT)}: {'matches' if same else 'differs from'} the test split ({rows} rows)")
        return 0 if same else 1
    atomic_write_text(OUT, text)
    print(f"wrote {OUT.relative_to(ROOT)}: {rows} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
