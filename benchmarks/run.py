"""Measured quality, speed and pipeline overhead of the current champion, in one process.

    .venv/bin/python benchmarks/run.py [--config distillery.yaml] [--name default] [--repeats 200]

Needs a promoted ``student@champion`` (run ``make run`` first). Prints tables and writes
``benchmarks/results/<name>.json``. It measures:
  1. teacher and champion in every form (FP32, torch INT8, ONNX Runtime INT8, and static INT8 calibrated on
     training rows beside the served dynamic INT8), the baseline student and the run's other (frontier) students in
     the served form, on the test split (one harness: quality, batch-1 latency p50/p95
     on one thread, batch-32 throughput on all cores, size); the champion against the reference the gate used
     (interleaved pairs) and through its served code path; the frontier table and plot
     (``benchmarks/results/<name>-frontier.png``);
  2. the wall time of each stage of the run that made the champion (from its MLflow runs), and a cached re-run of
     the whole pipeline (same teacher, data and config: no relabelling, no retraining), timed here;
  3. teacher labelling in the pipeline (Prefect + MLflow + GX, forced cache miss) against a bare batched loop;
  4. the same short distillation with and without Prefect + MLflow (orchestration and tracking overhead).
Probe runs go to the MLflow experiment ``<experiment>-benchmarks`` and never touch the registry.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}


STATIC_INT8 = "student_static_int8_onnx"
CALIBRATION_ROWS = 256


def static_int8_candidate(model, parameters: int, student_dir: Path, train_texts, max_length: int,  # noqa: ANN001
                          work: Path) -> tuple:
    """The served student (``model``, already loaded by the harness) in static INT8 (MatMul/Gemm QDQ, calibrated on
    ``CALIBRATION_ROWS`` training rows read with its own tokenizer), as a harness candidate
    ``(model, FP32 parameters, folder)``."""
    from distillery.models.modeling import load_tokenizer
    from distillery.models.onnx_runtime import OnnxClassifier, calibration_batches, export_onnx_int8

    sample = train_texts.sample(min(CALIBRATION_ROWS, len(train_texts)), random_state=0).tolist()
    path = export_onnx_int8(model, work / "student-static-int8.onnx",
                            calibration_batches(load_tokenizer(Path(student_dir)), sample, max_length))
    return OnnxClassifier(path, model.config.num_labels), parameters, str(student_dir)


def run_duration(client, run_id: str) -> float:  # noqa: ANN001 - MlflowClient
    info = client.get_run(run_id).info
    return (info.end_time - info.start_time) / 1000.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "distillery.yaml"))
    parser.add_argument("--name", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for the CLI")
    parser.add_argument("--repeats", type=int, default=200, help="batch-1 latency samples per candidate")
    parser.add_argument("--models-only", action="store_true",
                        help="measure the models (1.) only: no pipeline re-run, labelling or overhead probes")
    parser.add_argument("--overhead-steps", type=int, default=120, help="optimiser steps in the overhead probe")
    args = parser.parse_args()
    from distillery.cli import environment_defaults

    environment_defaults()

    from mlflow import MlflowClient

    from distillery.config import load_config
    from distillery.models.data import read_snapshot
    from distillery.models.evaluation import (TimingSettings, encode_per_folder, evaluate_model, harness_candidates,
                                              paired_latency_ratio, served_path_latency)
    from distillery.models.labelling import teacher_logits
    from distillery.models.modeling import load_classifier, load_tokenizer
    from distillery.models.gate import judge_logged
    from distillery.models.report import (fast_end_ratios, frontier_table, headline_ratios, pareto, plot_frontier,
                                          results_table)
    from distillery.models.training import DistillationObjective, encode, train_model
    from distillery.integrations import registry
    from distillery.records import Candidate, Lineage, TeacherRef, served_candidate
    from distillery.tasks.evaluate import onnx_teacher_folder, served_predictor
    from distillery.tasks.data import freeze
    from distillery.tasks.labelling import rows_to_label
    from distillery.models.students import settings_from

    from distillery.config import parse_override_args

    base = parse_override_args(args.set)
    cfg = load_config(args.config, base)
    registry.configure_tracking(cfg)
    client = MlflowClient()
    reg = registry.Registry.from_config(cfg)
    champion = reg.champion(cfg)
    if champion is None:
        print("no student@champion: run `make run` first", file=sys.stderr)
        return 2
    lineage = Lineage.from_tags(champion.tags)
    teacher_mv = reg.resolve(cfg.teacher.registered_name, lineage.teacher.version)
    cache = cfg.work.registry
    teacher_dir = registry.download_classifier(teacher_mv, cache)
    student_dir = registry.download_classifier(champion, cache)
    distill_run = lineage.distill_run_id
    experiment_id = client.get_run(distill_run).info.experiment_id
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{distill_run}' and "
                                                   "tags.stage = 'train-student'")
    baseline_run = next(r for r in children if r.data.tags.get("candidate") == "baseline")
    baseline_dir = cfg.work.students / baseline_run.info.run_id
    results: dict = {"machine": machine(), "profile": args.name, "champion": f"{champion.name} v{champion.version}",
                     "teacher": f"{teacher_mv.name} v{teacher_mv.version}", "base_model": cfg.teacher.base_model}

    # 1. models on one harness: every form of teacher and champion, the baseline, the run's other students in the
    # served form; the ratios against the reference the gate used
    snapshot = freeze(cfg)
    splits, labels = read_snapshot(Path(snapshot.path))
    tokenizer = load_tokenizer(teacher_dir)
    texts_test, gold = splits["test"]["text"].tolist(), splits["test"]["label_id"].tolist()
    timing = TimingSettings(threads=cfg.evaluation.threads, warmup=20, repeats=args.repeats, throughput_batches=20)
    form = lineage.deploy_form
    eval_tags = client.get_run(lineage.evaluation_run_id).data.tags
    others = {}  # the evaluation's other students (the frontier, or the chosen one when a frontier student won)
    for key, run_id in eval_tags.items():
        if (key == "student.run_id" or key.startswith("frontier.")) and run_id != lineage.student_run_id:
            folder = cfg.work.students / run_id
            # a frontier entry by the evaluation's own name for it (the gate's fallback is "baseline")
            label = key.removeprefix("frontier.").removesuffix(".run_id") if key.startswith("frontier.") else \
                client.get_run(run_id).data.params.get("student.shape", "chosen")
            if folder.is_dir():
                others[label] = str(folder)
            else:
                print(f"  {label}: {folder} is gone (distillery gc?): not measured", flush=True)
    teacher_ref = TeacherRef.from_version(teacher_mv.name, str(teacher_mv.version), teacher_mv.run_id, teacher_mv.tags,
                                          str(teacher_dir))
    candidates = harness_candidates({"teacher": (str(teacher_dir), onnx_teacher_folder(cfg, teacher_ref))},
                                    student_dir, baseline_dir, others, form)
    scratch_static = tempfile.TemporaryDirectory()  # the static INT8 file, measured then removed at exit
    if form == "onnx-int8":  # the quantisation variant beside the served dynamic INT8: static INT8 of the same student
        _, parameters, _ = candidates[served_candidate(form)]  # the served form carries the FP32 parameter count
        candidates[STATIC_INT8] = static_int8_candidate(candidates[served_candidate("fp32")][0], parameters, student_dir,
                                                        splits["train"]["text"], cfg.distill.max_length,
                                                        Path(scratch_static.name))
    teacher = candidates["teacher_fp32"][0]
    encoded = encode_per_folder({c[2] for c in candidates.values()}, texts_test, gold, cfg.distill.max_length)
    metrics, per_class, reference_pred = {}, {}, None
    for name, (model, params, folder) in candidates.items():
        size = model.size_bytes() if hasattr(model, "size_bytes") else None
        data, pad = encoded[folder]
        m, logits = evaluate_model(model, data, pad, len(labels), reference_pred, timing, params, size_bytes=size)
        reference_pred = logits.argmax(1) if reference_pred is None else reference_pred
        metrics[name] = {k: v for k, v in m.items() if k != "per_class_f1"}
        per_class[name] = m["per_class_f1"]
        print(f"  measured {name}", flush=True)
    served, reference = served_candidate(form), lineage.reference
    contenders = [served, *(served_candidate(form, k) for k in others)]
    if STATIC_INT8 in candidates:
        contenders.append(STATIC_INT8)
    r_model, _, r_folder = candidates[reference]
    for name in contenders:  # each student against the reference in interleaved pairs: p50s taken minutes apart
        model, _, folder = candidates[name]  # drift with the machine, the paired ratios do not
        metrics[name].update(paired_latency_ratio(model, *encoded[folder], r_model, *encoded[r_folder], timing))
    metrics[served].update(served_path_latency(served_predictor(form, cfg.distill.max_length, timing.threads)(
        str(student_dir)), texts_test, timing))
    results["served"], results["reference"] = served, reference
    results["models"] = metrics
    logged = {n: {**m, "per_class_f1": per_class[n], "labels": labels} for n, m in metrics.items()}
    passing = [n for n in contenders  # the gate's criteria on test, without a champion to beat
               if judge_logged(cfg.gate, logged, n, None, None, reference=reference).passed]
    distilled = [n for n in passing if n != served_candidate(form, "baseline")]  # the fast end: distilled students
    results["ratios"] = {**headline_ratios(metrics, served, reference), **fast_end_ratios(metrics, distilled)}
    results["passing"] = passing
    results["frontier"] = sorted(pareto(metrics))
    frontier_text = frontier_table(metrics, tuple(contenders), reference)
    plot_frontier(metrics, ROOT / "benchmarks" / "results" / f"{args.name}-frontier.png", served, reference,
                  cfg.gate.accuracy_tolerance)
    results["timing"] = {"threads": timing.threads, "warmup": timing.warmup, "repeats": timing.repeats,
                         "throughput_batch": timing.throughput_batch_size, "throughput_batches": timing.throughput_batches,
                         "throughput_threads": os.cpu_count()}

    if args.models_only:
        return finish(results, results_table(metrics) + "\n\nfrontier (smallest first, * = Pareto):\n" + frontier_text,
                      args.name)

    # 2. pipeline stages of the run that made the champion, and a cached re-run
    labelling_run = client.get_run(distill_run).data.tags.get("teacher_outputs.run_id")
    source_labelling = client.get_run(labelling_run).data.tags.get("teacher_outputs.source_run", labelling_run)
    starts = [r.info.start_time for r in children]
    ends = [r.info.end_time for r in children]
    stages = {
        "teacher_fine_tune_s": run_duration(client, teacher_mv.run_id),
        "labelling_and_validation_s": run_duration(client, source_labelling),
        "student_training_s": (max(ends) - min(starts)) / 1000.0,
        "evaluation_s": run_duration(client, lineage.evaluation_run_id),
        "distill_run_total_s": run_duration(client, distill_run),
    }
    stages["full_run_s"] = stages["teacher_fine_tune_s"] + stages["labelling_and_validation_s"] + \
        stages["distill_run_total_s"]
    from distillery.flows.pipeline import pipeline_flow

    start = time.perf_counter()
    rerun = pipeline_flow(args.config, base or None)
    stages["cached_rerun_s"] = time.perf_counter() - start
    stages["cached_rerun_skipped"] = rerun.skipped
    stages["cached_over_full"] = stages["cached_rerun_s"] / stages["full_run_s"]
    results["pipeline"] = stages

    # 3. labelling: pipeline (forced cache miss) vs a bare batched loop over the same rows
    from distillery.flows.label import label_flow

    inputs, _ = rows_to_label(cfg, snapshot)
    texts = inputs["text"].tolist()
    start = time.perf_counter()
    teacher_logits(teacher, tokenizer, texts, cfg.teacher.max_length, cfg.labelling.batch_size, progress=False)
    bare = time.perf_counter() - start
    probe = {**base, "tracking.experiment": f"{cfg.tracking.experiment}-benchmarks"}
    scratch = tempfile.TemporaryDirectory()  # the probe's own label cache and workdir, removed at the end
    start = time.perf_counter()
    probe_label_cfg = load_config(args.config, {**probe, "labelling.cache_dir": f"{scratch.name}/cache"})
    out = label_flow(probe_label_cfg, snapshot, teacher_ref)
    flow_total = time.perf_counter() - start
    results["labelling"] = {"rows": len(texts), "bare_loop_s": bare, "pipeline_inference_s": out.seconds,
                            "pipeline_flow_total_s": flow_total, "bare_rows_per_s": len(texts) / bare,
                            "pipeline_rows_per_s": len(texts) / flow_total,
                            "pipeline_over_bare_time": flow_total / bare,
                            "pipeline_inference_over_bare_time": out.seconds / bare}

    # 4. orchestration + tracking overhead on the same short distillation
    from prefect import flow

    from distillery.models.students import make_student
    from distillery.tasks.distill import train_student

    overrides = {**probe, "distill.epochs": 1, "distill.max_steps": args.overhead_steps}
    probe_cfg = load_config(args.config, {**overrides, "runtime.workdir": f"{scratch.name}/work"})

    @flow(name="overhead-probe")
    def overhead_probe():  # noqa: ANN202
        parent = registry.create_run(probe_cfg, "overhead-probe", {"stage": "benchmark"})
        candidate = Candidate(kind="distilled", temperature=cfg.distill.temperature, kd_weight=cfg.distill.kd_weight,
                              ce_weight=cfg.distill.ce_weight)
        return train_student(probe_cfg, teacher_ref, snapshot, out, candidate, parent)

    start = time.perf_counter()
    overhead_probe()
    with_orchestration = time.perf_counter() - start

    # the same work without Prefect or MLflow: read, build, encode, train
    from distillery.models.labelling import read_outputs

    start = time.perf_counter()
    outputs = read_outputs(out.path)
    rows = outputs.where(outputs.frame["split"].isin(["train", "transfer"]))
    bare_student, student_tokenizer = make_student(probe_cfg, load_classifier(teacher_dir).eval(), teacher_dir,
                                                   labels)
    settings = settings_from(probe_cfg.distill)
    train = encode(student_tokenizer, rows.frame["text"].tolist(), settings.max_length,
                   rows.frame["label_id"].tolist(), rows.logits)
    val = encode(student_tokenizer, splits["validation"]["text"].tolist(), settings.max_length,
                 splits["validation"]["label_id"].tolist())
    train_model(bare_student, DistillationObjective(cfg.distill.temperature, cfg.distill.kd_weight,
                                                    cfg.distill.ce_weight), train, val, settings,
                student_tokenizer.pad_token_id, progress=False)
    without = time.perf_counter() - start
    scratch.cleanup()
    results["overhead"] = {"steps": args.overhead_steps, "with_prefect_mlflow_s": with_orchestration,
                           "bare_s": without, "ratio": with_orchestration / without}

    return finish(results, results_table(metrics) + "\n\nfrontier (smallest first, * = Pareto):\n" + frontier_text,
                  args.name)


def with_seed_ratios(out_file: Path, ratios: dict) -> dict:
    """``ratios`` plus the ones seeds.py added to the same results file (``kd_*``, measured over seeds, not by this
    script): a re-measure of the models must not erase them."""
    if not out_file.is_file():
        return ratios
    kept = {k: v for k, v in json.loads(out_file.read_text()).get("ratios", {}).items() if k.startswith("kd_")}
    return {**kept, **ratios}


def finish(results: dict, table: str, name: str) -> int:
    import mlflow

    print_report(results, table)
    out_file = ROOT / "benchmarks" / "results" / f"{name}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    results["ratios"] = with_seed_ratios(out_file, results["ratios"])
    out_file.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwritten {out_file.relative_to(ROOT)}")
    mlflow.end_run()
    return 0


def print_report(results: dict, table: str) -> None:
    m = results["machine"]
    print(f"\n== {results['profile']}: {results['champion']} distilled from {results['teacher']} "
          f"({results['base_model']}) on {m['cpu']}, {m['cores']} cores, torch {m['torch']}")
    t = results["timing"]
    print(f"timing: {t['threads']} thread(s), batch 1 x {t['repeats']} (after {t['warmup']} warm-up), "
          f"batch {t['throughput_batch']} x {t['throughput_batches']}\n")
    print(table)
    print("\nratios")
    for key, value in results["ratios"].items():
        print(f"  {key:<42}{value:>8.3f}")
    print(f"\nserved {results['served']}, reference {results['reference']}")
    if "pipeline" not in results:
        return
    print("\npipeline (seconds)")
    for key, value in results["pipeline"].items():
        print(f"  {key:<42}{value:>8.3f}" if isinstance(value, float) else f"  {key:<42}{value!s:>8}")
    print("\nteacher labelling")
    for key, value in results["labelling"].items():
        print(f"  {key:<42}{value:>8.3f}" if isinstance(value, float) else f"  {key:<42}{value:>8}")
    print("\norchestration + tracking overhead (same distillation steps)")
    for key, value in results["overhead"].items():
        print(f"  {key:<42}{value:>8.3f}" if isinstance(value, float) else f"  {key:<42}{value:>8}")


if __name__ == "__main__":
    sys.exit(main())
