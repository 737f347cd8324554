#!/usr/bin/env bash
# The E2E NLG Challenge training set (trainset.csv: 42,061 rows, 9,340,189 bytes, CC BY-SA 4.0) for
# configs/e2e-lora-paper.yaml, at data/e2e/trainset.csv (git-ignored: too large to commit). The dev and test
# sets are already in the repository (data/e2e_dev.csv, data/e2e_test.csv; see data/SOURCES.md).
#
#   scripts/get_e2e_data.sh [DEST_DIR]      (default: data/e2e under the repository root)
#
# Where it comes from, in this order:
#   1. $E2E_DATA_DIR/trainset.csv, if set (a folder holding a copy you already have);
#   2. ../shared/data/e2e-nlg/trainset.csv next to the repository (the team's shared copy);
#   3. a download of the dataset's v1.0.0 release archive from GitHub (tuetschek/e2e-dataset), needs curl or
#      wget and internet access.
# The file is checked against its sha256 (the same bytes as the release) before it is put in place; an existing
# file with the right checksum is kept.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/data/e2e}"
SHA256="f27d48df45815288ab15619d47a79028c300fbb7f42e373668aba0b98c1d57c6"
URL="https://github.com/tuetschek/e2e-dataset/archive/refs/tags/v1.0.0.zip"
TARGET="$DEST/trainset.csv"

sha() { python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

if [[ -f "$TARGET" && "$(sha "$TARGET")" == "$SHA256" ]]; then
    echo "$TARGET: present, sha256 ok"
    exit 0
fi
mkdir -p "$DEST"
TMP="$(mktemp -d "$DEST/.get_e2e.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

SOURCE=""
for dir in "${E2E_DATA_DIR:-}" "$ROOT/../shared/data/e2e-nlg"; do
    if [[ -n "$dir" && -f "$dir/trainset.csv" ]]; then
        cp "$dir/trainset.csv" "$TMP/trainset.csv"
        SOURCE="$dir/trainset.csv"
        break
    fi
done
if [[ -z "$SOURCE" ]]; then
    echo "downloading $URL ..." >&2
    if command -v curl >/dev/null; then
        curl -fsSL --connect-timeout 20 -o "$TMP/e2e.zip" "$URL" || true
    elif command -v wget >/dev/null; then
        wget -q --timeout=20 -O "$TMP/e2e.zip" "$URL" || true
    fi
    if [[ -s "$TMP/e2e.zip" ]]; then
        python3 - "$TMP/e2e.zip" "$TMP/trainset.csv" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith("/trainset.csv") or n == "trainset.csv")
    open(sys.argv[2], "wb").write(z.read(name))
PY
        SOURCE="$URL"
    fi
fi
if [[ -z "$SOURCE" ]]; then
    cat >&2 <<EOF
error: no E2E training set found and the download failed (offline?). Get trainset.csv (42,061 rows,
sha256 $SHA256) from the E2E NLG Challenge dataset v1.0.0 (https://github.com/tuetschek/e2e-dataset,
release v1.0.0), then either put it at $TARGET or run: E2E_DATA_DIR=FOLDER_WITH_IT $0
EOF
    exit 1
fi
GOT="$(sha "$TMP/trainset.csv")"
if [[ "$GOT" != "$SHA256" ]]; then
    echo "error: $SOURCE has sha256 $GOT, expected $SHA256 (E2E v1.0.0 trainset.csv); not used" >&2
    exit 1
fi
chmod 644 "$TMP/trainset.csv"  # a copy of a read-only file stays replaceable
mv "$TMP/trainset.csv" "$TARGET"
echo "$TARGET: copied from $SOURCE, sha256 ok"
