"""Every teacher kind against the white box: the same student and recipe distilled from each, over seeds.

    .venv/bin/python benchmarks/teachers.py [--config distillery.yaml] [--name default] [--seeds 13 14 15]
        [--arms whitebox,full,top5,top1,ensemble,budget-diverse,budget-random] [--second-teacher NAME@ALIAS]
        [--budget-share 0.25] [--port 5077] [--recipe FIELD=VALUE ...] [--set KEY=VALUE ...]

Needs the configuration's registered teacher (``teacher@alias``: ``make run`` or ``distillery teacher``). The
script serves it over HTTP with ``distillery serve`` (its registered FP32 form, MLflow's scoring protocol) and
labels through the pipeline's own label flow, once per arm (cached), then trains the same student per seed:
  - ``whitebox``: the registered teacher itself;
  - ``full``, ``top5``, ``top1``: that teacher as a ``teacher.kind: endpoint`` black box answering every label's
    probability, its top 5, or only its top label with that label's probability (``params: {top_k: k}``);
  - ``ensemble``: ``teacher.kind: ensemble`` of the teacher and ``--second-teacher`` (weights chosen on validation);
  - ``budget-diverse``, ``budget-random``: the full-probability endpoint with a budget (``max_cost``) of the
    texts every run needs (train, validation, test) plus ``--budget-share`` of the generated transfer set (as a cost
    at 1 per 1,000 texts),
    ``over_budget: select`` choosing that share diversely or at random. Each asks from an answer cache of its own
    (a work folder per arm), so neither finds the other's answers.
Then the ``full`` arm's labelling is run again with its outputs entry removed: ``cached_rerun_requests`` is what it
asked the endpoint (0: every answer from the answer cache; ``teacher.endpoint.recheck`` 0 here).

The recipe is the champion's (``student@champion``) when there is one, else ``distill.*``, with the fields given by
``--recipe`` and feature KD off (a black box has no hidden states): the same for every arm. Each student is measured
on the test split in FP32 and in its served form (``student.deploy``, as the gate sees it: ``served_accuracy``).
Results go to ``benchmarks/results/<name>-teachers.json`` as each (arm, seed) finishes, and a later invocation
skips the (arm, seed) pairs already there: the benchmark can be run an arm at a time. Ratios (mean over seeds):
``endpoint_full_over_whitebox_student_accuracy``, ``endpoint_top5_...``, ``endpoint_top1_...``,
``ensemble_over_single_teacher_student_accuracy``, ``cached_rerun_requests``,
``selected_over_random_student_accuracy_at_budget``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARMS = ("whitebox", "full", "top5", "top1", "ensemble", "budget-diverse", "budget-random")
RATIOS = {"endpoint_full_over_whitebox_student_accuracy": ("full", "whitebox"),
          "endpoint_top5_over_whitebox_student_accuracy": ("top5", "whitebox"),
          "endpoint_top1_over_whitebox_student_accuracy": ("top1", "whitebox"),
          "ensemble_over_single_teacher_student_accuracy": ("ensemble", "whitebox"),
          "selected_over_random_student_accuracy_at_budget": ("budget-diverse", "budget-random")}


def summary(values: list[float]) -> dict:
    import numpy as np

    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "values": [float(v) for v in array]}


def serve_teacher(config: str, model: str, port: int, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``distillery serve`` of a registered model (``env``: added to this process's environment), waited for (its
    /ping answers)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "distillery", "serve", "--config", config, "--model", model,
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(1)
    os.killpg(proc.pid, 15)
    raise SystemExit(f"distillery serve {model} did not come up:\n{log.read_text()[-3000:]}")


def arm_overrides(arm: str, url: str, labels: int, second: str | None, teacher_ref: str, work: Path,
                  budget: float | None) -> dict:
    """The config overrides that make ``arm``'s teacher (every one with feature KD off and pretrained students)."""
    endpoint = {"teacher.kind": "endpoint", "teacher.endpoint.url": url, "teacher.endpoint.texts_per_request": 64,
                "teacher.endpoint.concurrency": 2, "teacher.endpoint.recheck": 0, "teacher.endpoint.name": "served-teacher"}
    if arm == "whitebox":
        return {}
    if arm in ("full", "top5", "top1"):
        return {**endpoint, "teacher.endpoint.params": {"top_k": {"full": labels, "top5": 5, "top1": 1}[arm]}}
    if arm == "ensemble":
        return {"teacher.kind": "ensemble", "teacher.ensemble.members": [teacher_ref, second]}
    return {**endpoint, "teacher.endpoint.params": {"top_k": labels}, "runtime.workdir": str(work / arm),
            "labelling.cache_dir": str(work / arm / "teacher-outputs"), "teacher.endpoint.max_cost": budget,
            "teacher.endpoint.price_per_1k_texts": 1.0,
            "teacher.endpoint.over_budget": "select", "teacher.endpoint.selection": arm.removeprefix("budget-")}


