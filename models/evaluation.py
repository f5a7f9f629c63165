"""One evaluation harness for every candidate: quality on the test split, latency, throughput and size."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel

from distillery.config import EvaluationConfig
from distillery.records import PRIMARY, served_candidate
from distillery.models.ensemble import Combination, combine
from distillery.models.calibration import abstention, calibrated, fit_temperature
from distillery.models.metrics import classification_metrics, expected_calibration_error
from distillery.models.modeling import count_parameters, load_classifier, load_tokenizer, quantize_int8, size_on_disk
from distillery.models.devices import placed_for_quality
from distillery.models.training import Encoded, collate, encode, predict_logits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimingSettings:
    threads: int = 1
    warmup: int = 5
    repeats: int = 50
    throughput_batches: int = 5
    throughput_batch_size: int = 32
    throughput_threads: int | None = None  # None: every core of the machine
    seed: int = 0


def _threads(model, threads: int) -> None:  # noqa: ANN001
    """Set the threads a candidate runs on: torch's for torch models, the session's for an ONNX one."""
    torch.set_num_threads(threads)
    if hasattr(model, "use_threads"):
        model.use_threads(threads)


def measure_speed(model: PreTrainedModel, data: Encoded, pad_id: int, settings: TimingSettings) -> dict[str, float]:
    """Latency p50/p95 (ms) at batch 1 on ``threads`` and throughput (rows/s) at batch 32 on ``throughput_threads``
    (all cores by default), with warm-up.

    The same seeded rows are timed for every candidate, so the numbers compare like for like.
    """
    rng = np.random.default_rng(settings.seed)
    single = rng.choice(len(data), size=settings.warmup + settings.repeats, replace=True)
    previous_threads = torch.get_num_threads()
    _threads(model, settings.threads)
    model.eval()
    try:
        with torch.inference_mode():
            samples = []
            for k, i in enumerate(single):
                batch = collate(data, [int(i)], pad_id)
                start = time.perf_counter()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                if k >= settings.warmup:
                    samples.append((time.perf_counter() - start) * 1000.0)
            _threads(model, settings.throughput_threads or os.cpu_count() or 1)
            size = min(settings.throughput_batch_size, len(data))
            batches = [rng.choice(len(data), size=size, replace=False) for _ in range(settings.throughput_batches + 1)]
            elapsed = 0.0
            for k, index in enumerate(batches):
                batch = collate(data, index.tolist(), pad_id)
                start = time.perf_counter()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                if k > 0:  # the first batch is warm-up
                    elapsed += time.perf_counter() - start
    finally:
        _threads(model, settings.threads)  # an ONNX candidate keeps its batch-1 session for what follows
        torch.set_num_threads(previous_threads)
    return {
        "latency_p50_ms": float(np.percentile(samples, 50)),
        "latency_p95_ms": float(np.percentile(samples, 95)),
        "throughput_rps": float(size * settings.throughput_batches / elapsed) if elapsed else float("nan"),
    }


def paired_latency_ratio(model, data: Encoded, pad_id: int, reference, reference_data: Encoded,  # noqa: ANN001
                         reference_pad_id: int, settings: TimingSettings) -> dict[str, float]:
    """Batch-1 latency of ``model`` relative to ``reference``, timed in alternation on the same rows.

    Each round times both models on one row, back to back (the order flips every round), and keeps the ratio of the
    two: a machine that slows down for a while slows both halves of a pair alike, so the median ratio holds where
    two separate p50s measured minutes apart would not. The models may read the row through different tokenizers
    (``data`` and ``reference_data`` hold the same rows).
    """
    rng = np.random.default_rng(settings.seed + 1)
    rows = rng.choice(len(data), size=settings.warmup + settings.repeats, replace=True)
    previous_threads = torch.get_num_threads()
    _threads(model, settings.threads)
    _threads(reference, settings.threads)
    ratios = []
    try:
        with torch.inference_mode():
            for k, i in enumerate(rows):
                timed = {}
                pair = [(model, data, pad_id, "m"), (reference, reference_data, reference_pad_id, "r")]
                for m, d, pad, key in pair if k % 2 == 0 else pair[::-1]:
                    batch = collate(d, [int(i)], pad)
                    start = time.perf_counter()
                    m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    timed[key] = time.perf_counter() - start
                if k >= settings.warmup:
                    ratios.append(timed["m"] / timed["r"])
    finally:
        torch.set_num_threads(previous_threads)
    return {"latency_ratio_paired": float(np.median(ratios)),
            "latency_ratio_paired_p90": float(np.percentile(ratios, 90))}


def evaluate_model(model: PreTrainedModel, data: Encoded, pad_id: int, num_classes: int,
                   reference_pred: np.ndarray | None, timing: TimingSettings, parameters: int | None = None,
                   ece_bins: int = 15, batch_size: int = 64, size_bytes: int | None = None,
                   logits: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """Quality + speed + size of one candidate on an encoded labelled split; returns (metrics, logits).

    ``model`` is anything answering ``model(input_ids=..., attention_mask=...).logits`` (a torch classifier or an
    ``OnnxClassifier``); give ``parameters`` and ``size_bytes`` for a model whose weights torch cannot see, and
    ``logits`` when its rows were already predicted (e.g. on a GPU: speed is always measured where it serves).
    """
    if logits is None:
        logits = predict_logits(model, data, pad_id, batch_size=batch_size)
    quality = classification_metrics(logits, data.labels.numpy(), num_classes, reference_pred, ece_bins)
    speed = measure_speed(model, data, pad_id, timing)
    metrics = {
        **{k: v for k, v in quality.items() if k != "per_class_f1"},
        **speed,
        "parameters": float(parameters if parameters is not None else count_parameters(model)),
        "size_mb": (size_bytes if size_bytes is not None else size_on_disk(model)) / 1e6,
        "per_class_f1": quality["per_class_f1"].tolist(),
    }
    if reference_pred is None:
        metrics["agreement"] = 1.0
    return metrics, logits


def served_form(model: PreTrainedModel, form: str, folder: Path) -> object:
    """``model`` in a deployment form: itself (fp32), torch dynamic INT8, or the ONNX Runtime INT8 file kept in its
    ``folder`` (made once; the file measured is the file registered)."""
    if form == "fp32":
        return model
    if form == "int8":
        return quantize_int8(model)
    from distillery.models.onnx_runtime import folder_onnx_int8

    Path(folder).mkdir(parents=True, exist_ok=True)
    return folder_onnx_int8(model, Path(folder))


FORMS = ("fp32", "int8", "onnx-int8")


def harness_candidates(teachers: dict[str, tuple[str, Path]], student_dir: str, baseline_dir: str,
                       frontier: dict[str, str] | None = None, form: str = "int8") -> dict[str, tuple]:
    """The candidates every evaluation compares, as ``name: (model, parameters or None, model folder)``: each teacher
    (``{name: (folder, folder for its ONNX file)}``: ``teacher``, an ensemble's members, none for a black box) and
    the chosen student in every form (FP32, torch INT8, ONNX Runtime INT8), the baseline, and each ``frontier``
    student (``{shape: folder}``) in the served ``form``. The student's ONNX file is kept in its folder (what gets
    registered).

    Quantised forms carry their FP32 parameter count (quantised weights hide from ``parameters()``); the folder says
    which tokenizer reads the texts for that candidate.
    """
    candidates: dict[str, tuple] = {}
    teacher_rows = [(name, str(folder), FORMS, onnx) for name, (folder, onnx) in teachers.items()]
    for name, folder, forms, weights in (*teacher_rows, (PRIMARY, str(student_dir), FORMS, Path(student_dir)),
                                         *((label, str(f), (form,), Path(f)) for label, f in (frontier or {}).items())):
        model = load_classifier(Path(folder)).eval()
        for f in forms:
            parameters = None if f == "fp32" else count_parameters(model)
            candidates[served_candidate(f, name)] = (served_form(model, f, weights), parameters, folder)
        if name == PRIMARY:
            candidates["baseline_fp32"] = (load_classifier(Path(baseline_dir)).eval(), None, str(baseline_dir))
    return candidates


def encode_per_folder(folders: set[str], texts: list[str], labels: list[int],
                      max_length: int) -> dict[str, tuple[Encoded, int]]:
    """The texts read through each model folder's own tokenizer, once per folder: ``{folder: (encoded, pad id)}``
    (a pretrained student may not share its teacher's tokenizer)."""
    out = {}
    for folder in folders:
        tokenizer = load_tokenizer(Path(folder))
        out[folder] = (encode(tokenizer, texts, max_length, labels), tokenizer.pad_token_id)
    return out


def timing_settings(e: EvaluationConfig) -> TimingSettings:
    """The harness's timing settings from the ``evaluation`` section."""
    return TimingSettings(threads=e.threads, warmup=e.warmup, repeats=e.repeats,
                          throughput_batches=e.throughput_batches)


HARNESS_SPLITS = ("test", "validation", "oos_validation", "oos_test")


def encode_harness_rows(folders: set[str], splits: dict[str, pd.DataFrame], oos: dict[str, pd.DataFrame] | None,
                        max_length: int) -> dict[str, dict[str, tuple[Encoded, int]]]:
    """``{split: {folder: (encoded, pad id)}}`` for test and validation, and the out-of-scope validation and test
    rows when ``oos`` is given (abstention is measured; a missing split encodes as no rows)."""
    frames = {"test": splits["test"], "validation": splits["validation"]}
    if oos is not None:
        frames |= {k: oos.get(k, splits["test"].iloc[:0]) for k in ("oos_validation", "oos_test")}
    return {name: encode_per_folder(folders, df["text"].tolist(), [max(i, 0) for i in df["label_id"]], max_length)
            for name, df in frames.items()}


@dataclass
class Measured:
    """What the harness measured: per candidate its metrics, its test logits and (with abstention) the out-of-scope
    trade-off curve."""

    metrics: dict[str, dict]
    logits: dict[str, np.ndarray]
    curves: dict[str, tuple]
    held_out: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # name -> split -> logits


def measure_candidates(candidates: dict[str, tuple], encoded: dict[str, dict], num_classes: int,
                       e: EvaluationConfig, timing: TimingSettings, reference_pred: np.ndarray | None = None,
                       device: torch.device | None = None) -> Measured:
    """Every candidate on the test split (quality, speed, size; agreement with the FP32 teacher, measured first,
    or with ``reference_pred``, a black-box teacher's test predictions), its validation accuracy (which chooses the
    gate's reference), a calibration temperature fitted on validation and measured on test, and, when ``encoded``
    holds out-of-scope rows, an abstention threshold chosen on validation and measured on test. The accuracy passes
    of float torch models run on ``device`` (``runtime.device``); every latency on the CPU, where they serve."""
    measured = Measured({}, {}, {})
    splits = ("test", "validation", *(("oos_validation", "oos_test") if "oos_test" in encoded else ()))
    for name, (model, params, folder) in candidates.items():
        with placed_for_quality(model, device) as placed:
            logits = {k: predict_logits(placed, *encoded[k][folder]) for k in splits}
        data, pad = encoded["test"][folder]
        val_data = encoded["validation"][folder][0]
        size = model.size_bytes() if hasattr(model, "size_bytes") else None  # an ONNX file's bytes
        m, out = evaluate_model(model, data, pad, num_classes, reference_pred, timing, params, e.ece_bins,
                                size_bytes=size, logits=logits["test"])
        if name == "teacher_fp32":
            reference_pred = out.argmax(1)
        curve = held_out_metrics(m, logits, data.labels.numpy(), val_data.labels.numpy(), e)
        if curve is not None:
            measured.curves[name] = curve
        measured.metrics[name], measured.logits[name], measured.held_out[name] = m, out, logits
        logger.info("%s: accuracy %.4f, macro-F1 %.4f, p50 %.2f ms, %.1f MB", name, m["accuracy"], m["macro_f1"],
                    m["latency_p50_ms"], m["size_mb"])
    return measured


def held_out_metrics(m: dict, logits: dict[str, np.ndarray], gold: np.ndarray, val_labels: np.ndarray,
                     e: EvaluationConfig) -> tuple | None:
    """Add to ``m`` what validation says about a candidate (``logits`` per split: test, validation and, when
    abstention is measured, oos_validation and oos_test): its validation accuracy, a temperature fitted there and
    the test ECE under it, and an abstention threshold chosen there with its test metrics. Returns the out-of-scope
    trade-off curve (None without out-of-scope rows)."""
    out, val_logits = logits["test"], logits["validation"]
    m["val_accuracy"] = float((val_logits.argmax(1) == val_labels).mean())
    if e.calibrate:
        m["calibration_temperature"] = fit_temperature(val_logits, val_labels)
        m["ece_calibrated"] = expected_calibration_error(calibrated(out, m["calibration_temperature"]), gold,
                                                         e.ece_bins)
    if "oos_test" not in logits:
        return None
    threshold, om, curve = abstention(val_logits, val_labels, logits["oos_validation"], out, gold, logits["oos_test"],
                                      m.get("calibration_temperature", 1.0), e.abstain_target, e.abstain_value,
                                      e.abstain_score)
    m.update({"abstain_threshold": threshold, **om.to_dict()})
    return curve


def measure_answers(logits: dict[str, np.ndarray], gold: np.ndarray, val_labels: np.ndarray, num_classes: int,
                    e: EvaluationConfig, request_ms: np.ndarray, request_texts: np.ndarray) -> tuple[dict, tuple | None]:
    """A black-box teacher measured from its answers (``logits`` per split, as ``held_out_metrics`` reads them):
    quality on test, what validation says, and its speed as served: latency per request (``request_ms`` of the
    requests that answered the test texts, each carrying ``request_texts``) and texts per second. It has no size or
    parameters here (NaN). Returns (metrics, the out-of-scope curve or None)."""
    quality = classification_metrics(logits["test"], gold, num_classes, None, e.ece_bins)
    m = {**{k: v for k, v in quality.items() if k != "per_class_f1"}, "agreement": 1.0,
         "latency_p50_ms": float(np.percentile(request_ms, 50)) if len(request_ms) else float("nan"),
         "latency_p95_ms": float(np.percentile(request_ms, 95)) if len(request_ms) else float("nan"),
         "throughput_rps": float(np.median(request_texts / request_ms) * 1000.0) if len(request_ms) else float("nan"),
         "parameters": float("nan"), "size_mb": float("nan"), "per_class_f1": quality["per_class_f1"].tolist()}
    curve = held_out_metrics(m, logits, gold, val_labels, e)
    return m, curve


def measure_ensemble(members: list[str], measured: Measured, combination: Combination, gold: np.ndarray,
                     val_labels: np.ndarray, num_classes: int, e: EvaluationConfig) -> tuple[dict, dict, tuple | None]:
    """An ensemble teacher measured from its ``members``' FP32 candidates in ``measured``, combined as it labelled
    (``combination``): quality on test and what validation says, and its cost as served: the members run one after
    another (latency the sum of theirs, throughput the harmonic sum) and it is the size of them all. Returns
    (metrics, its logits per split, the out-of-scope curve or None)."""
    logits = {split: combine([measured.held_out[m][split] for m in members], combination)
              for split in measured.held_out[members[0]]}
    quality = classification_metrics(logits["test"], gold, num_classes, None, e.ece_bins)
    each = [measured.metrics[m] for m in members]
    m = {**{k: v for k, v in quality.items() if k != "per_class_f1"}, "agreement": 1.0,
         "latency_p50_ms": sum(x["latency_p50_ms"] for x in each),
         "latency_p95_ms": sum(x["latency_p95_ms"] for x in each),
         "throughput_rps": 1.0 / sum(1.0 / x["throughput_rps"] for x in each),
         "parameters": sum(x["parameters"] for x in each), "size_mb": sum(x["size_mb"] for x in each),
         "per_class_f1": quality["per_class_f1"].tolist()}
    curve = held_out_metrics(m, logits, gold, val_labels, e)
    return m, logits, curve


def served_path_latency(predict: Callable[[list[str]], object], texts: list[str],
                        timing: TimingSettings) -> dict[str, float]:
    """Batch-1 latency of a served code path end to end (``predict``: the registered model's own loader tokenising,
    running its form and post-processing), one text at a time."""
    rows = np.random.default_rng(timing.seed).choice(len(texts), size=timing.warmup + timing.repeats, replace=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(timing.threads)
    samples = []
    try:
        for k, i in enumerate(rows):
            start = time.perf_counter()
            predict([texts[int(i)]])
            if k >= timing.warmup:
                samples.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous)
    return {"served_latency_p50_ms": float(np.percentile(samples, 50)),
            "served_latency_p95_ms": float(np.percentile(samples, 95))}


def time_served_forms(candidates: dict[str, tuple], metrics: dict[str, dict], encoded: dict[str, tuple],
                      students: dict[str, str], form: str, reference: str, texts: list[str],
                      served_predictor: Callable[[str], Callable[[list[str]], object]],
                      timing: TimingSettings) -> list[str]:
    """Each student (``{shape: folder}``) in its served ``form``, timed against the gate's ``reference`` in
    interleaved pairs (``paired_latency_ratio``) and through its served code path end to end
    (``served_predictor(folder)``); adds both to ``metrics`` and returns the served candidates' names."""
    contenders = [served_candidate(form, name) for name in students]
    for name, contender in zip(students, contenders):
        model, _, folder = candidates[contender]
        timed = served_path_latency(served_predictor(students[name]), texts, timing)
        if reference in candidates:  # a black-box reference is timed by its requests: nothing to pair with
            r_model, _, r_folder = candidates[reference]
            timed |= paired_latency_ratio(model, *encoded[folder], r_model, *encoded[r_folder], timing)
        metrics[contender].update(timed)
    return contenders
