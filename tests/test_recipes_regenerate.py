"""The regeneration recipe runs on a tiny model offline, resumes after an interruption (even one that cut a line)
without duplicating rows, splits prompts across shards, and writes rows the trainer reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pard_train.base.config import DataConfig
from pard_train.data import build_data

RECIPE = Path(__file__).resolve().parents[1] / "data_recipes" / "regenerate" / "regenerate.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("regenerate", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"conversations": [{"from": "human", "value": f"Tell me about {i}."}, {"from": "gpt", "value": "old"}]}
        for i in range(9)
    ]
    rows.append({"prompt": "Write a poem.", "response": "old"})
    rows.append(rows[0])  # a duplicate prompt: generated once
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "not json\n")
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _args(tiny_checkpoint, prompts, out, *extra):
    return [
        "--model",
        str(tiny_checkpoint),
        "--input",
        str(prompts),
        "--output-dir",
        str(out),
        "--batch-size",
        "3",
        "--max-new-tokens",
        "4",
        "--backend",
        "transformers",
        *extra,
    ]


@pytest.mark.slow
def test_regenerates_resumes_without_duplicates_and_shards(tmp_path, tiny_checkpoint, prompts, monkeypatch):
    recipe = _recipe()
    out = tmp_path / "regen"
    real = recipe.TransformersGenerator(str(tiny_checkpoint), None)
    calls = []

    def interrupted(batch, max_new_tokens, temperature):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the job were killed mid-way
        return real(batch, max_new_tokens, temperature)

    with pytest.raises(KeyboardInterrupt):
        recipe.main(_args(tiny_checkpoint, prompts, out), generator=interrupted)
    shard = out / "shard-00000-of-00001.jsonl"
    assert len(_read(shard)) == 6
    with shard.open("a") as handle:  # and a kill in the middle of a write
        handle.write('{"id": "cut-off", "messa')

    calls.clear()

    def counted(batch, max_new_tokens, temperature):
        calls.append(len(batch))
        return real(batch, max_new_tokens, temperature)

    recipe.main(_args(tiny_checkpoint, prompts, out), generator=counted)
    rows = _read(shard)
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) == 10 and sum(calls) == 4
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][1]["content"] != "old" and row["finish_reason"] in ("stop", "length")
    # A third run has nothing left to do and writes nothing.
    recipe.main(_args(tiny_checkpoint, prompts, out), generator=lambda *a: pytest.fail("generated again"))
    assert len(_read(shard)) == 10

    sharded = tmp_path / "sharded"
    for index in range(3):
        recipe.main(
            _args(tiny_checkpoint, prompts, sharded, "--shard", str(index), "--num-shards", "3"), generator=real
        )
    shard_ids = [{r["id"] for r in _read(p)} for p in sorted(sharded.glob("*.jsonl"))]
    assert len(shard_ids) == 3 and sum(map(len, shard_ids)) == 10 and set().union(*shard_ids) == set(ids)

    # The trainer reads the output (rows whose tiny random answer came out empty count as bad rows).
    config = DataConfig(train_files=[str(out / "*.jsonl")], cache_dir=str(tmp_path / "cache"), max_bad_fraction=1.0)
    data = build_data(config, real.tokenizer)
    assert data.stats["sources"][0]["rows"] == 10


def test_the_model_loads_only_when_there_is_work(tmp_path, prompts):
    recipe = _recipe()
    out = tmp_path / "regen"
    out.mkdir()
    args = ["--model", "nowhere", "--input", str(prompts), "--output-dir", str(out), "--limit", "2"]
    prompts_, _ = recipe.read_prompts([str(prompts)], recipe.DataFormat.auto, 2)
    (out / "shard-00000-of-00001.jsonl").write_text("".join(json.dumps({"id": p[0]}) + "\n" for p in prompts_))
    recipe.main(args)  # nothing to do: never tries to load "nowhere"
    with pytest.raises(SystemExit):
        recipe.main(["--model", "m", "--input", str(prompts), "--output-dir", str(out), "--shard", "2"])


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("missing input", "nowhere.jsonl' matches no file"),
        ("output dir is a file", "is a file; give a directory"),
        ("no vLLM", "vllm_python=/no/python is not an executable Python; run `make vllm`"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, tiny_checkpoint, prompts, case, says):
    import subprocess
    import sys

    out = tmp_path / "out"
    args = _args(tiny_checkpoint, prompts, out)
    if case == "missing input":
        args[args.index("--input") + 1] = str(tmp_path / "nowhere.jsonl")
    elif case == "output dir is a file":
        out.write_text("not a directory")
    else:
        args += ["--backend", "vllm", "--vllm-python", "/no/python"]
    result = subprocess.run([sys.executable, str(RECIPE), *args], capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("regenerate: error: "), result.stderr
    assert says in lines[0]


@pytest.mark.vllm
def test_vllm_regenerates_what_transformers_does_and_resumes(tmp_path, tiny_checkpoint, prompts):
    """--backend vllm (vLLM in its own environment): the same greedy answers as transformers, row for row, a rerun
    skips the ids already written, and no vLLM process outlives the engine."""
    recipe = _recipe()
    reference = recipe.main(_args(tiny_checkpoint, prompts, tmp_path / "hf"))
    args = _args(tiny_checkpoint, prompts, tmp_path / "vllm", "--backend", "vllm")
    vllm = recipe.VllmGenerator(str(tiny_checkpoint), None, None, tmp_path / "vllm.log")
    try:
        first = recipe.main([*args, "--limit", "4"], generator=vllm)
        assert len(_read(first)) == 4
        calls = []

        def counted(batch, *rest):
            calls.append(len(batch))
            return vllm(batch, *rest)

        output = recipe.main(args, generator=counted)
    finally:
        group = vllm.engine._process.pid
        vllm.close()
    _assert_group_ends(group)
    assert sum(calls) == 10 - 4  # the 4 finished ids were not generated again
    rows, expected = _read(output), {row["id"]: row for row in _read(reference)}
    assert len(rows) == len({row["id"] for row in rows}) == 10
    for row in rows:
        assert row["messages"] == expected[row["id"]]["messages"], row["id"]
        assert row["finish_reason"] == expected[row["id"]]["finish_reason"], row["id"]


def _assert_group_ends(group: int) -> None:
    """The vLLM worker's whole process group (vLLM's engine processes included) is gone after close()."""
    import os
    import time

    deadline = time.monotonic() + 15  # killed processes take a moment to be reaped
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    pytest.fail(f"processes of the vLLM worker's group {group} still run after the engine was closed")
