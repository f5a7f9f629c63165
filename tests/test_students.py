"""Students, training loop determinism and crash-resume, quantisation and the evaluation harness."""

from __future__ import annotations

import pytest
import torch

from distillery.models.evaluation import TimingSettings, evaluate_model
from distillery.models.modeling import ModelError, build_student, count_parameters, load_classifier, load_tokenizer, quantize_int8
from distillery.models.training import (
    CrossEntropyObjective,
    DistillationObjective,
    TrainSettings,
    collate,
    encode,
    train_model,
)
from tests.helpers import LABELS, make_frames


def test_cut_student_keeps_the_chosen_layers_weights(tiny_teacher_dir):
    teacher = load_classifier(tiny_teacher_dir)
    student = build_student(teacher, "cut", [1], 0, 0, 0, 0)
    assert student.config.num_hidden_layers == 1 and len(student.bert.encoder.layer) == 1
    for (name, p_s), (_, p_t) in zip(student.bert.encoder.layer[0].named_parameters(),
                                     teacher.bert.encoder.layer[1].named_parameters()):
        assert torch.equal(p_s, p_t), name
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert student.bert.encoder.layer[0] is not teacher.bert.encoder.layer[1]  # a copy: training it spares the teacher
    assert count_parameters(student) < count_parameters(teacher)
    with pytest.raises(ModelError, match="out of range"):
        build_student(teacher, "cut", [5], 0, 0, 0, 0)


def test_config_student_is_smaller_and_keeps_vocabulary(tiny_teacher_dir):
    teacher = load_classifier(tiny_teacher_dir)
    student = build_student(teacher, "config", [], num_layers=1, hidden_size=16, num_attention_heads=2,
                            intermediate_size=32)
    assert student.config.hidden_size == 16 and student.config.vocab_size == teacher.config.vocab_size
    assert student.config.num_labels == len(LABELS)


def _data(tokenizer):
    train, test = make_frames()
    return (encode(tokenizer, train["text"], 16, train["category"].map(LABELS.index)),
            encode(tokenizer, test["text"], 16, test["category"].map(LABELS.index)))


def test_training_is_deterministic_and_resumes_after_a_crash(tiny_teacher_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    train, val = _data(tokenizer)
    settings = TrainSettings(epochs=3, batch_size=16, learning_rate=3e-3, patience=10, seed=5)

    def run(checkpoint=None, crash_at=None):
        model = load_classifier(tiny_teacher_dir)

        def maybe_crash(epoch, row):
            if epoch == crash_at:
                raise KeyboardInterrupt("simulated crash")

        result = train_model(model, CrossEntropyObjective(), train, val, settings, tokenizer.pad_token_id,
                             checkpoint_dir=checkpoint, on_epoch_end=maybe_crash, progress=False)
        return model, result

    reference, ref_result = run()
    again, _ = run()
    for a, b in zip(reference.parameters(), again.parameters()):
        assert torch.equal(a, b)  # seeded and deterministic on CPU

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "ckpt", crash_at=2)  # epoch 2 finished training, crashed before its checkpoint
    resumed, result = run(tmp_path / "ckpt")
    assert result.resumed_from_epoch == 1
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history == ref_result.history
    for a, b in zip(reference.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)


def test_a_trial_below_the_bar_is_pruned_after_that_epoch(tiny_teacher_dir):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    train, val = _data(tokenizer)
    settings = TrainSettings(epochs=4, batch_size=16, learning_rate=3e-3, patience=10, seed=5)

    def run(bars):
        return train_model(load_classifier(tiny_teacher_dir), CrossEntropyObjective(), train, val, settings,
                           tokenizer.pad_token_id, progress=False, prune_below=bars)

    free = run(())
    assert len(free.history) == 4 and not free.pruned
    # no bar in epoch 1, an unreachable one after epoch 2: it stops there, marked pruned (not a patience stop)
    pruned = run((None, 1.01, None, None))
    assert [h["epoch"] for h in pruned.history] == [1, 2] and pruned.pruned and pruned.stopped_early
    assert pruned.history == free.history[:2]  # the same training until the bar stopped it
    passed = run((None, 0.0, 0.0))  # bars it clears change nothing
    assert passed.history == free.history and not passed.pruned


