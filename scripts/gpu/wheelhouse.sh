#!/usr/bin/env bash
# bash scripts/gpu/wheelhouse.sh [.venv/bin]   (or: make wheelhouse) — the wheels of scripts/gpu/wheelhouse.txt (what the
# GPU check needs that the bare image lacks, computed from the image's real list by scripts/gpu/wheel_list.py) for
# CPython 3.12 Linux x86_64, into wheelhouse/ (git-ignored; carried to the device with the run tool's `carry` option
# and installed there by scripts/gpu/check.py with pip --target). Binary wheels where PyPI has them; the sdist-only
# pure-Python packages (antlr4, DeepSpeed) are built here into py3-none-any wheels. Fails over 64 MiB.
set -euo pipefail
BIN=${1:-.venv/bin}
OUT=wheelhouse
"$BIN/python" scripts/gpu/wheel_list.py --check   # the committed list is complete and carries nothing the image has
rm -rf "$OUT" && mkdir -p "$OUT"
grep -v '^#' scripts/gpu/wheelhouse.txt > "$OUT/requirements.txt"
git rev-parse HEAD > "$OUT/COMMIT" 2>/dev/null || echo unknown > "$OUT/COMMIT"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
while read -r requirement; do
    "$BIN/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
        "${PLATFORMS[@]}" -d "$OUT" "$requirement" 2>/dev/null \
        || "$BIN/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$OUT" "$requirement" \
            2>/dev/null \
        || "$BIN/pip" wheel -q --no-deps --no-build-isolation -w "$OUT" "$requirement"
done < "$OUT/requirements.txt"
if ls "$OUT"/*.whl | grep -v -e cp312 -e py312-none -e py3-none -e py2.py3-none -e abi3; then
    echo "wheelhouse: the wheels above are not for CPython 3.12" >&2
    exit 1
fi
wheels=$(ls "$OUT"/*.whl | wc -l)
wanted=$(wc -l < "$OUT/requirements.txt")
[ "$wheels" -eq "$wanted" ] || { echo "wheelhouse: $wheels wheels for $wanted requirements" >&2; exit 1; }
size=$(du -sm "$OUT" | cut -f1)
echo "wheelhouse: $wheels wheels, ${size} MiB"
[ "$size" -lt 64 ] || { echo "wheelhouse: ${size} MiB, over the 64 MiB a carry allows" >&2; exit 1; }
