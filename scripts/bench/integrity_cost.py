"""python scripts/bench/integrity_cost.py [--mib 512] [--repeats 3] [--out bench_results/integrity_cost.json]

What the start-up checks of issue 21 cost on a cache and a model of --mib MiB of random bytes (page cache warm, as on
a rerun): the data cache manifest verified the cheap way (sizes and write times: what every use does) against a full
re-hash (what a rewritten file costs once), and the model identity by content on first sight (every weight hashed)
against a rerun (digests remembered by size, time and inode). Both sides of each pair are measured in the same loop,
interleaved, so the load of the shared machine affects both alike. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import markdown_table, metadata, write_json

from pard_train.data.cache_manifest import verify, write_manifest
from pard_train.modelio.model_identity import model_fingerprint


def _fill(directory: Path, names: list[str], mib: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    share = mib * 2**20 // len(names)
    for name in names:
        with open(directory / name, "wb") as handle:
            for _ in range(share // 2**20):
                handle.write(os.urandom(2**20))


def _seconds(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_results/integrity_cost.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        cache, model = root / "cache", root / "model"
        _fill(cache / "documents", ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"], args.mib)
        _fill(model, ["model.safetensors"], args.mib)
        (model / "config.json").write_text('{"model_type": "llama"}')
        write_seconds = _seconds(lambda: write_manifest(cache))
        hashes = root / "model_hashes.json"
        timings = {"cache: verify (sizes and times)": [], "cache: verify, full re-hash": []}
        timings |= {"model identity: first sight": [], "model identity: rerun": []}
        for _ in range(args.repeats):
            timings["cache: verify (sizes and times)"].append(_seconds(lambda: verify(cache)))
            timings["cache: verify, full re-hash"].append(_seconds(lambda: verify(cache, full=True)))
            hashes.unlink(missing_ok=True)
            timings["model identity: first sight"].append(_seconds(lambda: model_fingerprint(str(model), hashes)))
            timings["model identity: rerun"].append(_seconds(lambda: model_fingerprint(str(model), hashes)))

    rows = [["cache: write the manifest (once, with the cache)", f"{write_seconds * 1e3:.0f}"]]
    rows += [[what, f"{statistics.median(values) * 1e3:.1f}"] for what, values in timings.items()]
    print(f"{args.mib} MiB, median of {args.repeats}\n")
    print(markdown_table(["check", "ms"], rows))
    payload = {"meta": metadata(mib=args.mib, repeats=args.repeats), "write_manifest_s": write_seconds}
    payload["seconds"] = timings
    write_json(args.out, payload)


if __name__ == "__main__":
    sys.exit(main())
