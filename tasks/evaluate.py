"""Prefect task: the one evaluation harness over all candidates, logged to MLflow (a parent run, nested per candidate)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.config import Config
from distillery.integrations import registry, store
from distillery.integrations.registry import PER_CLASS_FILE
from distillery.integrations.served_model import SERVING_FILE
from distillery.records import (
    MODEL_SHA_TAG,
    PRIMARY,
    QUANTISED_TEACHERS,
    Evaluation,
    SnapshotRef,
    TeacherRef,
    TrainedStudent,
    served_candidate,
)
from distillery.models.calibration import abstention, calibrated, fit_temperature
from distillery.models.data import read_out_of_scope, read_snapshot
from distillery.models.metrics import expected_calibration_error
from distillery.models.training import predict_logits
from distillery.models.gate import best_reference
from distillery.models.evaluation import (
    TimingSettings,
    encode_per_folder,
    evaluate_model,
    harness_candidates,
    paired_latency_ratio,
)
from distillery.models.report import (
    frontier_table,
    headline_ratios,
    plot_confusion,
    plot_frontier,
    plot_f1_difference,
    plot_oos_tradeoff,
    plot_reliability,
    oos_table,
    results_table,
)


def served_path_latency(folder: str, form: str, max_length: int, texts: list[str],
                        timing: TimingSettings) -> dict[str, float]:
    """Batch-1 latency of the served code path end to end, in process: the registered model's own loader
    (``ServedClassifier``) tokenising, running the form and post-processing one text at a time."""
    import time

    import torch

    from distillery.integrations.served_model import ServedClassifier

    served = ServedClassifier(Path(folder), {"quantize": form, "max_length": max_length, "threads": timing.threads})
    rows = np.random.default_rng(timing.seed).choice(len(texts), size=timing.warmup + timing.repeats, replace=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(timing.threads)
    samples = []
    try:
        for k, i in enumerate(rows):
            start = time.perf_counter()
            served.predict([texts[int(i)]])
            if k >= timing.warmup:
                samples.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous)
    return {"served_latency_p50_ms": float(np.percentile(samples, 50)),
            "served_latency_p95_ms": float(np.percentile(samples, 95))}


def _served_forms(cfg: Config, metrics: dict[str, dict], candidates: dict[str, tuple], encoded: dict,
                  folders: dict[str, str], texts: list[str], timing: TimingSettings) -> tuple[str, list[str]]:
    """The gate's reference (the teacher's quantised form with the best validation accuracy) and the students in
    their served form, each timed against the reference in interleaved pairs (see
    ``models.evaluation.paired_latency_ratio``) and through its served code path end to end."""
    form = cfg.student.deploy
    reference = best_reference(metrics, form)
    contenders = [served_candidate(form, name) for name in folders]
    r_model, _, r_folder = candidates[reference]
    for name, contender in zip(folders, contenders):
        model, _, folder = candidates[contender]
        paired = paired_latency_ratio(model, *encoded[folder], r_model, *encoded[r_folder], timing)
        paired.update(served_path_latency(folders[name], form, cfg.distill.max_length, texts, timing))
        metrics[contender].update(paired)
    return reference, contenders


def onnx_teacher_folder(cfg: Config, teacher: TeacherRef) -> Path:
    """Where a registered teacher's ONNX Runtime INT8 form is kept (made once per teacher version)."""
    return cfg.work.onnx / f"{teacher.name}-v{teacher.version}-{teacher.run_id[:12]}"


