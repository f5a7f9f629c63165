"""Teacher outputs: the GX suites (data tier), sharded labelling, and the cached, validated labelling flow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from distillery.config import ValidationConfig, load_config
from distillery.models.labelling import build_outputs, read_outputs, shard_bounds, teacher_logits, validation_tables, write_outputs
from distillery.models.data import read_snapshot
from distillery.models.modeling import load_classifier, load_tokenizer
from distillery.integrations.expectations import ValidationFailed, validate_teacher_outputs
from tests.helpers import run_command, LABELS, make_frames

# ---------------------------------------------------------------- data tier: the suites on fixtures


def _good_outputs(rows: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % len(LABELS)
    logits = rng.normal(size=(rows, len(LABELS))).astype(np.float32)
    logits[np.arange(rows), y] += 4.0  # a confident, mostly right teacher
    splits = ["validation" if (i // len(LABELS)) % 2 else "train" for i in range(rows)]
    return build_outputs([f"r{i}" for i in range(rows)], [f"text {i}" for i in range(rows)], splits, y, logits, LABELS)


def _validate(df, tmp_path, expected_rows=80, **thresholds):
    rows, classes = validation_tables(df, LABELS)
    cfg = ValidationConfig(**{"min_teacher_accuracy": 0.6, "min_teacher_macro_f1": 0.5, **thresholds})
    return validate_teacher_outputs(rows, classes, LABELS, expected_rows, cfg, tmp_path / "docs",
                                    run_name="teacher v7 on data snapshot abc123.dir")


def _logits_of(outputs, ids) -> np.ndarray:
    """``outputs``' logits of the rows ``ids``, in that order."""
    row = {i: n for n, i in enumerate(outputs.frame["id"])}
    return outputs.logits[[row[i] for i in ids]]


def _failed(report) -> set[tuple[str, str]]:
    return {(f["expectation"], f["target"]) for f in report.failed}


def test_suite_passes_good_outputs_and_builds_data_docs(tmp_path):
    report = _validate(_good_outputs(), tmp_path)
    assert report.success, report.failed
    assert report.evaluated == 16
    assert (tmp_path / "docs" / "index.html").is_file()
    assert report.statistics["teacher_val_accuracy"] > 0.9


def test_nan_row_fails_finiteness(tmp_path):
    df = _good_outputs()
    df.logits[5] = np.array([np.nan, 0, 0, 0], dtype=np.float32)
    assert _failed(_validate(df, tmp_path)) == {("expect_column_values_to_be_in_set", "all_finite")}
    # the self-contained summary names the run and the failure, and loads nothing from the network
    page = (tmp_path / "docs" / "summary.html").read_text()
    assert "FAILED: 1 of 16" in page and "teacher v7 on data snapshot abc123.dir" in page and "all_finite" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "**FAIL**" in (tmp_path / "docs" / "summary.md").read_text()
    docs = "".join(p.read_text() for p in (tmp_path / "docs").rglob("*.html") if p.name != "summary.html")
    assert "teacher v7 on data snapshot abc123.dir" in docs and "__none__" not in docs


def test_a_black_box_that_leaves_too_many_rows_unanswered_fails(tmp_path):
    """Rows a black-box teacher answered with no label of the set (``answered`` False) bound by
    ``min_answered_share``; at the threshold the suite passes, below it only that expectation fails."""
    df = _good_outputs()
    df.frame["answered"] = np.arange(len(df)) >= 8  # 10% unanswered
    assert _validate(df, tmp_path / "a", min_answered_share=0.9).success
    report = _validate(df, tmp_path / "b", min_answered_share=0.95)
    assert _failed(report) == {("expect_column_mean_to_be_between", "answered")}
    assert "observed 0.9" in str(ValidationFailed(report))


def test_unnormalised_probabilities_fail_the_sum(tmp_path):
    df = _good_outputs()
    df.probs[7] *= 0.5
    assert ("expect_column_values_to_be_between", "prob_sum") in _failed(_validate(df, tmp_path))


def test_collapsed_teacher_fails_class_coverage(tmp_path):
    df = _good_outputs()
    df.frame["predicted_label"] = LABELS[0]
    report = _validate(df, tmp_path)
    assert ("expect_column_values_to_be_between", "predicted_count") in _failed(report)
    message = str(ValidationFailed(report))
    assert "predicted_count" in message and "classes predicted too rarely" in message and LABELS[1] in message


def test_teacher_below_accuracy_floor_fails(tmp_path):
    outputs = _good_outputs()
    df = outputs.frame
    wrong = df["split"] == "validation"
    df.loc[wrong, "predicted_label"] = [LABELS[(LABELS.index(p) + 1) % 4] for p in df.loc[wrong, "predicted_label"]]
    failed = _failed(_validate(outputs, tmp_path))
    assert ("expect_column_mean_to_be_between", "val_correct") in failed
    assert ("expect_column_mean_to_be_between", "val_f1") in failed


def test_missing_rows_fail_the_row_count(tmp_path):
    df = _good_outputs().where(np.arange(80) < 70)
    assert _failed(_validate(df, tmp_path)) == {("expect_table_row_count_to_equal", "table")}


