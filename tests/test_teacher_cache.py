"""The teacher cache (method.teacher=cache): with k = the vocabulary its losses and gradients equal the online
teacher's; with small k the top-k KD falls short of the full KD by exactly the teacher's tail mass times the tails' KL
(the stated bound); a changed dataset, target or k is refused in one line; a build killed after a shard resumes
without recomputing it and ends with the same cache."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pard_train.base.config import AttentionBackend, MethodConfig, MethodName
from pard_train.base.errors import ConfigError
from pard_train.core.layout import DropTokenSchedule, build_row, collate_rows
from pard_train.data.packing import PackedRow
from pard_train.methods.pard2_loss import Pard2Inputs, cat_weights, pard2_loss
from pard_train.methods.teacher import Teacher, TeacherSignals
from pard_train.methods.teacher_cache import MANIFEST, TeacherCache, top_k_kd
from pard_train.methods.teacher_cache_builder import TransformersScorer, build, worker_from_environment
from pard_train.testing.tiny import build_tiny_model

K, VOCAB, MASK = 4, 128, 127
SDPA = AttentionBackend.sdpa
TARGET = "tiny-target"


def _rows(seed: int = 0, count: int = 5) -> list[PackedRow]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        length = 20 + 7 * i
        cut = length // 3
        rows.append(
            PackedRow(
                torch.randint(0, 120, (length,), generator=generator).tolist(),
                [0] * cut + [1] * (length - cut),
                (torch.rand(length, generator=generator) < 0.8).tolist(),
            )
        )
    return rows


def _settings(**overrides) -> MethodConfig:
    values = dict(name=MethodName.pard2, target=TARGET, ce_weight=0.3, kd_weight=1.0, kd_temperature=1.5, cat=True)
    return MethodConfig(**{**values, "teacher": "cache", **overrides})


def _build(rows, settings, root, target_model, **kwargs):
    scorer = TransformersScorer(target_model, SDPA, torch.device("cpu"))
    return build(rows, TARGET, settings, root, lambda: scorer, **kwargs)


def _layout(rows: list[PackedRow], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    layout = [
        build_row(
            torch.tensor(r.input_ids),
            MASK,
            K,
            document=torch.tensor(r.document),
            supervised=torch.tensor(r.supervised),
            drop_tokens=DropTokenSchedule(0.7, 0.2),
            generator=generator,
        )
        for r in rows
    ]
    return collate_rows(layout, pad_token_id=0)


def _loss_and_grads(draft, inputs, settings):
    draft.zero_grad()
    normalizer = float(inputs.weights.sum())
    loss, stats = pard2_loss(draft, None, inputs, SDPA, K, settings, normalizer)
    loss.backward()
    return loss.detach(), stats, {name: p.grad.clone() for name, p in draft.named_parameters()}


def test_top_k_equal_to_the_vocabulary_trains_exactly_like_the_online_teacher(tmp_path):
    target, draft = build_tiny_model(VOCAB, seed=1), build_tiny_model(VOCAB, seed=2)
    rows = {"train": _rows(0), "validation": _rows(1, 2)}
    settings = _settings(top_k=VOCAB, top_k_dtype="float32", cache_shard_rows=2)
    directory, complete = _build(rows, settings, tmp_path, target)
    assert complete and (directory / MANIFEST).exists()
    cache = TeacherCache.open(tmp_path, rows, TARGET, settings)

    for split, row_ids in (("train", [3, 0, 4]), ("validation", [1, 0])):
        chosen = [rows[split][i] for i in row_ids]
        batch = _layout(chosen)
        teacher = Teacher(target, SDPA, None)
        online = teacher(batch)
        length = online.log_confidence.shape[1]
        log_g, ids, log_p = cache.signals(split, row_ids, length, "cpu")
        torch.testing.assert_close(log_g, online.log_confidence, atol=1e-5, rtol=0)
        online_inputs = Pard2Inputs(batch, online, cat_weights(batch, online.log_confidence), None, target)
        cached = TeacherSignals(log_g, None, None, ids, log_p)
        cached_inputs = Pard2Inputs(batch, cached, cat_weights(batch, log_g), None, None)
        loss_a, stats_a, grads_a = _loss_and_grads(draft, online_inputs, settings)
        loss_b, stats_b, grads_b = _loss_and_grads(draft, cached_inputs, settings)
        assert stats_a.weighted_kd.sum() > 0.01  # distillation is really in the loss
        torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats_b.weighted_kd, stats_a.weighted_kd, atol=1e-5, rtol=1e-5)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("k", [1, 8, 32])
def test_small_top_k_falls_short_of_the_full_kd_by_the_tail_mass_times_the_tail_kl(k):
    """0 <= KD_full - KD_k = tau^2 r_T KL(q_tail || s_tail) <= tau^2 r_T log(max_tail q/r_T / min_tail s/r_S), with
    r_T, r_S the teacher's and student's mass outside the teacher's top-k, on a tiny model's real logits."""
    target, draft = build_tiny_model(VOCAB, seed=1), build_tiny_model(VOCAB, seed=2)
    ids = torch.randint(0, 120, (2, 40), generator=torch.Generator().manual_seed(0))
    tau = 1.5
    with torch.no_grad():
        teacher_logits = target(ids).logits.reshape(-1, VOCAB)
    student_logits = draft(ids).logits.reshape(-1, VOCAB).detach().requires_grad_(True)
    teacher_log_p = F.log_softmax(teacher_logits / tau, dim=-1)
    student_log_p = F.log_softmax(student_logits / tau, dim=-1)
    full = (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(-1) * tau**2
    values, top = teacher_log_p.topk(k, dim=-1)
    partial = top_k_kd(student_logits, top, values, tau)

    tail = torch.ones_like(teacher_log_p, dtype=torch.bool).scatter(-1, top, False)
    q, s = teacher_log_p.exp().detach(), student_log_p.exp().detach()
    r_teacher = (q * tail).sum(-1)
    r_student = (s * tail).sum(-1)
    q_tail, s_tail = q / r_teacher[:, None], s / r_student[:, None]
    tail_kl = torch.where(tail, q_tail * (q_tail.log() - s_tail.log()), torch.zeros_like(q)).sum(-1)
    gap = (full - partial).detach()
    torch.testing.assert_close(gap, tau**2 * r_teacher * tail_kl, atol=1e-5, rtol=1e-4)
    ratio = torch.where(tail, q_tail.log() - s_tail.log(), torch.full_like(q, -torch.inf)).max(-1).values
    assert bool((gap >= -1e-6).all()) and bool((gap <= tau**2 * r_teacher * ratio + 1e-5).all())
    assert float(r_teacher.max()) < 1.0  # the bound is not vacuous: the top-k holds some mass
    partial.sum().backward()  # and it trains: finite gradients
    assert torch.isfinite(student_logits.grad).all()


def test_a_changed_dataset_target_or_k_refuses_the_stale_cache(tmp_path):
    target = build_tiny_model(VOCAB, seed=1)
    rows = {"train": _rows(0, 3), "validation": _rows(1, 1)}
    settings = _settings(top_k=8)
    _build(rows, settings, tmp_path, target)
    TeacherCache.open(tmp_path, rows, TARGET, settings)  # the same: accepted

    changed_rows = {"train": _rows(5, 3), "validation": rows["validation"]}
    cases = [
        (changed_rows, TARGET, settings, "the training rows"),
        (rows, "another-target", settings, "the target"),
        (rows, TARGET, _settings(top_k=16), "method.top_k"),
        (rows, TARGET, _settings(top_k=8, features=True), "method.features"),  # this cache holds no features
    ]
    for case_rows, case_target, case_settings, named in cases:
        with pytest.raises(ConfigError) as error:
            TeacherCache.open(tmp_path, case_rows, case_target, case_settings)
        message = str(error.value)
        assert "\n" not in message and "stale" in message and named in message, message
        assert "python -m pard_train.teacher_cache" in message


def test_a_killed_build_resumes_without_recomputing_its_shards(tmp_path):
    target = build_tiny_model(VOCAB, seed=1)
    rows = {"train": _rows(0, 7), "validation": _rows(1, 2)}
    settings = _settings(top_k=8, cache_shard_rows=2)  # train 4 shards, validation 1

    class Killed(BaseException):
        pass

    def kill_after_two(shard):
        written.append(shard.name)
        if len(written) == 2:
            raise Killed

    written: list[str] = []
    with pytest.raises(Killed):
        _build(rows, settings, tmp_path / "a", target, after_shard=kill_after_two)
    directory = next((tmp_path / "a").glob("teacher-*"))
    assert not (directory / MANIFEST).exists()  # not usable yet
    assert sorted(p.name for p in directory.glob("*.pt")) == sorted(written)  # whole shards only, no partial file
    before = {name: (directory / name).stat().st_mtime_ns for name in written}
    with pytest.raises(ConfigError, match="no teacher cache"):
        TeacherCache.open(tmp_path / "a", rows, TARGET, settings)

    resumed: list[str] = []
    _build(rows, settings, tmp_path / "a", target, after_shard=lambda shard: resumed.append(shard.name))
    assert len(resumed) == 3 and not set(resumed) & set(written)
    assert {name: (directory / name).stat().st_mtime_ns for name in written} == before

    # Two workers (as two ranks or array tasks) split the shards; the later one writes the manifest.
    first, complete = _build(rows, settings, tmp_path / "b", target, rank=0, world=2)
    assert not complete
    second, complete = _build(rows, settings, tmp_path / "b", target, rank=1, world=2)
    assert complete and first == second
    one = TeacherCache.open(tmp_path / "a", rows, TARGET, settings)
    two = TeacherCache.open(tmp_path / "b", rows, TARGET, settings)
    for split, split_rows in rows.items():
        ids = list(range(len(split_rows)))
        for a, b in zip(one.signals(split, ids, 64, "cpu"), two.signals(split, ids, 64, "cpu"), strict=True):
            assert torch.equal(a, b)
    manifest = json.loads((first / MANIFEST).read_text())
    # uint16 ids and float16 values per labelled token, float32 log g per real token, 16 bytes of offsets per row.
    rows_count = sum(len(split_rows) for split_rows in rows.values())
    expected = 4 * 8 * manifest["labelled_tokens"] + 4 * manifest["real_tokens"] + 16 * (rows_count + 5)
    assert manifest["payload_bytes_per_labelled_token"] * manifest["labelled_tokens"] == pytest.approx(expected)


def test_worker_comes_from_torchrun_or_a_slurm_array():
    assert worker_from_environment({}) == (0, 1)
    assert worker_from_environment({"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    slurm = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert worker_from_environment(slurm) == (2, 4)


@pytest.mark.slow
def test_training_from_a_stale_cache_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys):
    """Through the real entry points, in this process (as ``python -m`` runs them, without three interpreters)."""
    from launch import entry, one_error_line

    common = [
        "+config=pard2_tiny",
        f"model.path={tiny_checkpoint}",
        f"run.output_root={tmp_path}",
        f"data.cache_dir={tmp_path}/cache",
        "data.max_samples=24",
        "data.max_length=64",
        "method.features=false",
        "train.max_steps=2",
    ]
    code, out, err = entry(capsys, *common, "method.top_k=8", prog="pard_train.teacher_cache")
    assert code == 0, err[-2000:]
    assert "complete" in out + err
    code, _, err = entry(capsys, *common, "method.teacher=cache", "method.top_k=16")
    line = one_error_line(code, err)
    assert line.startswith("pard_train: error: method.teacher=cache:") and "method.top_k" in line, err[-2000:]
    code, _, err = entry(capsys, *common, "method.teacher=cache", "method.top_k=8")
    assert code == 0, err[-2000:]
    records = [json.loads(line) for line in (tmp_path / "pard2_tiny" / "metrics.jsonl").read_text().splitlines()]
    assert records and records[0]["kd"] > 0


@pytest.mark.slow
def test_training_from_a_full_cache_equals_the_online_teacher_with_features(tiny_checkpoint, tmp_path, monkeypatch):
    """The trainer end to end, dual mode, the features from the cache too: with k >= the vocabulary and float32
    storage, every step's loss, KD term and CAT weight equal the online teacher's (W starts at zero, so steps 2 and 3
    read the features); the cached run never loads the target."""
    from conftest import compose
    from launch import pard2_tiny_steps

    from pard_train.base.config import to_config
    from pard_train.methods import pard2
    from pard_train.methods.teacher import Teacher
    from pard_train.methods.teacher_cache_builder import build_for_config
    from pard_train.training.train import train

    settings = [
        *pard2_tiny_steps(tiny_checkpoint),
        f"data.cache_dir={tmp_path}/cache",
        "method.feature_drop=0",
        "method.top_k=100000",
        "method.top_k_dtype=float32",
        "method.feature_cache_dtype=float32",
    ]

    head_passes, loads = [], []
    log_confidence = Teacher._log_confidence
    monkeypatch.setattr(Teacher, "_log_confidence", lambda *a: head_passes.append(1) or log_confidence(*a))
    load_target = pard2.load_target
    monkeypatch.setattr(pard2, "load_target", lambda *a: loads.append(1) or load_target(*a))

    def records(name, *extra):
        config = to_config(compose(*settings, f"run.output_root={tmp_path / name}", *extra))
        final = train(config)
        return [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]

    directory, complete = build_for_config(to_config(compose(*settings, f"run.output_root={tmp_path}")))
    manifest = json.loads((directory / MANIFEST).read_text())
    assert complete and manifest["top_k"] > 500  # the whole vocabulary
    # Three layers of the tiny target's hidden states, float32, per real token.
    assert manifest["feature_bytes_per_real_token"] == manifest["feature_width"] * 4 == 3 * 64 * 4
    online = records("online")
    assert head_passes and loads, "the online teacher loads the target and computes its confidences"
    head_passes.clear()
    loads.clear()
    cached = records("cached", "method.teacher=cache")
    assert not loads and not head_passes, "the cached run loaded the target"
    assert [r["step"] for r in online] == [r["step"] for r in cached] == [1, 2, 3]
    for a, b in zip(online, cached, strict=True):
        assert a["kd"] > 0
        for key in ("loss", "loss_weighted", "kd", "cat_weight/depth_2"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    with pytest.raises(ConfigError, match="stale"):  # the cached run really read the cache: another k has none
        records("k4", "method.teacher=cache", "method.top_k=4")
    # And the features the losses depend on are the cache's: zeroed, the later steps' losses change.
    features = TeacherCache.features
    monkeypatch.setattr(TeacherCache, "features", lambda *a: features(*a).zero_())
    zeroed = records("zeroed", "method.teacher=cache")
    assert zeroed[0]["loss"] == pytest.approx(cached[0]["loss"], rel=1e-6)  # W starts at zero
    assert abs(zeroed[-1]["loss"] - cached[-1]["loss"]) > 1e-4 * abs(cached[-1]["loss"]), (zeroed, cached)


def test_the_cache_settings_are_checked_when_the_config_is_built():
    with pytest.raises(ConfigError, match="method.teacher: cache needs method=pard2"):
        MethodConfig(name=MethodName.pard, teacher="cache")
    with pytest.raises(ConfigError, match="drop confidence_cache"):
        _settings(kd_weight=0, features=False, confidence_cache=True)
    for bad in ({"top_k": 0}, {"top_k_dtype": "bfloat16"}, {"cache_shard_rows": 0}):
        with pytest.raises(ConfigError, match=f"method.{next(iter(bad))}"):
            _settings(**bad)


def _bucket_kl_by_autograd(student_logits, ids, log_q, tau):
    """The bucket KL written plainly (log_softmax, a scatter, a logsumexp), for the hand-written backward."""
    s = F.log_softmax(student_logits / tau, -1)
    q = log_q.exp()
    kl = (q * (log_q - s.gather(-1, ids))).sum(-1)
    if ids.shape[-1] < student_logits.shape[-1]:
        rest = (1 - q.sum(-1)).clamp(min=0)
        kl = kl + torch.xlogy(rest, rest) - rest * torch.logsumexp(s.scatter(-1, ids, float("-inf")), -1)
    return kl * tau**2


@pytest.mark.parametrize("k", [1, 5, 20])
def test_the_hand_written_gradients_equal_autograd(k):
    from pard_train.methods.teacher_cache import _BucketKL, cross_entropy_and_top_k_kd

    generator = torch.Generator().manual_seed(k)
    z = (torch.randn(6, 20, generator=generator, dtype=torch.double) * 3).requires_grad_()
    values, ids = F.log_softmax(torch.randn(6, 20, generator=generator, dtype=torch.double) * 2, -1).topk(k, -1)
    labels = torch.randint(0, 20, (6,), generator=generator)
    assert torch.autograd.gradcheck(lambda x: _BucketKL.apply(x, ids, values, None)[0], (z,))
    assert torch.autograd.gradcheck(lambda x: _BucketKL.apply(x, ids, values, labels), (z,))

    g_ce, g_kd = torch.randn(6, generator=generator), torch.randn(6, generator=generator)
    logits = z.detach().float().requires_grad_()
    ce, kd = cross_entropy_and_top_k_kd(logits, labels, ids, values)
    (fused,) = torch.autograd.grad((g_ce * ce + g_kd * kd).sum(), logits)
    ce_ref = F.cross_entropy(logits, labels, reduction="none")
    kd_ref = _bucket_kl_by_autograd(logits, ids, values.float(), 1.0)
    (plain,) = torch.autograd.grad((g_ce * ce_ref + g_kd * kd_ref).sum(), logits)
    torch.testing.assert_close(ce, ce_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kd, kd_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    tempered = top_k_kd(logits, ids, values.float(), 1.7)
    torch.testing.assert_close(tempered, _bucket_kl_by_autograd(logits, ids, values.float(), 1.7), atol=1e-5, rtol=1e-5)
