"""Out-of-scope behaviour of teacher, distilled student and baseline, from the evaluation of a run with out-of-scope
data, against the issue's targets.

    # a project folder of its own (its own MLflow store and snapshot), BANKING77 with 10 intents held out:
    .venv/bin/distillery run --config oos/distillery.yaml        # data.holdout_intents: 10 in that file
    .venv/bin/python benchmarks/out_of_scope.py --config oos/distillery.yaml --name default

Reads the newest evaluation run that measured out-of-scope inputs (or ``--run RUN_ID``) through the same adapter the
gate uses, prints each candidate at its own threshold (chosen on validation) and the ratios, and writes
``benchmarks/results/oos-<name>.json``. The thresholds, temperatures and metrics are the ones the harness logged:
nothing is re-measured here, so the numbers are the ones the gate judged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROWS = ("teacher_fp32", "teacher_int8", "teacher_int8_onnx", "student_fp32", "student_int8", "student_int8_onnx",
        "baseline_fp32")
TARGETS = {  # the targets: (ratio, comparison, bound)
    "oos_auroc_student_minus_teacher": (">=", -0.02),
    "oos_recall_student": (">=", 0.60),
    "oos_inscope_accuracy_cost": ("<=", 0.01),
}


def newest_oos_evaluation(client, experiment_id: str) -> str | None:  # noqa: ANN001 - MlflowClient
    runs = client.search_runs([experiment_id], "tags.stage = 'evaluate'", order_by=["attributes.start_time DESC"],
                              max_results=200)
    for run in runs:
        if "candidate" not in run.data.tags and "oos.target" in run.data.params:
            return run.info.run_id
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "distillery.yaml"))
    parser.add_argument("--name", default="default")
    parser.add_argument("--run", default=None, help="an evaluation run id (default: the newest with OOS metrics)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    from distillery.cli import environment_defaults

    environment_defaults()
    from mlflow import MlflowClient

    from distillery.config import load_config, parse_override_args
    from distillery.integrations import registry
    from distillery.models.calibration import accuracy_cost
    from distillery.models.report import oos_table
    from distillery.records import served_candidate

    cfg = load_config(args.config, parse_override_args(args.set))
    registry.configure_tracking(cfg)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    run_id = args.run or (newest_oos_evaluation(client, experiment.experiment_id) if experiment else None)
    if run_id is None:
        print("no evaluation run with out-of-scope metrics: run the pipeline with data.oos_label or "
              "data.holdout_intents set first", file=sys.stderr)
        return 2
    params = client.get_run(run_id).data.params
    logged = registry.logged_candidate_metrics(registry.Registry.from_config(cfg), run_id)
    served = served_candidate(cfg.student.deploy)
    metrics = {k: {kk: v for kk, v in logged[k].items() if kk not in ("per_class_f1", "labels")}
               for k in ROWS if k in logged}
    t, s, b = metrics["teacher_fp32"], metrics[served], metrics["baseline_fp32"]

    ratios = {
        "oos_auroc_student_minus_teacher": s["oos.auroc"] - t["oos.auroc"],
        "oos_recall_student": s["oos.recall"],
        "oos_inscope_accuracy_cost": accuracy_cost(s),
        "oos_recall_teacher": t["oos.recall"],
        "oos_recall_baseline": b["oos.recall"],
        "oos_auroc_student_minus_baseline": s["oos.auroc"] - b["oos.auroc"],
        "oos_recall_student_minus_baseline": s["oos.recall"] - b["oos.recall"],
        "oos_recall_student_over_teacher": s["oos.recall"] / t["oos.recall"],
    }
    met = {k: (ratios[k] >= bound if op == ">=" else ratios[k] <= bound) for k, (op, bound) in TARGETS.items()}
    result = {
        "profile": args.name, "evaluation_run": run_id, "served": served,
        "setting": {k: params.get(k) for k in sorted(params) if k.startswith("oos.")},
        "candidates": {k: {kk: v for kk, v in m.items() if kk.startswith(("oos.", "abstain", "calibration_temperature",
                                                                             "accuracy", "ece"))}
                       for k, m in metrics.items()},
        "ratios": ratios,
        "targets": {k: {"rule": f"{op} {bound}", "met": met[k]} for k, (op, bound) in TARGETS.items()},
    }
    print(f"evaluation run {run_id}: {result['setting']}")
    print(oos_table(metrics))
    print()
    for k, v in ratios.items():
        rule = TARGETS.get(k)
        print(f"{k:<40}{v:>9.4f}" + (f"   target {rule[0]} {rule[1]}: {'met' if met[k] else 'MISSED'}" if rule else ""))
    out = ROOT / "benchmarks" / "results" / f"oos-{args.name}.json"
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
