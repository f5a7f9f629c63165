"""Training and labelling on a CUDA GPU, through the pipeline's own models layer: mixed precision against float32,
deterministic against not, and what repeats exactly; and the frontier's fast end, trained where it is quick.

    python benchmarks/gpu.py --snapshot DIR --outputs FILE --student DIR [--out benchmarks/results/gpu.json]
        [--budget-s 330] [--teacher-steps 60] [--device cuda] [--only NAME,...]
        [--groups first,nondeterministic,seeds | cuts-s13,cuts-s14,cuts-s15,static-second --parallel]
        [--cuts "0,2,4;0,5"] [--cut-recipe KEY=VALUE ...] [--second-snapshot DIR] [--static-hidden N]
        [--max-steps N --label-rows N: a smoke test]

It needs torch, transformers and pydantic only (no Prefect, MLflow or DVC), so it runs on a bare GPU machine with a
copy of what a CPU run made: ``--snapshot``, a run's verified data snapshot (``.distillery/snapshots/<md5>``);
``--outputs``, its teacher outputs (``.distillery/teacher-outputs/<key>/outputs.parquet``); ``--student``, the
default student's base model folder (MiniLM-L6; weights stored in fp16 are widened to float32 first). Without the
package installed there, map its layers the way pyproject.toml does first: ``for d in models tasks flows; do ln -sfn
$PWD/$d distillery/$d; done``, and ``pip install --target`` pydantic's wheels.

Parts, in order, until ``--budget-s`` has passed (results written after each):
  - ``students``: the default student (MiniLM-L6, the default recipe, ``distill.*`` as configured) distilled from
    those outputs by ``models.students.prepare_student`` / ``run_training`` (checkpoints included), once per variant
    of ``runtime.mixed_precision`` x ``runtime.deterministic`` x seed; per variant the training's wall time, steps/s,
    validation and test accuracy (float32 passes on the GPU) and a digest of the weights. A second bf16
    deterministic run of the same seed tells whether the weights repeat bit for bit. Deterministic and
    nondeterministic variants run in separate processes (torch's switch is process-wide): the first
    comparisons, then the nondeterministic ones, then more seeds.
  - ``teacher``: an MPNet-shaped classifier (the default teacher's architecture, 109.5M parameters; random
    weights: speed only) fine-tuned ``--teacher-steps`` steps by ``train_model`` in float32 and in bf16 (s/step), and
    the labelling pass (``predict_logits``, float32 as the pipeline labels) over every text of the outputs (rows/s).
  - ``cuts-s13``, ``cuts-s14``, ``cuts-s15`` (only with ``--groups``): the default frontier's cuts (``--cuts``,
    the default profile's 3- and 2-layer MiniLM cuts, pruned) distilled in float32 from the teacher's outputs and,
    as the teacher assistant (``{taught_by: student}``), from the 6-layer student of the same seed trained first and
    labelling every row as the pipeline's assistant does. Test accuracy per seed; with ``--parallel`` these groups
    train side by side on the one GPU (their wall times then share it: accuracy only). ``--cut-recipe``: distill
    settings for the cuts only (e.g. ``epochs=8``).
  - ``static-second`` (only with ``--groups``): a second data set for the static student's recipe:
    ``--second-snapshot`` (e.g. HWU64's, from ``distillery ingest``), a MiniLM teacher fine-tuned on it here with the
    fast profile's teacher settings, its outputs on every row, then the static student (``{init: static}``) per
    recipe of STATIC_RECIPES (the default profile's, the softer one, the hard-label baseline) and seeds 13-15.
Ratios: ``bf16_over_fp32_train_seconds``, ``nondeterministic_over_deterministic_train_seconds``,
``bf16_repeats_bit_identical``, ``teacher_bf16_over_fp32_step_seconds``; per cut ``<cut>_teacher_test_accuracy``,
``<cut>_assistant_test_accuracy`` (mean, std over seeds) and ``<cut>_assistant_minus_teacher`` (paired by seed);
per static recipe ``<recipe>_test_accuracy`` and ``<recipe>_minus_baseline`` (paired by seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# each group one process (torch's deterministic switch is process-wide), in the order they are worth measuring:
# ("teacher", None) or ("student", (name, mixed precision, deterministic, seed))
GROUPS = {
    "first": [("student", ("bf16-det-s13", True, True, 13)), ("student", ("fp32-det-s13", False, True, 13)),
              ("teacher", None), ("student", ("bf16-det-s13-again", True, True, 13))],
    "nondeterministic": [("student", ("bf16-nondet-s13", True, False, 13)),
                         ("student", ("fp32-nondet-s13", False, False, 13))],
    "seeds": [("student", (f"{p}-det-s{seed}", p == "bf16", True, seed)) for seed in (14, 15) for p in ("bf16", "fp32")],
    **{f"cuts-s{seed}": [("cuts", seed)] for seed in (13, 14, 15)},
    "static-second": [("statics", (13, 14, 15))],
}
DEFAULT_GROUPS = "first,nondeterministic,seeds"


def machine() -> dict:
    """benchmarks.run's description of the machine, with the GPU, CUDA and transformers beside it."""
    import torch
    import transformers

    from benchmarks.run import machine as described

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {**described(), "cuda": torch.version.cuda, "transformers": transformers.__version__, "gpu": gpu}