def test_outputs_parquet_round_trips_written_a_chunk_at_a_time_from_shard_blocks(tmp_path):
    built = _good_outputs()
    rows = built.frame[["id", "text", "split", "label_id"]]
    blocks = [built.logits[:30], built.logits[30:]]  # two shards, written in chunks of 7 rows
    write_outputs(tmp_path / "o.parquet", rows, blocks, LABELS, chunk_rows=7)
    back = read_outputs(tmp_path / "o.parquet", probs=True)
    np.testing.assert_array_equal(back.logits, built.logits)
    np.testing.assert_array_equal(back.probs, built.probs)
    assert back.logits.dtype == np.float32 and back.logits.shape == (80, len(LABELS))
    pd.testing.assert_frame_equal(back.frame, built.frame)  # text too: the students train on the outputs alone
    assert read_outputs(tmp_path / "o.parquet").probs is None  # read only when asked for
    assert pq.ParquetFile(tmp_path / "o.parquet").num_row_groups == 5 + 8  # 30 rows = 4x7 + 2, 50 = 7x7 + 1
    with pytest.raises(ValueError, match="label set match"):
        write_outputs(tmp_path / "p.parquet", rows, [built.logits[:, :3]], LABELS)
    with pytest.raises(ValueError, match="79 rows of logits for 80 texts"):
        write_outputs(tmp_path / "p.parquet", rows, [built.logits[:79]], LABELS)


def test_merge_logits_takes_earlier_rows_by_text_and_fresh_ones_in_order():
    from distillery.models.labelling import merge_logits, text_digests

    digests = text_digests(["a", "b", "c", "a"])
    assert digests[0] == digests[3] and len(set(digests.tolist())) == 3
    found = {digests[1]: np.full(2, 7.0, dtype=np.float32)}
    fresh = np.asarray([[1, 1], [2, 2], [3, 3]], dtype=np.float32)
    merged = merge_logits(digests, [fresh[:1], fresh[1:]], found, 2)  # one block per labelled shard
    np.testing.assert_array_equal(merged, [[1, 1], [7, 7], [2, 2], [3, 3]])
    with pytest.raises(ValueError, match="2 fresh logits for 3 rows"):
        merge_logits(digests, [fresh[:2]], found, 2)
    assert text_digests(["A"])[0] != text_digests(["a"])[0]  # exact texts: a cased teacher may answer differently


# ---------------------------------------------------------------- shards


def test_shards_give_the_same_outputs_as_one_pass(tiny_teacher_dir):
    texts = make_frames()[0]["text"].tolist()
    model, tokenizer = load_classifier(tiny_teacher_dir).eval(), load_tokenizer(tiny_teacher_dir)
    whole = teacher_logits(model, tokenizer, texts, 16, 32, progress=False)
    parts = [teacher_logits(model, tokenizer, texts[a:b], 16, 7, progress=False) for a, b in shard_bounds(len(texts), 3)]
    sharded = np.concatenate(parts)
    np.testing.assert_allclose(sharded, whole, rtol=0, atol=1e-5)
    assert (sharded.argmax(1) == whole.argmax(1)).all()
    assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)] and shard_bounds(2, 5) == [(0, 1), (1, 2)]


# ---------------------------------------------------------------- flow tier


