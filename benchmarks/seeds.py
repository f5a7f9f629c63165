"""Proof beyond seed noise: distilled and baseline students over several seeds on one harness, with ablations.

    .venv/bin/python benchmarks/seeds.py [--config distillery.yaml] [--name default] [--seeds 13 14 15]
                                         [--ablations defaults,no-transfer,no-feature,without-mask,with-vocab,...]
                                         [--recipe temperature=2.5 --recipe learning_rate=3e-4 ... | --search]

Needs a promoted ``student@champion`` of that configuration (``make run``). For each seed it retrains, with the
registered teacher and its cached soft labels:
  - ``distilled``: the champion's own recipe (temperature, kd/ce weights, learning rate, epochs) with that seed,
    or that recipe with the fields given by ``--recipe`` (e.g. a search's best trial that the gate did not promote),
    or with ``--search`` the best trial of the configured ``distill.search``, run first at ``distill.seed`` (its
    trials and pick are recorded under ``search``; ``--ablations defaults`` then measures what the search bought);
  - ``baseline``: the same student trained on the hard labels alone (no teacher);
  - the ablations asked for: ``defaults`` (distill.* as configured: no search/sweep choice), ``no-transfer`` (without
    the transfer set and augmented rows; their labelling is cached apart), ``no-feature`` (feature KD off), and per
    augmentation method ``without-METHOD`` (the transfer set made by the configured methods but that one),
    ``with-METHOD`` (by them and that one) or ``only-METHOD`` (by that one alone), at the same multiple: the transfer
    set is remade and labelled for each.
Every student is measured in FP32 on the test split by the evaluation harness (quality only). Prints mean +- std of
test accuracy and macro-F1 per arm, and the share of the teacher-baseline gap distillation recovers,
(student - baseline) / (teacher - baseline), per seed, its mean and std; writes
``benchmarks/results/<name>-seeds.json`` and adds ``kd_gap_recovered``, ``kd_gap_recovered_std``, ``kd_seeds`` and
``kd_minus_baseline_accuracy_mean/_std`` to the ratios of ``benchmarks/results/<name>.json``, and the shape's entry
to its ``kd_gap_recovered_by_shape``. Another student shape than the profile's (``--set student.init=static``,
``--set student.pretrained_layers=[0,5]``, ...) writes ``<name>-<shape>-seeds.json`` and only its by-shape entry. Training runs go to
the MLflow experiment ``<experiment>-benchmarks`` and never touch the registry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ABLATIONS = ("defaults", "no-transfer", "no-feature")
METHOD_ABLATIONS = ("without-", "with-", "only-")  # + an augmentation method: leave it out, add it, use it alone
RECIPE_FIELDS = ("temperature", "kd_weight", "ce_weight", "feature_weight", "learning_rate", "epochs")


def gap_recovered(student: float, baseline: float, teacher: float) -> float:
    """(student - baseline) / (teacher - baseline): 1 when distillation closes the gap, 0 when it adds nothing."""
    return (student - baseline) / (teacher - baseline) if teacher != baseline else float("nan")


def summary(values: list[float]) -> dict[str, float]:
    import numpy as np

    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "values": [float(v) for v in array]}


def recipe_fields(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, float | int]:
    """``--recipe`` values as Candidate fields: numbers only, epochs an integer."""
    fields: dict[str, float | int] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in RECIPE_FIELDS:
            parser.error(f"--recipe {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(RECIPE_FIELDS)}")
        try:
            fields[key] = int(value) if key == "epochs" else float(value)
        except ValueError:
            parser.error(f"--recipe {pair!r}: {value!r} is not a number")
    return fields


def method_ablation(ablation: str, methods: Sequence[str], multiple: float) -> dict[str, list[str]] | str:
    """The config overrides of a per-method arm (``without-mask``, ``with-vocab``, ``only-vocab``), or what is
    wrong with it."""
    from distillery.models.augment import METHODS

    kind, _, method = ablation.partition("-")
    if method not in METHODS:
        return f"ablation {ablation!r}: {method!r} is not an augmentation method (one of {', '.join(METHODS)})"
    if multiple <= 0:
        return f"ablation {ablation!r} needs a transfer set: set data.augment.multiple > 0"
    if kind == "only":
        return {"data.augment.methods": [method]}
    if kind == "with":
        if method in methods:
            return f"ablation {ablation!r}: {method!r} is in data.augment.methods already ({methods})"
        return {"data.augment.methods": [*methods, method]}
    rest = [m for m in methods if m != method]
    if method not in methods or not rest:
        return (f"ablation {ablation!r}: data.augment.methods is {methods}; leaving {method!r} out needs it there "
                f"and another method beside it")
    return {"data.augment.methods": rest}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "distillery.yaml"))
    parser.add_argument("--name", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[13, 14, 15])
    parser.add_argument("--ablations", default="", help=f"comma-separated, of {','.join(ABLATIONS)}")
    parser.add_argument("--recipe", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"a field of the distilled arm's recipe instead of the champion's "
                             f"({', '.join(RECIPE_FIELDS)})")
    parser.add_argument("--search", action="store_true",
                        help="run the configured distill.search once, at distill.seed, before the seeds: its best "
                             "trial's recipe is the distilled arm (with --ablations defaults: the search ablation)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of the results files")
    args = parser.parse_args()
    ablations = [a for a in args.ablations.split(",") if a]
    unknown = {a for a in ablations if a not in ABLATIONS and not a.startswith(METHOD_ABLATIONS)}
    if unknown or len(args.seeds) < 2:
        parser.error(f"unknown ablation(s) {sorted(unknown)}: use {', '.join(ABLATIONS)}, without-METHOD, "
                     f"with-METHOD or only-METHOD" if unknown else "give at least two seeds")
    recipe_overrides = recipe_fields(args.recipe, parser)
    if args.search and recipe_overrides:
        parser.error("--search picks the distilled arm's recipe: leave out --recipe")
    from distillery.cli import environment_defaults

    environment_defaults()
    from prefect import flow

    from distillery.config import load_config, parse_override_args
    from distillery.flows.distill import search
    from distillery.flows.label import label_flow
    from distillery.integrations import registry
    from distillery.models.data import read_snapshot
    from distillery.models.evaluation import TimingSettings, encode_per_folder, evaluate_model
    from distillery.models.modeling import load_classifier
    from distillery.models.selection import pick_best
    from distillery.records import BASELINE, Candidate, Lineage
    from distillery.tasks.data import freeze
    from distillery.tasks.distill import train_student
    from distillery.tasks.labelling import augment_tags, rows_to_label
    from distillery.tasks.teacher import resolve_teacher

    base = parse_override_args(args.set)
    probe = {**base, "tracking.experiment": f"{load_config(args.config, base).tracking.experiment}-benchmarks"}
    cfg = load_config(args.config, probe)
    if args.search and cfg.distill.search.trials <= 0:
        parser.error("--search runs distill.search: give it trials (e.g. --set distill.search.trials=8)")
    registry.configure_tracking(cfg)
    reg = registry.Registry.from_config(cfg)
    champion = reg.champion(cfg)
    if champion is None:
        print(f"no {cfg.tracking.student_name}@{cfg.tracking.champion_alias}: run `make run` first", file=sys.stderr)
        return 2
    lineage = Lineage.from_tags(champion.tags)
    recipe = Candidate(**{k: v for k, v in lineage.candidate.items() if k in {f.name for f in
                                                                             dataclasses.fields(Candidate)}})
    recipe = dataclasses.replace(recipe, trial=None, shape=None, **recipe_overrides)
    teacher = resolve_teacher.fn(cfg, lineage.teacher.version)  # a lookup, outside any flow: no task run to log
    snapshot = freeze(cfg)
    splits, labels = read_snapshot(Path(snapshot.path))
    test = splits["test"]
    texts, gold = test["text"].tolist(), test["label_id"].tolist()
    timing = TimingSettings(repeats=1, warmup=0, throughput_batches=1)

    def accuracy(folder: str) -> dict[str, float]:
        data, pad = encode_per_folder({folder}, texts, gold, cfg.distill.max_length)[folder]
        m, _ = evaluate_model(load_classifier(Path(folder)).eval(), data, pad, len(labels), None, timing)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    teacher_metrics = accuracy(teacher.folder)
    d = cfg.distill

    def arms_for(recipe: Candidate) -> dict[str, tuple[dict, Candidate]]:
        """Each arm's config overrides and recipe; the ablations change the distilled arm's ``recipe``."""
        arms: dict[str, tuple[dict, Candidate]] = {"distilled": ({}, recipe), "baseline": ({}, BASELINE)}
        if "defaults" in ablations:
            arms["defaults"] = ({}, Candidate(kind="distilled", temperature=d.temperature, kd_weight=d.kd_weight,
                                              ce_weight=d.ce_weight, feature_weight=d.feature_weight))
        if "no-transfer" in ablations:
            arms["no-transfer"] = ({"data.augment.multiple": 0, "data.transfer_set": None}, recipe)
        if "no-feature" in ablations:
            arms["no-feature"] = ({}, dataclasses.replace(recipe, feature_weight=0.0))
        for ablation in ablations:
            if ablation.startswith(METHOD_ABLATIONS):
                overrides = method_ablation(ablation, cfg.data.augment.methods, cfg.data.augment.multiple)
                if isinstance(overrides, str):
                    parser.error(overrides)
                arms[ablation] = (overrides, recipe)
        return arms

    arms = arms_for(recipe)
    transfer = {}  # each arm's generated transfer set, as the lineage records it (none: {}); made before any
    for arm, (overrides, _) in arms.items():  # training, so a recipe that cannot be made stops the run at once
        arm_cfg = load_config(args.config, {**probe, **overrides})
        tags = augment_tags(arm_cfg, rows_to_label(arm_cfg, snapshot)[0])
        transfer[arm] = tags and {"methods": json.loads(tags["transfer.recipe"])["methods"],
                                  "rows": int(tags["transfer.rows"]), "content_hash": tags["transfer.content_hash"]}

    searched: dict = {}  # what --search found, for the record

    @flow(name="seeds-benchmark", log_prints=True)
    def train_all() -> dict[str, list[dict]]:
        nonlocal arms
        parent = registry.create_run(cfg, "seeds-benchmark", {"stage": "benchmark"})
        if args.search:  # the flow's own search, at distill.seed: the pick's run at that seed is its best trial's
            start = time.perf_counter()
            trials = search(cfg, snapshot, teacher, label_flow(cfg, snapshot, teacher), parent)
            best = pick_best(trials)
            arms = arms_for(best.candidate)
            searched.update({"seed": cfg.distill.seed, "trials": len(trials), "pruned": sum(t.pruned for t in trials),
                             "seconds": time.perf_counter() - start, "best": best.candidate.to_dict(),
                             "best_val_macro_f1": best.val_macro_f1,
                             "trial_results": [{**t.candidate.to_dict(), "val_macro_f1": t.val_macro_f1,
                                                "pruned": t.pruned, "epochs_trained": len(t.curve)} for t in trials]})
        out: dict[str, list[dict]] = {arm: [] for arm in arms}
        for seed in args.seeds:
            for arm, (overrides, candidate) in arms.items():
                arm_cfg = load_config(args.config, {**probe, **overrides, "distill.seed": seed})
                outputs = label_flow(arm_cfg, snapshot, teacher)  # cached: labelled once per set of rows
                start = time.perf_counter()
                trained = train_student(arm_cfg, teacher, snapshot, outputs, candidate, parent)
                row = {"seed": seed, **accuracy(trained.folder), "val_macro_f1": trained.val_macro_f1,
                       "seconds": time.perf_counter() - start}
                out[arm].append(row)
                print(f"seed {seed} {arm}: test accuracy {row['accuracy']:.4f}, macro-F1 {row['macro_f1']:.4f}")
        return out

    rows = train_all()
    recipe = arms["distilled"][1]
    t = teacher_metrics["accuracy"]
    gaps = [gap_recovered(s["accuracy"], b["accuracy"], t) for s, b in zip(rows["distilled"], rows["baseline"])]
    diffs = [s["accuracy"] - b["accuracy"] for s, b in zip(rows["distilled"], rows["baseline"])]
    results = {
        "profile": args.name, "champion": f"{champion.name} v{champion.version}", "recipe": recipe.to_dict(),
        "overrides": base,  # the --set values every arm trained with (e.g. data.augment.multiple)
        **({"search": searched} if searched else {}),
        "teacher": {"name": f"{teacher.name} v{teacher.version}", **teacher_metrics}, "seeds": args.seeds,
        "arms": {arm: {"accuracy": summary([r["accuracy"] for r in rs]),
                       "macro_f1": summary([r["macro_f1"] for r in rs]), "runs": rs,
                       "overrides": arms[arm][0], "transfer": transfer[arm]} for arm, rs in rows.items()},
        "kd_gap_recovered": summary(gaps), "kd_minus_baseline_accuracy": summary(diffs),
    }
    for arm in arms:
        if arm not in ("distilled", "baseline"):
            results["arms"][arm]["gap_recovered"] = summary(
                [gap_recovered(s["accuracy"], b["accuracy"], t) for s, b in zip(rows[arm], rows["baseline"])])
            # paired by seed: what the ablation costs (negative) or gains against the distilled arm
            results["arms"][arm]["minus_distilled_accuracy"] = summary(
                [a["accuracy"] - d["accuracy"] for a, d in zip(rows[arm], rows["distilled"])])
    print(f"\n== {args.name}: {len(args.seeds)} seeds {args.seeds}, teacher {teacher.name} v{teacher.version} test "
          f"accuracy {t:.4f}; recipe {recipe.to_dict()}")
    print(f"{'arm':<16}{'accuracy':>18}{'macro-F1':>18}{'gap recovered':>20}{'- distilled':>20}")
    for arm, r in results["arms"].items():
        gap = r.get("gap_recovered", results["kd_gap_recovered"] if arm == "distilled" else None)
        delta = r.get("minus_distilled_accuracy")
        print(f"{arm:<16}{r['accuracy']['mean']:>10.4f} +- {r['accuracy']['std']:.4f}"
              f"{r['macro_f1']['mean']:>10.4f} +- {r['macro_f1']['std']:.4f}"
              + (f"{gap['mean']:>12.3f} +- {gap['std']:.3f}" if gap else " " * 20)
              + (f"{delta['mean']:>+12.4f} +- {delta['std']:.4f}" if delta else ""))
    diff = results["kd_minus_baseline_accuracy"]
    print(f"distilled - baseline accuracy: {diff['mean']:+.4f} +- {diff['std']:.4f} "
          f"({'more' if diff['mean'] > 2 * diff['std'] else 'not more'} than twice the std)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # another student shape than the profile's (--set student.*): its own seeds file, its ratio filed by shape
    shape = cfg.student.label
    own_shape = not any(k.startswith("student.") for k in base)
    seeds_file = out_dir / (f"{args.name}-seeds.json" if own_shape else f"{args.name}-{shape}-seeds.json")
    seeds_file.write_text(json.dumps({**results, "shape": shape}, indent=1) + "\n")
    main_file = out_dir / f"{args.name}.json"
    main_results = json.loads(main_file.read_text()) if main_file.is_file() else {"profile": args.name}
    ratios = main_results.setdefault("ratios", {})
    if own_shape:
        ratios.update({
            "kd_gap_recovered": results["kd_gap_recovered"]["mean"],
            "kd_gap_recovered_std": results["kd_gap_recovered"]["std"], "kd_seeds": len(args.seeds),
            "kd_minus_baseline_accuracy_mean": diff["mean"], "kd_minus_baseline_accuracy_std": diff["std"]})
    ratios.setdefault("kd_gap_recovered_by_shape", {})[shape] = {
        **results["kd_gap_recovered"], "seeds": len(args.seeds), "distilled_accuracy": results["arms"]["distilled"][
            "accuracy"]["mean"], "baseline_accuracy": results["arms"]["baseline"]["accuracy"]["mean"]}
    main_file.write_text(json.dumps(main_results, indent=1) + "\n")
    print(f"\nwritten {seeds_file}; ratios added to {main_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