def test_distillation_objective_moves_student_towards_teacher(tiny_teacher_dir):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    train, val = _data(tokenizer)
    teacher_logits = torch.randn(len(train), len(LABELS)) * 3
    train.teacher_logits = teacher_logits
    teacher = load_classifier(tiny_teacher_dir)
    student = build_student(teacher, "config", [], 1, 16, 2, 32)
    objective = DistillationObjective(2.0, 1.0, 0.0, feature_weight=0.5, teacher=teacher, student=student)
    assert objective.aligner is not None and len(list(objective.parameters())) > 0
    result = train_model(student, objective, train, val, TrainSettings(epochs=2, batch_size=16, learning_rate=5e-3,
                                                                       patience=5), tokenizer.pad_token_id, progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_pooled_feature_kd_trains_the_projection_with_cached_teacher_features(tiny_teacher_dir, tmp_path):
    """A student with its own tokenizer and width (24 vs the teacher's 32) learns from the teacher's pooled
    features: the features travel with the rows, the projection is trained, and rows without them are an error."""
    import numpy as np

    from distillery.models.labelling import teacher_pooled
    from tests.helpers import build_tiny_model
    from tests.helpers import make_frames

    teacher, teacher_tok = load_classifier(tiny_teacher_dir).eval(), load_tokenizer(tiny_teacher_dir)
    frame, _ = make_frames()
    texts, labels = frame["text"].tolist(), [LABELS.index(c) for c in frame["category"]]
    features = teacher_pooled(teacher, teacher_tok, texts, 32, 16, progress=False)
    assert features.shape == (len(texts), 32) and np.isfinite(features).all()
    other = build_tiny_model(tmp_path / "other", texts, LABELS, vocab_words=60, hidden_size=24)
    tokenizer, student = load_tokenizer(other), load_classifier(other)
    train = encode(tokenizer, texts, 32, labels, np.zeros((len(texts), len(LABELS)), np.float32), features)
    assert train.teacher_features.shape == (len(texts), 32)
    objective = DistillationObjective(1.0, 0.0, 0.0, feature_weight=1.0, teacher=teacher, student=student,
                                      feature_target="pooled")
    assert objective.pooler is not None and objective.aligner is None
    before = objective.pooler.projection.weight.detach().clone()
    result = train_model(student, objective, train, train, TrainSettings(epochs=3, batch_size=16, learning_rate=5e-3,
                                                                         patience=5), tokenizer.pad_token_id,
                         progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]  # the feature loss alone goes down
    assert not torch.equal(before, objective.pooler.projection.weight)
    without = encode(tokenizer, texts, 32, labels, np.zeros((len(texts), len(LABELS)), np.float32))
    with pytest.raises(ValueError, match="sentence features"):
        objective(student, collate(without, [0, 1], tokenizer.pad_token_id))


def test_int8_and_harness_report_every_metric(tiny_teacher_dir):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    _, test = _data(tokenizer)
    model = load_classifier(tiny_teacher_dir).eval()
    int8 = quantize_int8(model)
    assert "DynamicQuantizedLinear" in repr(int8) and "DynamicQuantizedLinear" not in repr(model)
    timing = TimingSettings(repeats=3, warmup=1, throughput_batches=1)
    m, logits = evaluate_model(model, test, tokenizer.pad_token_id, len(LABELS), None, timing)
    q, _ = evaluate_model(int8, test, tokenizer.pad_token_id, len(LABELS), logits.argmax(1), timing,
                          parameters=count_parameters(model))
    for key in ("accuracy", "macro_f1", "ece", "agreement", "latency_p50_ms", "latency_p95_ms", "throughput_rps",
                "parameters", "size_mb", "per_class_f1"):
        assert key in m and key in q
    assert q["size_mb"] < m["size_mb"] and q["parameters"] == m["parameters"]
    assert 0.9 <= q["agreement"] <= 1.0 and len(m["per_class_f1"]) == len(LABELS)
    assert m["latency_p95_ms"] >= m["latency_p50_ms"] > 0


def test_length_grouped_batches_cover_every_row_once_and_pad_less(tiny_teacher_dir):
    from distillery.models.training import Encoded, epoch_batches

    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 60, (1000,), generator=rng).tolist()
    data = Encoded.from_rows([[1] * n for n in lengths], torch.zeros(1000, dtype=torch.long))

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain = epoch_batches(data, 16, torch.Generator().manual_seed(3), group_by_length=False)
    grouped = epoch_batches(data, 16, torch.Generator().manual_seed(3), group_by_length=True, window=10)
    for batches in (plain, grouped):
        assert sorted(i for b in batches for i in b) == list(range(1000)) and max(len(b) for b in batches) == 16
    assert padded(grouped) < 0.75 * padded(plain)
    assert grouped == epoch_batches(data, 16, torch.Generator().manual_seed(3), group_by_length=True, window=10)
    assert grouped != epoch_batches(data, 16, torch.Generator().manual_seed(4), group_by_length=True, window=10)
    # the batch order is shuffled, not longest-first
    firsts = [max(lengths[i] for i in b) for b in grouped]
    assert firsts != sorted(firsts, reverse=True)


def test_a_narrow_student_can_start_from_the_teachers_weights(tiny_teacher_dir):
    """Weight selection: each student tensor is the leading slice of the teacher's (layers spread evenly), so the
    narrow student starts from the teacher's knowledge instead of noise; random init stays the default."""
    teacher = load_classifier(tiny_teacher_dir)
    student = build_student(teacher, "config", [], 1, 16, 2, 32, seed=5, from_teacher=True)
    t, s = teacher.state_dict(), student.state_dict()
    emb = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(s[emb], t[emb][:, :16])
    last = teacher.config.num_hidden_layers - 1  # one student layer reads the teacher's first ((m - 1) = 0 spread)
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(s[q], t[q][:16, :16]) and t[q.replace(".0.", f".{last}.")].shape[0] >= 16
    head = "classifier.weight"
    assert torch.equal(s[head], t[head][:, :16])
    random = build_student(teacher, "config", [], 1, 16, 2, 32, seed=5)
    assert not torch.equal(random.state_dict()[emb], s[emb])