@task(name="evaluate-candidates", cache_policy=NO_CACHE)
def evaluate_candidates(cfg: Config, snapshot: SnapshotRef, teacher: TeacherRef, student: TrainedStudent,
                        baseline: TrainedStudent, parent_run_id: str,
                        frontier: dict[str, TrainedStudent] | None = None) -> Evaluation:
    """Teacher and distilled student in every form (FP32, torch INT8, ONNX Runtime INT8), the baseline, and the
    ``frontier`` students (``{shape: student}``) in the served form, on the held-out test split."""
    logger = get_run_logger()
    frontier = frontier or {}
    splits, labels = read_snapshot(Path(snapshot.path))
    test = splits["test"]
    texts, gold = test["text"].tolist(), test["label_id"].tolist()
    e = cfg.evaluation
    timing = TimingSettings(threads=e.threads, warmup=e.warmup, repeats=e.repeats, throughput_batches=e.throughput_batches)
    candidates = harness_candidates(teacher.folder, student.folder, baseline.folder, onnx_teacher_folder(cfg, teacher),
                                    {k: v.folder for k, v in frontier.items()}, cfg.student.deploy)
    folders = {c[2] for c in candidates.values()}

    def encoded_rows(df) -> dict:  # noqa: ANN001
        rows = df if df is not None else test.iloc[:0]
        return encode_per_folder(folders, rows["text"].tolist(), [max(i, 0) for i in rows["label_id"]],
                                 cfg.distill.max_length)

    encoded, encoded_val = encoded_rows(test), encoded_rows(splits["validation"])
    eval_run = registry.create_run(cfg, "evaluation", {"stage": "evaluate", **teacher.to_tags(),
                                                        "student.run_id": student.run_id,
                                                        "baseline.run_id": baseline.run_id,
                                                        **{f"frontier.{k}.run_id": v.run_id
                                                           for k, v in frontier.items()}},
                                   parent_run_id, snapshot=snapshot, split="test")
    scope, oos = read_out_of_scope(Path(snapshot.path))
    abstain = e.abstain == "on" or (e.abstain == "auto" and scope.active)
    encoded_oos = {k: encoded_rows(oos.get(k)) for k in ("oos_validation", "oos_test")} if abstain else {}
    if abstain:
        with registry.open_run(cfg, eval_run):
            registry.log_params({"oos.label": scope.oos_label, "oos.held_out_intents": ",".join(scope.held_out),
                                 "oos.target": e.abstain_target, "oos.target_value": e.abstain_value,
                                 "oos.score": e.abstain_score,
                                 **{f"oos.{k}_rows": len(v) for k, v in oos.items()}})
    metrics: dict[str, dict] = {}
    logits: dict[str, np.ndarray] = {}
    curves: dict[str, tuple] = {}
    reference_pred = None
    for name, (model, params, folder) in candidates.items():
        data, pad = encoded[folder]
        size = model.size_bytes() if hasattr(model, "size_bytes") else None  # an ONNX file's bytes
        m, out = evaluate_model(model, data, pad, len(labels), reference_pred, timing, params, e.ece_bins,
                                size_bytes=size)
        if name == "teacher_fp32":
            reference_pred = out.argmax(1)
        val_data, val_pad = encoded_val[folder]
        val_logits = predict_logits(model, val_data, val_pad)
        val_labels = val_data.labels.numpy()
        m["val_accuracy"] = float((val_logits.argmax(1) == val_labels).mean())  # chooses the gate's reference
        if e.calibrate:  # temperature scaling fitted on validation, measured on test
            m["temperature"] = fit_temperature(val_logits, val_labels)
            m["ece_calibrated"] = expected_calibration_error(calibrated(out, m["temperature"]), np.asarray(gold),
                                                             e.ece_bins)
        if abstain:  # threshold chosen on validation (in- and out-of-scope rows), measured on test
            oos_logits = {k: predict_logits(model, *encoded_oos[k][folder]) for k in encoded_oos}
            threshold, om, curves[name] = abstention(
                val_logits, val_labels, oos_logits["oos_validation"], out, np.asarray(gold),
                oos_logits["oos_test"], m.get("temperature", 1.0), e.abstain_target, e.abstain_value,
                e.abstain_score)
            m.update({"abstain_threshold": threshold, **om.to_dict()})
        metrics[name], logits[name] = m, out
        logger.info("%s: accuracy %.4f, macro-F1 %.4f, p50 %.2f ms, %.1f MB", name, m["accuracy"], m["macro_f1"],
                    m["latency_p50_ms"], m["size_mb"])
    reference, contenders = _served_forms(
        cfg, metrics, candidates, encoded, {PRIMARY: student.folder, **{k: v.folder for k, v in frontier.items()}},
        texts, timing)
    served = contenders[0]
    # the measured files' identity: promotion and `lineage --verify` check the registered files against it
    hashes = {folder: store.tree_sha256(folder, exclude=(SERVING_FILE,)) for folder in folders}
    for name, m in metrics.items():
        run_id = registry.create_run(cfg, name, {"stage": "evaluate", "candidate": name,
                                                 MODEL_SHA_TAG: hashes[candidates[name][2]]}, eval_run)
        with registry.open_run(cfg, run_id):
            mlflow.log_metrics({k: v for k, v in m.items() if k != "per_class_f1"})
            registry.log_json(dict(zip(labels, m["per_class_f1"])), PER_CLASS_FILE)
    logger.info("gate reference: %s (validation accuracy %s)", reference, ", ".join(
        f"{k} {metrics[k]['val_accuracy']:.4f}" for k in QUANTISED_TEACHERS))
    for c in contenders:
        m = metrics[c]
        logger.info("%s / %s batch-1 latency, interleaved pairs: median %.3f, p90 %.3f; served path end to end p50 "
                    "%.2f ms (bare forward %.2f ms)", c, reference, m["latency_ratio_paired"],
                    m["latency_ratio_paired_p90"], m["served_latency_p50_ms"], m["latency_p50_ms"])
    table = results_table(metrics)
    frontier_text = frontier_table(metrics, tuple(contenders), reference)
    table += "\n\nFrontier (smallest first; * = no other candidate is as accurate, as fast and as small):\n" \
        + frontier_text
    if abstain:
        table += "\n\nOut of scope (each candidate at its own threshold):\n" + oos_table(metrics)
    ratios = headline_ratios(metrics, served, reference)
    y = np.asarray(gold)
    shown = tuple(dict.fromkeys(("teacher_fp32", reference, served, "baseline_fp32")))
    with registry.open_run(cfg, eval_run), tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # the plots show the form the gate judges and that is served
        plot_confusion(logits[served], y, labels, folder / "confusion_student.png",
                       f"Confusion of the served student ({served})")
        plot_reliability({k: (logits[k], y) for k in shown}, folder / "reliability.png", e.ece_bins)
        plot_frontier(metrics, folder / "frontier.png", served=served, reference=reference)
        plot_f1_difference(metrics["teacher_fp32"]["per_class_f1"], metrics[served]["per_class_f1"], labels,
                           folder / "per_class_f1_student_minus_teacher.png", student=served)
        if abstain and len(oos.get("oos_test", ())):
            plot_oos_tradeoff({k: curves[k] for k in shown}, metrics, folder / "oos_tradeoff.png")
        (folder / "results.txt").write_text(table + "\n")
        (folder / "frontier.txt").write_text(frontier_text + "\n")
        registry.log_folder(folder, "evaluation")
        mlflow.log_metrics(ratios)
        mlflow.set_tags({"gate.reference": reference, "evaluation.served": served,
                         "evaluation.contenders": ",".join(contenders)})
    if abstain:
        logger.info("out of scope (threshold on %s chosen on validation for %s=%s):\n%s", e.abstain_score,
                    e.abstain_target, e.abstain_value, oos_table(metrics))
    if e.calibrate:
        logger.info("temperature scaling (fitted on validation): %s", ", ".join(
            f"{k} T={m['temperature']:.2f} ECE {m['ece']:.3f} -> {m['ece_calibrated']:.3f}" for k, m in metrics.items()))
    return Evaluation(run_id=eval_run, table=table, ratios=ratios, reference=reference,
                      students=(PRIMARY, *frontier),
                      metrics={k: {kk: vv for kk, vv in v.items() if kk != "per_class_f1"} for k, v in metrics.items()})
