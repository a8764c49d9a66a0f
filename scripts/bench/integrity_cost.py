"""python scripts/bench/integrity_cost.py [--mib 512] [--repeats 3] [--out bench_results/integrity_cost.json]

What the start-up checks cost on a cache, a training file and a model of --mib MiB each (page cache warm, as on a
rerun), against what they protect: the data cache verified on every use (xxh3 of every file) and in full (sha256
too), the training file's content fingerprint (xxh3, every start), the model identity by content on first sight
(sha256 of every weight) and on a rerun (digests remembered by size, time and inode), and tokenising the same JSONL
with the tiny preset's tokenizer (what a stale or damaged cache costs to rebuild), as seconds per GiB. The checks are
measured in one loop, interleaved, so the load of the shared machine affects them alike. Prints a Markdown table and
writes JSON.
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

from pard_train.base.config import DataConfig, DataSource
from pard_train.data import build_data
from pard_train.data.cache_manifest import verify, write_manifest
from pard_train.data.sources import resolve
from pard_train.modelio.model_identity import model_fingerprint
from pard_train.testing.tiny import build_tiny_tokenizer

DATA = Path(__file__).resolve().parents[2] / "data_recipes" / "self_instruct" / "self_instruct.jsonl"


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


def _tokenise(root: Path, text: bytes) -> tuple[float, int]:
    """Seconds to tokenise 4 copies of the offline set (no cache, one process), and the bytes tokenised."""
    sample = root / "sample.jsonl"
    sample.write_bytes(text * 4)
    tokenizer = build_tiny_tokenizer([text.decode("utf-8")])
    config = DataConfig(train_files=[str(sample)], cache=False, max_length=1024, num_proc=1, max_bad_fraction=1.0)
    return _seconds(lambda: build_data(config, tokenizer)), sample.stat().st_size


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
        training = root / "train.jsonl"  # the offline instruction set, repeated to the size
        text = DATA.read_bytes()
        training.write_bytes(text * max(1, args.mib * 2**20 // len(text)))
        source = resolve(DataSource(path=str(training)), "data.train_files")
        hashes = root / "model_hashes.json"
        timings = {"cache: verify (xxh3, every use)": [], "cache: verify in full (and sha256)": []}
        timings |= {"training file: content fingerprint (xxh3, every start)": []}
        timings |= {"model identity: first sight": [], "model identity: rerun": []}
        for _ in range(args.repeats):
            timings["cache: verify (xxh3, every use)"].append(_seconds(lambda: verify(cache)))
            timings["cache: verify in full (and sha256)"].append(_seconds(lambda: verify(cache, full=True)))
            timings["training file: content fingerprint (xxh3, every start)"].append(_seconds(source.fingerprint))
            hashes.unlink(missing_ok=True)
            timings["model identity: first sight"].append(_seconds(lambda: model_fingerprint(str(model), hashes)))
            timings["model identity: rerun"].append(_seconds(lambda: model_fingerprint(str(model), hashes)))

        tokenise_seconds, tokenised_bytes = _tokenise(root, text)
    per_gib = 2**30 / (args.mib * 2**20)
    rows = [
        [
            "cache: write the manifest (once, with the cache)",
            f"{write_seconds * 1e3:.0f}",
            f"{write_seconds * per_gib:.2f}",
        ]
    ]
    for what, values in timings.items():
        median = statistics.median(values)
        rows.append([what, f"{median * 1e3:.1f}", f"{median * per_gib:.2f}"])
    tokenise_per_gib = tokenise_seconds * 2**30 / tokenised_bytes
    rows.append(
        [f"tokenising the JSONL (tiny tokenizer, {tokenised_bytes / 2**20:.1f} MiB)", "–", f"{tokenise_per_gib:.0f}"]
    )
    print(f"{args.mib} MiB, median of {args.repeats}\n")
    print(markdown_table(["check", "ms", "s per GiB"], rows))
    payload = {"meta": metadata(mib=args.mib, repeats=args.repeats), "write_manifest_s": write_seconds}
    payload["seconds"] = timings
    payload["tokenise_s_per_gib"] = tokenise_per_gib
    write_json(args.out, payload)


if __name__ == "__main__":
    sys.exit(main())