def budget_cost(cfg, snapshot, share: float) -> tuple[float, dict]:  # noqa: ANN001 - Config, SnapshotRef
    """A budget, at a price of 1 per 1,000 texts, for every text a run needs plus ``share`` of the generated and
    transfer texts (a price per text counts texts exactly; a request budget would round up to whole requests); and
    the counts it came from."""
    from distillery.tasks.labelling import OPTIONAL_SPLITS, endpoint_texts, rows_to_label

    inputs, _ = rows_to_label(cfg, snapshot)
    texts = endpoint_texts(snapshot, inputs)
    optional = set(inputs.loc[inputs["split"].isin(OPTIONAL_SPLITS), "text"])
    required = len(texts) - len(optional)
    texts_budget = required + math.floor(share * len(optional))
    return texts_budget / 1000.0, {"texts": texts_budget, "required_texts": required,
                                   "transfer_texts": len(optional), "share": share}


def main() -> int:  # noqa: C901 - one benchmark's wiring, read top to bottom
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "distillery.yaml"))
    parser.add_argument("--name", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[13, 14, 15])
    parser.add_argument("--arms", default=",".join(a for a in ARMS if a != "ensemble"))
    parser.add_argument("--second-teacher", help="the ensemble's second member, NAME@ALIAS or NAME/VERSION")
    parser.add_argument("--budget-share", type=float, default=0.25)
    parser.add_argument("--port", type=int, default=5077)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--recipe", action="append", default=[], metavar="FIELD=VALUE",
                        help="a field of every arm's recipe instead of the champion's (as benchmarks/seeds.py), e.g. "
                             "a static student's: --recipe temperature=1 --recipe kd_weight=0.5 --recipe ce_weight=0.5")
    args = parser.parse_args()
    from benchmarks.seeds import recipe_fields

    recipe_overrides = recipe_fields(args.recipe, parser)
    arms = [a for a in args.arms.split(",") if a]
    if unknown := set(arms) - set(ARMS):
        parser.error(f"unknown arm(s) {sorted(unknown)}: of {', '.join(ARMS)}")
    if "ensemble" in arms and not args.second_teacher:
        parser.error("the ensemble arm needs --second-teacher (a second registered teacher)")
    from distillery.cli import environment_defaults

    environment_defaults()
    from prefect import flow

    from distillery.config import load_config, parse_override_args
    from distillery.flows.label import label_flow
    from distillery.integrations import registry
    from distillery.models.data import read_snapshot
    from distillery.models.evaluation import TimingSettings, encode_per_folder, evaluate_model, served_form
    from distillery.models.modeling import count_parameters, load_classifier
    from distillery.records import Candidate, Lineage
    from distillery.tasks.data import freeze
    from distillery.tasks.distill import train_student
    from distillery.tasks.teacher import resolve_teacher

    base = parse_override_args(args.set)
    probe = {**base, "tracking.experiment": f"{load_config(args.config, base).tracking.experiment}-benchmarks",
             "distill.feature_weight": 0.0}
    cfg = load_config(args.config, probe)
    registry.configure_tracking(cfg)
    reg = registry.Registry.from_config(cfg)
    champion = reg.alias_version(cfg.tracking.student_name, cfg.tracking.champion_alias)
    d = cfg.distill
    recipe = Candidate(kind="distilled", temperature=d.temperature, kd_weight=d.kd_weight, ce_weight=d.ce_weight)
    if champion is not None:
        made = Lineage.from_tags(champion.tags).candidate
        recipe = Candidate(**{k: v for k, v in made.items() if k in {f.name for f in dataclasses.fields(Candidate)}})
    recipe = dataclasses.replace(recipe, trial=None, shape=None, feature_weight=0.0, **recipe_overrides)
    snapshot = freeze(cfg)
    splits, labels = read_snapshot(Path(snapshot.path))
    texts, gold = splits["test"]["text"].tolist(), splits["test"]["label_id"].tolist()
    timing = TimingSettings(repeats=1, warmup=0, throughput_batches=1)
    teacher_ref = f"{cfg.teacher.registered_name}@{cfg.teacher.alias}"
    out_dir, work = Path(args.out), cfg.work.kind("benchmark-teachers")
    results_file = out_dir / f"{args.name}-teachers.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"profile": args.name, "runs": []}
    done = {(r["arm"], r["seed"]) for r in results["runs"]}

    def accuracy(folder: str) -> dict[str, float]:  # FP32, and the served form (student.deploy) as the gate sees it
        data, pad = encode_per_folder({folder}, texts, gold, cfg.distill.max_length)[folder]
        model = load_classifier(Path(folder)).eval()
        m, _ = evaluate_model(model, data, pad, len(labels), None, timing)
        shipped = served_form(model, cfg.student.deploy, Path(folder))
        served, _ = evaluate_model(shipped, data, pad, len(labels), None, timing, count_parameters(model),
                                   size_bytes=shipped.size_bytes() if hasattr(shipped, "size_bytes") else None)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "served_accuracy": served["accuracy"]}

    def save() -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1) + "\n")

    url = f"http://127.0.0.1:{args.port}"
    server = serve_teacher(args.config, f"models:/{teacher_ref}", args.port, work / "serve.log")
    try:
        budget, budget_from = budget_cost(load_config(args.config, {**probe, **arm_overrides(
            "full", url, len(labels), None, teacher_ref, work, None)}), snapshot, args.budget_share)
        results["budget"] = {"max_cost": budget, "price_per_1k_texts": 1.0, **budget_from}

        @flow(name="teachers-benchmark", log_prints=True)
        def run_arms() -> None:
            parent = registry.create_run(cfg, "teachers-benchmark", {"stage": "benchmark"})
            for arm in arms:
                overrides = {**probe, **arm_overrides(arm, url, len(labels), args.second_teacher, teacher_ref, work,
                                                      budget)}
                arm_cfg = load_config(args.config, overrides)
                teacher = resolve_teacher(arm_cfg, None, snapshot)
                start = time.perf_counter()
                outputs = label_flow(arm_cfg, snapshot, teacher)
                results.setdefault("labelling", {})[arm] = {"seconds": time.perf_counter() - start,
                                                            "cache_hit": outputs.cache_hit, "teacher": teacher.name,
                                                            "version": teacher.version}
                for seed in args.seeds:
                    if (arm, seed) in done:
                        continue
                    seeded = load_config(args.config, {**overrides, "distill.seed": seed})
                    start = time.perf_counter()
                    trained = train_student(seeded, teacher, snapshot, outputs, recipe, parent)
                    row = {"arm": arm, "seed": seed, **accuracy(trained.folder), "seconds": time.perf_counter() - start}
                    results["runs"].append(row)
                    save()
                    print(f"{arm} seed {seed}: test accuracy {row['accuracy']:.4f}, macro-F1 {row['macro_f1']:.4f}")
            if "full" in arms:  # the cached re-run: the outputs entry gone, every answer still in the answer cache
                full_cfg = load_config(args.config, {**probe, **arm_overrides("full", url, len(labels), None,
                                                                              teacher_ref, work, None)})
                teacher = resolve_teacher(full_cfg, None, snapshot)
                entry = label_flow(full_cfg, snapshot, teacher)
                shutil.rmtree(Path(entry.path).parent)
                rerun = label_flow(full_cfg, snapshot, teacher)
                logged = reg.run(rerun.run_id).data.metrics
                results["cached_rerun"] = {"requests": logged.get("endpoint.requests"),
                                           "asked_texts": logged.get("endpoint.asked_texts"),
                                           "cached_texts": logged.get("endpoint.cached_texts")}

        run_arms()
    finally:
        os.killpg(server.pid, 15)
        server.wait(60)
    results.update({"recipe": recipe.to_dict(), "seeds": args.seeds, "overrides": base,
                    "champion": f"{champion.name} v{champion.version}" if champion else None})
    by_arm: dict[str, list[dict]] = {}
    for r in results["runs"]:
        by_arm.setdefault(r["arm"], []).append(r)
    results["arms"] = {arm: {key: summary([r[key] for r in rs]) for key in ("accuracy", "macro_f1", "served_accuracy")
                             if all(key in r for r in rs)} for arm, rs in by_arm.items()}
    ratios = {name: results["arms"][a]["accuracy"]["mean"] / results["arms"][b]["accuracy"]["mean"]
              for name, (a, b) in RATIOS.items() if a in results["arms"] and b in results["arms"]}
    if "cached_rerun" in results:
        ratios["cached_rerun_requests"] = int(results["cached_rerun"]["requests"])
    results["ratios"] = ratios
    save()
    print(f"\n== {args.name}: teachers over seeds {args.seeds}; recipe {recipe.to_dict()}")
    print(f"{'arm':<16}{'accuracy':>20}{'macro-F1':>20}{'served accuracy':>24}")
    for arm, r in results["arms"].items():
        served = r.get("served_accuracy")
        print(f"{arm:<16}{r['accuracy']['mean']:>12.4f} +- {r['accuracy']['std']:.4f}"
              f"{r['macro_f1']['mean']:>12.4f} +- {r['macro_f1']['std']:.4f}"
              + (f"{served['mean']:>16.4f} +- {served['std']:.4f}" if served else ""))
    for name, value in ratios.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    print(f"\nwritten {results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