@pytest.mark.usefixtures("prefect_harness")
class TestLabelFlow:
    def test_first_run_labels_second_is_a_cache_hit(self, teacher_project: Path):
        cfg_path = str(teacher_project / "distillery.yaml")
        labelled = run_command(cfg_path, "label")
        first = labelled.outputs
        assert first.cache_hit is False
        assert first.validation.success is True
        df = read_outputs(first.path).frame
        assert len(df) == 160 and set(df["split"]) == {"train", "validation"}
        # each row carries the text the teacher answered: the snapshot's own, row for row
        splits, _ = read_snapshot(Path(labelled.snapshot.path))
        rows = pd.concat([splits["train"], splits["validation"]]).set_index("id")["text"]
        assert df.set_index("id")["text"].sort_index().equals(rows.sort_index())
        meta = json.loads((Path(first.path).parent / "meta.json").read_text())
        assert meta["teacher"]["version"] == "1" and meta["run_id"] == first.run_id

        second = run_command(cfg_path, "label").outputs
        assert second.cache_hit is True and second.path == first.path
        assert second.seconds < first.seconds

        cfg = load_config(cfg_path)
        mlflow.set_tracking_uri(cfg.tracking.uri)
        client = MlflowClient()
        made = client.get_run(first.run_id)
        assert made.data.tags["teacher_outputs.cache_hit"] == "false"
        assert made.data.tags["gx.success"] == "true"
        artifacts = {a.path for a in client.list_artifacts(first.run_id, "teacher_outputs")}
        assert "teacher_outputs/outputs.parquet" in artifacts
        assert client.list_artifacts(first.run_id, "data_docs")
        hit = client.get_run(second.run_id)
        assert hit.data.tags["teacher_outputs.cache_hit"] == "true"
        assert hit.data.tags["teacher_outputs.source_run"] == first.run_id

    def test_dask_shards_give_the_same_outputs(self, teacher_project: Path, tmp_path: Path):
        cfg_path = str(teacher_project / "distillery.yaml")
        threads = run_command(cfg_path, "label", {"labelling.cache_dir": str(tmp_path / "a"),
                                                  "labelling.shards": 1}).outputs
        overrides = {"labelling.cache_dir": str(tmp_path / "b"), "labelling.shards": 3, "runtime.task_runner": "dask"}
        dask = run_command(cfg_path, "label", overrides).outputs
        assert dask.cache_hit is False and dask.key == threads.key
        a, b = read_outputs(threads.path), read_outputs(dask.path)
        assert list(a.frame["id"]) == list(b.frame["id"])
        assert list(a.frame["predicted_label"]) == list(b.frame["predicted_label"])
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)
        assert json.loads((Path(dask.path).parent / "meta.json").read_text())["shards"] == 3

    def test_a_new_set_of_rows_labels_only_its_new_texts(self, teacher_project: Path, tmp_path: Path):
        cfg_path = teacher_project / "distillery.yaml"
        cache = {"labelling.cache_dir": str(tmp_path / "cache")}
        first = run_command(cfg_path, "label", cache).outputs
        (teacher_project / "more.csv").write_text("text\nwhere is my new card\nwhy was my transfer declined\n")
        second = run_command(cfg_path, "label", {**cache, "data.transfer_set": "more.csv"}).outputs
        assert second.cache_hit is False and second.key != first.key and second.validation.success
        meta = json.loads((Path(second.path).parent / "meta.json").read_text())
        assert (meta["reused_rows"], meta["labelled_rows"], meta["reused_from"]) == (160, 2, [first.key])
        a, b = read_outputs(first.path), read_outputs(second.path)
        np.testing.assert_array_equal(_logits_of(b, a.frame["id"]), a.logits)  # taken as they were
        # the same outputs as labelling every row afresh (reuse off, an empty cache)
        fresh = run_command(cfg_path, "label", {"labelling.cache_dir": str(tmp_path / "fresh"),
                                                "data.transfer_set": "more.csv", "labelling.reuse_rows": False}).outputs
        fresh_meta = json.loads((Path(fresh.path).parent / "meta.json").read_text())
        assert (fresh_meta["reused_rows"], fresh_meta["labelled_rows"]) == (0, 162) and fresh.key == second.key
        c = read_outputs(fresh.path)
        np.testing.assert_allclose(_logits_of(c, b.frame["id"]), b.logits, rtol=0, atol=1e-5)
        cfg = load_config(cfg_path)
        mlflow.set_tracking_uri(cfg.tracking.uri)
        metrics = MlflowClient().get_run(second.run_id).data.metrics
        assert (metrics["labelling_reused_rows"], metrics["labelling_labelled_rows"]) == (160, 2)
        # another max_length shapes other logits: nothing is taken from the entries above
        shorter = run_command(cfg_path, "label", {**cache, "teacher.max_length": 8}).outputs
        shorter_meta = json.loads((Path(shorter.path).parent / "meta.json").read_text())
        assert (shorter_meta["reused_rows"], shorter_meta["labelled_rows"]) == (0, 160)

    def test_transfer_set_is_labelled_too(self, teacher_project: Path):
        (teacher_project / "transfer.csv").write_text("text\nmy pin is locked again\nrate for euro today\n")
        out = run_command(teacher_project / "distillery.yaml", "label", {"data.transfer_set": "transfer.csv"}).outputs
        df = read_outputs(out.path).frame
        assert out.cache_hit is False
        assert (df["split"] == "transfer").sum() == 2 and (df.loc[df["split"] == "transfer", "label_id"] == -1).all()

    def test_corrupted_teacher_is_stopped_with_a_readable_error(self, teacher_project: Path, tmp_path: Path):
        from distillery.integrations import registry

        cfg = load_config(teacher_project / "distillery.yaml")
        # register a NaN-emitting teacher version (and a new version means a cache miss)
        registry.configure_tracking(cfg)
        reg = registry.Registry.from_config(cfg)
        good = reg.resolve("teacher", "production")
        folder = registry.download_classifier(good, tmp_path / "dl")
        model, tokenizer = load_classifier(folder), load_tokenizer(folder)
        with torch.no_grad():
            model.classifier.bias[:] = float("nan")
        bad_dir = tmp_path / "bad"
        model.save_pretrained(bad_dir)
        tokenizer.save_pretrained(bad_dir)
        with mlflow.start_run():
            info = registry.log_classifier(bad_dir)
        bad = reg.register(info.model_uri, "teacher", {"note": "corrupted"})

        with pytest.raises(ValidationFailed) as caught:
            run_command(teacher_project / "distillery.yaml", "label", teacher_version=str(bad.version))
        message = str(caught.value)
        assert "all_finite" in message and "nothing registered" in message
        assert str(reg.resolve("teacher", "production").version) == str(good.version)