def weights_digest(model) -> str:  # noqa: ANN001 - a torch module
    """sha256 over every tensor of the state dict, in key order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def float32_folder(folder: Path) -> Path:
    """``folder`` with its weights in float32 (a copy beside it when they were stored narrower, to travel light)."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    if all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point()):
        return folder
    wide = Path(tempfile.mkdtemp(prefix="student-fp32-"))
    for item in folder.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            (wide / item.name).write_bytes(item.read_bytes())
    save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in weights.items()},
              str(wide / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((wide / "config.json").read_text())
    config.update({k: "float32" for k in ("torch_dtype", "dtype") if k in config})
    (wide / "config.json").write_text(json.dumps(config))
    return wide


def train_student(args: argparse.Namespace, name: str, mixed: bool, deterministic: bool, seed: int,
                  shape: dict | None = None, outputs=None, *, snapshot: Path | None = None,  # noqa: ANN001 - Outputs
                  recipe: dict | None = None, kind: str = "distilled") -> tuple[dict, object]:
    """One distillation of the default student (or of ``shape``, student keys; ``recipe``, distill keys; the
    hard-label baseline with ``kind``) on the teacher's outputs (or on ``outputs``, rows of ``snapshot``), as the
    pipeline trains it: its results row and the training job (its model trained)."""
    import numpy as np
    import torch

    from distillery.config import load_config
    from distillery.models.data import read_snapshot
    from distillery.models.labelling import read_outputs
    from distillery.models.metrics import classification_metrics
    from distillery.models.students import prepare_student, run_training
    from distillery.models.training import encode, predict_logits
    from distillery.records import Candidate, TeacherRef

    overrides = {"runtime.device": args.device, "runtime.mixed_precision": mixed,
                 "runtime.deterministic": deterministic, "distill.seed": seed,
                 "student.base_model": str(args.student_folder),
                 **({f"student.{k}": v for k, v in shape.items()} | {"student.frontier": []} if shape else {}),
                 **{f"distill.{k}": v for k, v in (recipe or {}).items()}}
    if args.max_steps:
        overrides["distill.max_steps"] = args.max_steps
    cfg = load_config(ROOT / "distillery.yaml", overrides)
    d = cfg.distill
    candidate = Candidate(kind, d.temperature, d.kd_weight, d.ce_weight, d.feature_weight)
    splits, labels = read_snapshot(snapshot or Path(args.snapshot))
    job = prepare_student(cfg, candidate, TeacherRef("teacher", "1", ""), "gpu-benchmark", labels,
                          outputs or read_outputs(args.outputs), splits["validation"], lambda *_: None)
    with tempfile.TemporaryDirectory() as checkpoints:
        trained, _ = run_training(job, candidate, "gpu-benchmark", Path(checkpoints), lambda *_: None)
    test = encode(job.tokenizer, splits["test"]["text"].tolist(), d.max_length, splits["test"]["label_id"].tolist())
    model = job.student.to(job.compute.device)
    logits = predict_logits(model, test, job.tokenizer.pad_token_id, batch_size=128)
    model.to("cpu")
    m = classification_metrics(logits, test.labels.numpy(), len(labels))
    epochs = len(trained.curve)
    steps = min(-(-len(job.train) // job.settings.batch_size) * epochs, args.max_steps or 10**9)
    return {"name": name, "device": trained.device, "seed": seed, "train_rows": len(job.train),
            "epochs": epochs, "steps": steps, "train_seconds": round(trained.train_seconds, 2),
            "steps_per_s": round(steps / trained.train_seconds, 2), "val_accuracy": round(trained.val_accuracy, 4),
            "test_accuracy": round(m["accuracy"], 4), "test_macro_f1": round(m["macro_f1"], 4),
            "weights": weights_digest(job.student), "finite": bool(np.isfinite(logits).all()),
            "cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0
            }, job


def assistant_outputs(job, outputs):  # noqa: ANN001, ANN201 - a StudentTraining, Outputs
    """``outputs`` relabelled by the trained student of ``job`` (float32, every row), as the pipeline's teacher
    assistant labels them for a ``{taught_by: student}`` shape."""
    from distillery.models.labelling import Outputs, teacher_logits

    model = job.student.to(job.compute.device).eval()
    logits = teacher_logits(model, job.tokenizer, outputs.frame["text"].tolist(), job.settings.max_length, 128,
                            progress=False)
    model.to("cpu")
    return Outputs(outputs.frame, logits.astype("float32"))


def cut_shapes(spec: str) -> dict[str, dict]:
    """``--cuts`` (``0,2,4;0,5``) as frontier shapes: pruned cuts of the pretrained student, named by their layers."""
    return {f"cut{len(layers.split(','))}": {"pretrained_layers": [int(x) for x in layers.split(",")],
                                              "prune_vocab": True} for layers in spec.split(";")}


def cuts(args: argparse.Namespace, seed: int, record) -> None:  # noqa: ANN001 - a callable taking a row
    """The 6-layer student of ``seed``, then each cut taught by the teacher and by that student (the assistant)."""
    from distillery.models.labelling import read_outputs

    teacher = read_outputs(args.outputs)
    row, job = train_student(args, f"full-s{seed}", False, True, seed)
    record(row)
    taught = assistant_outputs(job, teacher)
    del job
    for name, shape in cut_shapes(args.cuts).items():
        for by, outputs in (("teacher", teacher), ("assistant", taught)):
            if time.time() - float(args.started) > args.budget_s:
                print(f"budget spent: {name}-{by}-s{seed} not measured", flush=True)
                return
            row, _ = train_student(args, f"{name}-{by}-s{seed}", False, True, seed, shape, outputs,
                                   recipe=args.cut_recipe)
            record({**row, "shape": name, "taught_by": by, "recipe": args.cut_recipe})


def teacher_speed(args: argparse.Namespace) -> dict:
    """Fine-tune steps of an MPNet-shaped classifier in float32 and bf16, and the labelling pass over the outputs."""
    import torch
    from transformers import MPNetConfig, MPNetForSequenceClassification

    from distillery.config import load_config
    from distillery.models.devices import compute_for
    from distillery.models.labelling import read_outputs, teacher_logits
    from distillery.models.modeling import load_tokenizer
    from distillery.models.randomness import seeded
    from distillery.models.students import settings_from
    from distillery.models.training import CrossEntropyObjective, encode, train_model

    cfg = load_config(ROOT / "distillery.yaml")
    outputs = read_outputs(args.outputs)
    rows, classes = outputs.frame, outputs.logits.shape[1]
    tokenizer = load_tokenizer(args.student_folder)  # BERT word pieces: ids inside MPNet's 30,527
    train = rows[rows["split"] == "train"]
    val = rows[rows["split"] == "validation"].head(256)
    settings = settings_from(cfg.teacher)
    data = encode(tokenizer, train["text"].tolist(), settings.max_length, train["label_id"].tolist())
    held = encode(tokenizer, val["text"].tolist(), settings.max_length, val["label_id"].tolist())
    out: dict = {}
    for mixed in (False, True):
        compute = compute_for(args.device, mixed, True)
        with seeded(0):
            model = MPNetForSequenceClassification(MPNetConfig(num_labels=classes))
        out["teacher_parameters"] = sum(p.numel() for p in model.parameters())
        steps = args.teacher_steps
        start = time.perf_counter()
        train_model(model, CrossEntropyObjective(), data, held,
                    dataclasses.replace(settings, max_steps=steps, epochs=1), tokenizer.pad_token_id, progress=False,
                    compute=compute)
        seconds = time.perf_counter() - start
        out[f"teacher_{'bf16' if mixed else 'fp32'}_step_seconds"] = round(seconds / steps, 4)
        if not mixed:  # the pipeline labels in float32
            model.to(compute.device)
            texts = rows["text"].tolist()[: args.label_rows]
            teacher_logits(model, tokenizer, texts[:512], settings.max_length, cfg.labelling.batch_size, False)
            torch.cuda.synchronize() if compute.device.type == "cuda" else None
            start = time.perf_counter()
            teacher_logits(model, tokenizer, texts, settings.max_length, cfg.labelling.batch_size, False)
            out["label_rows"] = len(texts)
            out["label_rows_per_s"] = round(len(texts) / (time.perf_counter() - start), 1)
            model.to("cpu")
    return out


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def ratios(results: dict) -> dict:
    by = {r["name"]: r for r in results.get("students", [])}
    out: dict = {}
    if "bf16-det-s13" in by and "fp32-det-s13" in by:
        out["bf16_over_fp32_train_seconds"] = round(by["bf16-det-s13"]["train_seconds"]
                                                    / by["fp32-det-s13"]["train_seconds"], 3)
    for p in ("bf16", "fp32"):
        if f"{p}-nondet-s13" in by and f"{p}-det-s13" in by:
            out[f"{p}_nondeterministic_over_deterministic_train_seconds"] = round(
                by[f"{p}-nondet-s13"]["train_seconds"] / by[f"{p}-det-s13"]["train_seconds"], 3)
    if "bf16-det-s13-again" in by and "bf16-det-s13" in by:
        out["bf16_repeats_bit_identical"] = by["bf16-det-s13-again"]["weights"] == by["bf16-det-s13"]["weights"]
    for p in ("bf16", "fp32"):
        accs = [r["test_accuracy"] for n, r in by.items() if n.startswith(f"{p}-det-s") and not n.endswith("again")]
        if accs:
            out[f"{p}_test_accuracy_by_seed"] = accs
    out |= cut_ratios(by) | static_ratios(by)
    t = results.get("teacher", {})
    if "teacher_bf16_step_seconds" in t:
        out["teacher_bf16_over_fp32_step_seconds"] = round(t["teacher_bf16_step_seconds"]
                                                           / t["teacher_fp32_step_seconds"], 3)
    return out


# the static student's recipes on a second data set: the default profile's (the champion's, T 4, kd 0.8, ce 0.2) and
# the softer one that helped it on BANKING77 (T 1, kd 0.5, ce 0.5); None: the hard-label baseline
STATIC_RECIPES = {"static-default": {}, "static-soft": {"temperature": 1.0, "kd_weight": 0.5, "ce_weight": 0.5},
                  "static-baseline": None}


def second_teacher(args: argparse.Namespace, snapshot: Path):  # noqa: ANN201 - Outputs
    """A teacher for ``snapshot`` made here (MiniLM fine-tuned with the fast profile's teacher settings by the
    pipeline's ``prepare_teacher`` / ``run_teacher_training``) and its outputs over every row of the snapshot."""
    import numpy as np

    from distillery.config import load_config
    from distillery.models.data import read_snapshot
    from distillery.models.labelling import build_outputs, teacher_logits
    from distillery.models.metrics import classification_metrics
    from distillery.models.students import prepare_teacher, run_teacher_training

    overrides = {"runtime.device": args.device, "teacher.base_model": str(args.student_folder)}
    if args.max_steps:
        overrides["teacher.max_steps"] = args.max_steps
    cfg = load_config(ROOT / "configs" / "fast.yaml", overrides)
    splits, labels = read_snapshot(snapshot)
    job = prepare_teacher(cfg, splits, labels, snapshot.name)
    with tempfile.TemporaryDirectory() as checkpoints:
        start = time.perf_counter()
        summary, _ = run_teacher_training(job, Path(checkpoints), lambda *_: None, len(labels))
    rows = splits  # every split, in order: train (what the students learn from), validation, test
    model = job.model.to(job.compute.device).eval()
    logits = [teacher_logits(model, job.tokenizer, f["text"].tolist(), job.settings.max_length, 128, False)
              for f in rows.values()]
    model.to("cpu")
    outputs = build_outputs(
        [i for f in rows.values() for i in f["id"]], [t for f in rows.values() for t in f["text"]],
        [name for name, f in rows.items() for _ in range(len(f))],
        [int(x) for f in rows.values() for x in f["label_id"]], np.concatenate(logits), labels)
    test = (outputs.frame["split"] == "test").to_numpy()
    m = classification_metrics(outputs.logits[test], outputs.frame["label_id"].to_numpy()[test], len(labels))
    return outputs, {"name": f"teacher-{snapshot.name}", "val_accuracy": round(summary["val_accuracy"], 4),
                     "test_accuracy": round(m["accuracy"], 4), "train_seconds": round(time.perf_counter() - start, 2)}


def statics(args: argparse.Namespace, seeds: tuple[int, ...], record) -> None:  # noqa: ANN001 - takes a row
    """The static student per recipe and seed (and its baseline) on a second data set's teacher made here."""
    snapshot = Path(args.second_snapshot)
    outputs, row = second_teacher(args, snapshot)
    record(row)
    for seed in seeds:
        for name, recipe in STATIC_RECIPES.items():
            if time.time() - float(args.started) > args.budget_s:
                print(f"budget spent: {name}-s{seed} not measured", flush=True)
                return
            shape = {"init": "static", **({"hidden_size": args.static_hidden} if args.static_hidden else {})}
            row, _ = train_student(args, f"{name}-s{seed}", False, True, seed, shape, outputs,
                                   snapshot=snapshot, recipe=recipe or {},
                                   kind="baseline" if recipe is None else "distilled")
            record({**row, "shape": "static", "recipe": name, "data": snapshot.name})


def spread(values: list[float]) -> list[float]:
    """[mean, sample std] of ``values``, rounded (std 0 for one value)."""
    import statistics

    return [round(statistics.mean(values), 4), round(statistics.stdev(values), 4) if len(values) > 1 else 0.0]


def static_ratios(by: dict) -> dict:
    """Per recipe: the static student's test accuracy on the second data set (mean, std over seeds), and each
    distilled recipe minus the baseline, paired by seed."""
    out: dict = {}
    rows = {(r["recipe"], r["seed"]): r["test_accuracy"] for r in by.values() if r.get("shape") == "static"}
    for recipe in STATIC_RECIPES:
        accs = [a for (name, _), a in rows.items() if name == recipe]
        if accs:
            out[f"{recipe}_test_accuracy"] = spread(accs)
        paired = [a - rows[("static-baseline", s)] for (name, s), a in rows.items()
                  if name == recipe and recipe != "static-baseline" and ("static-baseline", s) in rows]
        if paired:
            out[f"{recipe}_minus_baseline"] = spread(paired)
    return out


def cut_ratios(by: dict) -> dict:
    """Per cut: test accuracy taught by the teacher and by the assistant (mean, std over seeds), the assistant's
    gain paired by seed, and the 6-layer students' accuracy beside them."""
    out: dict = {}
    full = [r["test_accuracy"] for n, r in by.items() if n.startswith("full-s")]
    if full:
        out["full_test_accuracy"] = spread(full)
    for cut in sorted({r["shape"] for r in by.values() if "taught_by" in r}):
        rows = {(r["taught_by"], r["seed"]): r["test_accuracy"] for r in by.values() if r.get("shape") == cut}
        for who in ("teacher", "assistant"):
            accs = [a for (w, _), a in rows.items() if w == who]
            if accs:
                out[f"{cut}_{who}_test_accuracy"] = spread(accs)
        paired = [rows[("assistant", s)] - rows[("teacher", s)] for (w, s) in rows if w == "teacher"
                  and ("assistant", s) in rows]
        if paired:
            out[f"{cut}_assistant_minus_teacher"] = spread(paired)
    return out


def child(args: argparse.Namespace) -> int:
    """One process's share: the variants of one deterministic setting (and the teacher part), in order, while the
    budget lasts; each result written to its part file (``--out`` + ``.<group>``) as it comes."""
    started = float(args.started)
    args.student_folder = float32_folder(Path(args.student))
    only = set(args.only.split(",")) if args.only else None
    part = Path(f"{args.out}.{args.child}")  # this process's rows, merged into --out by the parent

    def record(row: dict) -> None:
        print("student", row, flush=True)
        rows = json.loads(part.read_text()) if part.exists() else []
        part.write_text(json.dumps([*rows, row]))

    for kind, variant in GROUPS[args.child]:
        if kind in ("cuts", "statics"):
            (cuts if kind == "cuts" else statics)(args, variant, record)
            continue
        if only is not None and (variant[0] if variant else kind) not in only:
            continue
        if time.time() - started > args.budget_s:
            print(f"budget spent: {kind} {variant and variant[0]} not measured", flush=True)
            continue
        if kind == "teacher":
            Path(f"{args.out}.teacher").write_text(json.dumps(teacher_speed(args)))
            print("teacher", Path(f"{args.out}.teacher").read_text(), flush=True)
        else:
            record(train_student(args, *variant)[0])
    return 0


def merge(out: Path) -> dict:
    """The parts the children wrote (rows per group, the teacher's speeds) merged into ``out``, with the ratios."""
    results = json.loads(out.read_text())
    parts = sorted(out.parent.glob(f"{out.name}.*"))
    for part in parts:
        if part.name.endswith(".teacher"):
            results["teacher"] = json.loads(part.read_text())
        else:
            known = {r["name"] for r in results.setdefault("students", [])}
            results["students"] += [r for r in json.loads(part.read_text()) if r["name"] not in known]
    results["ratios"] = ratios(results)
    save(out, results)
    for part in parts:  # only once their rows are saved in ``out``
        part.unlink()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--snapshot", required=True)
    parser.add_argument("--outputs", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=330.0)
    parser.add_argument("--teacher-steps", type=int, default=60)
    parser.add_argument("--max-steps", type=int, default=None, help="stop each student there (a smoke test)")
    parser.add_argument("--label-rows", type=int, default=None, help="label only these many texts (a smoke test)")
    parser.add_argument("--only", help="comma-separated variant names (and/or 'teacher') to measure, the rest skipped")
    parser.add_argument("--groups", default=DEFAULT_GROUPS, help=f"comma-separated, of {', '.join(GROUPS)}")
    parser.add_argument("--parallel", action="store_true", help="run the groups side by side (accuracy only)")
    parser.add_argument("--cuts", default="0,2,4;0,5", help="the cuts' layers, ';' between cuts")
    parser.add_argument("--cut-recipe", action="append", default=[], metavar="KEY=VALUE",
                        help="cuts: a distill.* setting for the cuts only (YAML value; repeatable), e.g. epochs=8")
    parser.add_argument("--second-snapshot", help="static-second: another data set's snapshot (e.g. HWU64's)")
    parser.add_argument("--static-hidden", type=int, help="static-second: the table's width (default: the config's)")
    parser.add_argument("--child", choices=list(GROUPS), help=argparse.SUPPRESS)
    parser.add_argument("--started", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cut_recipe = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.cut_recipe)}
    if args.child:
        return child(args)
    out = Path(args.out)
    save(out, {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parallel": args.parallel})
    started = str(time.time())
    groups = args.groups.split(",")
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"--groups: unknown {sorted(unknown)}; known: {', '.join(GROUPS)}")
    children = []
    for part in groups:
        command = [sys.executable, __file__, *sys.argv[1:], "--child", part, "--started", started]
        children.append((part, subprocess.Popen(command)))
        if not args.parallel:
            children[-1][1].wait()
            merge(out)
    for part, process in children:
        if process.wait():
            print(f"{part} part exited {process.returncode}", flush=True)
    print(json.dumps(merge(out).get("ratios", {}), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
