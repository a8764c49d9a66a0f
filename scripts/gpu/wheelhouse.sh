#!/usr/bin/env bash
# bash scripts/gpu/wheelhouse.sh [.venv/bin]   (or: make wheelhouse) — wheels for Python 3.12 of what the bare GPU
# image lacks, into wheelhouse/ (git-ignored; carried to the device with the run tool's `carry` option). Binary wheels
# for CPython 3.12 manylinux x86_64 where PyPI has them; the few sdist-only packages (antlr4, DeepSpeed) are pure
# Python and are built here into py3-none-any wheels. Fails if the result is not under 64 MiB.
set -euo pipefail
BIN=${1:-.venv/bin}
OUT=wheelhouse
rm -rf "$OUT" && mkdir -p "$OUT"
"$BIN/python" scripts/gpu/wheel_list.py > "$OUT/requirements.txt"
git rev-parse HEAD > "$OUT/COMMIT" 2>/dev/null || echo unknown > "$OUT/COMMIT"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
while read -r requirement; do
    "$BIN/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
        "${PLATFORMS[@]}" -d "$OUT" "$requirement" 2>/dev/null \
        || "$BIN/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$OUT" "$requirement" \
            2>/dev/null \
        || "$BIN/pip" wheel -q --no-deps --no-build-isolation -w "$OUT" "$requirement"
done < "$OUT/requirements.txt"
"$BIN/pip" wheel -q --no-deps --no-build-isolation -w "$OUT" . && rm -rf build   # pard_train itself
if ls "$OUT"/*.whl | grep -v -e cp312 -e py312-none -e py3-none -e py2.py3-none -e abi3; then
    echo "wheelhouse: the wheels above are not for CPython 3.12" >&2
    exit 1
fi
size=$(du -sm "$OUT" | cut -f1)
echo "wheelhouse: $(ls "$OUT"/*.whl | wc -l) wheels, ${size} MiB"
[ "$size" -lt 64 ] || { echo "wheelhouse: ${size} MiB, over the 64 MiB a carry allows" >&2; exit 1; }