def test_checkpoint_keys_ignore_the_served_form_and_unset_later_keys():
    from distillery.config import StudentConfig
    from distillery.models.students import training_shape

    base = StudentConfig(init="cut", prune_vocab=False)  # a cut of the teacher, as checkpoints before them were
    before = {"init": "cut", "base_model": "minilm", "layers": (0, 5), "num_layers": 2, "hidden_size": 256,
              "num_attention_heads": 4, "intermediate_size": 1024, "prune_vocab": False, "vocab_reserve": 0}
    assert training_shape(base) == before  # the keys of checkpoints made before frontiers, selection, cuts
    assert training_shape(base.model_copy(update={"deploy": "onnx-int8", "frontier": ({"layers": [0]},)})) == before
    assert training_shape(base.model_copy(update={"select_weights": True}))["select_weights"] is True
    assert training_shape(base.model_copy(update={"pretrained_layers": (0, 2)}))["pretrained_layers"] == (0, 2)


def test_teacher_features_are_cached_beside_the_soft_labels_and_refused_when_not_finite(tiny_teacher_dir, tmp_path):
    """Computed once per outputs entry (a second call reads the file, even with the teacher gone), and a teacher
    whose hidden states are NaN is refused with a clear error, nothing cached."""
    import shutil

    import numpy as np

    from distillery.config import config_from_dict
    from distillery.models.modeling import ModelError, save_classifier
    from distillery.records import TeacherOutputs, TeacherRef, ValidationSummary
    from distillery.tasks.labelling import FEATURES_FILE, teacher_features

    cfg = config_from_dict({"teacher": {"max_length": 16}})
    frame, _ = make_frames()
    ids, texts = [f"r{i}" for i in range(len(frame))], frame["text"].tolist()
    entry = tmp_path / "cache" / "key"
    entry.mkdir(parents=True)
    outputs = TeacherOutputs(path=str(entry / "outputs.parquet"), key="key", cache_hit=False, seconds=0.0,
                             run_id="r", validation=ValidationSummary(success=True, evaluated=0))
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, folder)
    teacher = TeacherRef(name="teacher", version="1", run_id="r", folder=str(folder))
    first = teacher_features(cfg, teacher, outputs, ids, texts)
    assert first.shape == (len(ids), 32) and (entry / FEATURES_FILE).is_file()
    shutil.rmtree(folder)  # the teacher is gone: only the cache can answer
    again = teacher_features(cfg, teacher, outputs, ids[::-1], texts[::-1])
    assert np.array_equal(again, first[::-1])  # in the order asked for
    with pytest.raises(ModelError, match="holds no config.json"):  # a row it lacks: computed, from the gone teacher
        teacher_features(cfg, teacher, outputs, ids + ["new"], texts + ["a new text"])

    (entry / FEATURES_FILE).unlink()
    model = load_classifier(tiny_teacher_dir)
    with torch.no_grad():
        model.bert.encoder.layer[-1].output.dense.bias[:] = float("nan")
    save_classifier(model, load_tokenizer(tiny_teacher_dir), folder)
    with pytest.raises(ModelError, match="non-finite hidden states on 160 of 160 texts"):
        teacher_features(cfg, teacher, outputs, ids, texts)
    assert not (entry / FEATURES_FILE).exists()
    # a caller holding the teacher passes it: the folder's (NaN) weights are not read again
    given = teacher_features(cfg, teacher, outputs, ids, texts, model=load_classifier(tiny_teacher_dir))
    assert np.allclose(given, first, atol=1e-5) and (entry / FEATURES_FILE).is_file()


def test_a_large_text_set_is_encoded_into_int32_arrays_with_bounded_memory(tiny_teacher_dir):
    """100,000 texts: their token ids end up in one int32 array (3.5 MB), and tokenising them never holds more than a
    chunk of Python token lists at once (tracemalloc's peak: ~20 MB; all of them as lists at once: ~137 MB)."""
    import tracemalloc

    import numpy as np

    from distillery.models.training import ENCODE_CHUNK, collate

    tokenizer = load_tokenizer(tiny_teacher_dir)
    base = make_frames()[0]["text"].tolist()[:8]
    texts = [f"{base[i % 8]} {i}" for i in range(100_000)]
    tracemalloc.start()
    try:
        data = encode(tokenizer, texts, 32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data) == 100_000 and data.ids.dtype == np.int32 and ENCODE_CHUNK < len(texts)
    assert peak < 40e6, f"peak {peak / 1e6:.1f} MB"
    one = tokenizer(texts[62_345], truncation=True, max_length=32)["input_ids"]
    assert data.row(62_345).tolist() == one
    batch = collate(data, [62_345, 7], tokenizer.pad_token_id)
    assert batch["input_ids"][0, : len(one)].tolist() == one and int(batch["attention_mask"][0].sum()) == len(one)
