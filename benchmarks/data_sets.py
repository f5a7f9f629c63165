"""A default judged on every data set at once: the whole run, then the seeds benchmark, per data set, and the mean.

    .venv/bin/python benchmarks/data_sets.py [--config distillery.yaml] [--profile default]
        [--data ../shared/data/banking77 ../shared/data/hwu64] [--seeds 13 14 15] [--ablations no-transfer,...]
        [--set KEY=VALUE ...] [--workdir benchmarks/work] [--out benchmarks/results]

For each data source, a project folder of its own (``<workdir>/<profile>-<data set>``: its own embedded MLflow store,
DVC remote, work folder and snapshot) with the profile's configuration (``--config``, merged, paths made absolute), that source
as ``data.source`` and the ``--set`` values; there it runs ``distillery run --json`` (ingest, teacher, distil,
evaluate, gate: what ``make run`` does; a folder that already has its champion for this config does nothing) and,
when a student was promoted, ``benchmarks/seeds.py`` with the same settings (distilled and baseline over ``--seeds``
and the ablations asked for). Prints one table per data set and the mean over data sets; writes
``<out>/<profile>-<data set>.json`` (ratios: ``served_over_teacher_accuracy``, ``gate_passed``, and from the seeds
``kd_gap_recovered``, ``kd_minus_baseline_accuracy_mean`` / ``_std``), ``<out>/<profile>-<data set>-seeds.json`` and
``<out>/<profile>-datasets.json`` (the per-data-set rows and the means). A default changes only when it helps on both
data sets, or helps on one and costs nothing beyond the noise on the other (benchmarks/README.md).
"""

# (not "datasets.py": with benchmarks/ on sys.path, as the seeds tests put it, that name would shadow Hugging Face's
# datasets package)
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# settings that name a file or folder: made absolute so the project folder reads what the profile meant
PATH_KEYS = (("data", "source"), ("data", "transfer_set"), ("teacher", "source"), ("teacher", "base_model"),
             ("student", "base_model"))


def project_config(config: Path, source: Path) -> dict:
    """The profile's configuration as one mapping (its ``extends`` chain merged), with paths made absolute against
    the profile's root and ``data.source`` set to ``source``."""
    from distillery.config import _read_layered
    from distillery.models.modeling import PACKAGED_BASE_MODELS

    raw, root = _read_layered(Path(config).resolve(), [])
    for section, key in PATH_KEYS:
        value = (raw.get(section) or {}).get(key)
        if isinstance(value, str) and value not in PACKAGED_BASE_MODELS and not Path(value).is_absolute():
            raw[section][key] = str((root / value).resolve())
    raw.setdefault("data", {})["source"] = str(Path(source).resolve())
    raw.setdefault("tracking", {})["uri"] = None  # each data set its own embedded store: the same model names live there
    return raw


def run_project(folder: Path, sets: list[str], env: dict) -> dict:
    """``distillery run --json`` in the project folder: the run's record (decision, evaluation ratios) and its time."""
    start = time.perf_counter()
    args = [str(Path(sys.executable).parent / "distillery"), "run", "--json", *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True)
    (folder / "run.log").write_text(done.stderr)
    if done.returncode not in (0, 3):
        raise SystemExit(f"`distillery run` failed in {folder} (exit {done.returncode}); see {folder / 'run.log'}:\n"
                         + "\n".join(done.stderr.strip().splitlines()[-5:]))
    return {**json.loads(done.stdout), "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "distillery.yaml"))
    parser.add_argument("--profile", default="default", help="the name the results files start with")
    parser.add_argument("--data", nargs="+", default=[str(ROOT.parent / "shared" / "data" / n)
                                                      for n in ("banking77", "hwu64")])
    parser.add_argument("--seeds", type=int, nargs="+", default=[13, 14, 15])
    parser.add_argument("--ablations", default="")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "work"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("give at least two seeds")
    import yaml

    from distillery.cli import environment_defaults

    environment_defaults()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for source in args.data:
        dataset = Path(source).name
        name = f"{args.profile}-{dataset}"
        folder = Path(args.workdir).resolve() / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "distillery.yaml").write_text(yaml.safe_dump(project_config(Path(args.config), Path(source))))
        print(f"== {dataset}: distillery run in {folder}", flush=True)
        run = run_project(folder, args.set, env)
        passed = bool(run["decision"] and run["decision"]["passed"]) or run.get("up_to_date") is not None
        ratios = dict((run.get("evaluation") or {}).get("ratios") or {})
        row = {"gate_passed": passed, "run_seconds": run["seconds"], "up_to_date": run.get("up_to_date"),
               "served_over_teacher_accuracy": ratios.get("served_over_teacher_accuracy"),
               "decision": (run["decision"] or {}).get("reasons")}
        main_file = out / f"{name}.json"
        results = json.loads(main_file.read_text()) if main_file.is_file() else {"profile": name}
        kept = results.setdefault("ratios", {})
        if row["served_over_teacher_accuracy"] is None:  # champion up to date: what its run measured stands
            row["served_over_teacher_accuracy"] = kept.get("served_over_teacher_accuracy")
        kept.update({k: v for k, v in (("gate_passed", passed),
                                       ("served_over_teacher_accuracy", row["served_over_teacher_accuracy"]))
                     if v is not None})
        main_file.write_text(json.dumps(results, indent=1) + "\n")
        if not passed:
            print(f"{dataset}: nothing promoted, so no seeds (they retrain the champion's recipe); the gate said:\n  "
                  + "\n  ".join(row["decision"] or []), flush=True)
            rows[dataset] = row
            continue
        seeds = [sys.executable, str(ROOT / "benchmarks" / "seeds.py"), "--config", str(folder / "distillery.yaml"),
                 "--name", name, "--out", str(out), "--seeds", *map(str, args.seeds),
                 *(["--ablations", args.ablations] if args.ablations else []),
                 *[a for s in args.set for a in ("--set", s)]]
        done = subprocess.run(seeds, cwd=folder, env=env, text=True)
        if done.returncode != 0:
            raise SystemExit(f"benchmarks/seeds.py failed for {dataset} (exit {done.returncode})")
        measured = json.loads((out / f"{name}-seeds.json").read_text())
        row["arms"] = {arm: r["accuracy"] for arm, r in measured["arms"].items()}
        row["teacher_accuracy"] = measured["teacher"]["accuracy"]
        row["kd_minus_baseline_accuracy"] = measured["kd_minus_baseline_accuracy"]
        row["kd_gap_recovered"] = measured["kd_gap_recovered"]
        rows[dataset] = row
    print_tables(args.profile, rows)
    means = mean_over_datasets(rows)
    (out / f"{args.profile}-datasets.json").write_text(json.dumps({"profile": args.profile, "seeds": args.seeds,
                                                                    "overrides": args.set, "datasets": rows,
                                                                    "mean": means}, indent=1) + "\n")
    print(f"\nwritten {out / f'{args.profile}-datasets.json'}")
    return 0


def mean_over_datasets(rows: dict[str, dict]) -> dict:
    """Each arm's mean test accuracy averaged over the data sets that measured it, and the same for the distilled
    minus baseline difference (data sets weigh alike, whatever their size)."""
    measured = [r for r in rows.values() if "arms" in r]
    arms = sorted({arm for r in measured for arm in r["arms"]})
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return {"arms": {arm: mean([r["arms"][arm]["mean"] for r in measured if arm in r["arms"]]) for arm in arms},
            "kd_minus_baseline_accuracy": mean([r["kd_minus_baseline_accuracy"]["mean"] for r in measured]),
            "gate_passed_on": sum(r["gate_passed"] for r in rows.values()), "datasets": len(rows)}


def print_tables(profile: str, rows: dict[str, dict]) -> None:
    for dataset, row in rows.items():
        share = row["served_over_teacher_accuracy"]
        print(f"\n== {profile} on {dataset}: gate {'passed' if row['gate_passed'] else 'REJECTED'}; served student "
              + (f"at {share:.1%} of the FP32 teacher's test accuracy" if share is not None else "not measured")
              + f"; run {row['run_seconds'] / 60:.1f} min" + (" (champion up to date)" if row["up_to_date"] else ""))
        if "arms" not in row:
            continue
        for arm, acc in row["arms"].items():
            print(f"  {arm:<16}{acc['mean']:.4f} +- {acc['std']:.4f}")
        d = row["kd_minus_baseline_accuracy"]
        print(f"  distilled - baseline: {d['mean']:+.4f} +- {d['std']:.4f} "
              f"({'more' if d['mean'] > 2 * d['std'] else 'not more'} than twice the std); gap recovered "
              f"{row['kd_gap_recovered']['mean']:.3f} +- {row['kd_gap_recovered']['std']:.3f}")
    means = mean_over_datasets(rows)
    print(f"\n== mean over {means['datasets']} data sets (gate passed on {means['gate_passed_on']}):")
    for arm, value in means["arms"].items():
        print(f"  {arm:<16}{value:.4f}")
    if means["kd_minus_baseline_accuracy"] is not None:
        print(f"  distilled - baseline: {means['kd_minus_baseline_accuracy']:+.4f}")


if __name__ == "__main__":
    sys.exit(main())
