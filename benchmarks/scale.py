"""The data path at 10k, 100k and 1M transfer rows: labelling and training throughput and peak memory, the pipeline
against a bare loop doing the same arithmetic.

    .venv/bin/python benchmarks/scale.py [--rows 10000 100000 1000000] [--steps 200] [--work .distillery/scale]
        [--data ../shared/data/banking77] [--out benchmarks/results]

A scratch project in ``--work``: BANKING77 (77 labels, so each row's soft label is 77 floats) and a tiny random-init
BERT teacher (2 layers, hidden 64, a 3,000-word vocabulary; fine-tuned one epoch): a model this small makes the data
path, not the arithmetic, most of the cost, so any overhead of the pipeline shows. Per size N, N generated transfer
texts (training texts with two vocabulary words and a number added) and four processes, each reporting its own peak
RSS (``ru_maxrss``):
  - ``label``: ``distillery label`` with the transfer set (Prefect, MLflow, the outputs cache, Great Expectations);
    rows/s = rows labelled / the labelling run's ``labelling_seconds`` (shards, logits, the outputs parquet);
  - ``bare_label``: the same tokenizer and architecture in a plain loop (tokenise, forward, keep the logits);
  - ``distill``: ``distillery distill`` with the transfer set (the labels come from the cache) and
    ``distill.max_steps`` = ``--steps`` (the 1M point stops there too); rows/s = steps x batch / the student run's
    ``train_seconds``;
  - ``bare_train``: the same student shape, tokenizer and KD loss over the same rows in a plain loop of ``--steps``.
Results go to ``benchmarks/results/scale.json`` as each (size, part) finishes; a later invocation skips the parts
already there. Ratios: ``labelling_rows_per_s_1m_over_10k`` (target: flat), ``peak_rss_gb_at_1m`` (the larger of
label and distill), ``label_pipeline_over_bare_rows_per_s`` and ``train_pipeline_over_bare_rows_per_s`` per size
(target >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import machine  # noqa: E402

PARTS = ("label", "bare_label", "distill", "bare_train")
BATCH = 32  # the students' default batch size
MAX_LENGTH = 32

# a child process: run ``argv[2:]`` (a distillery command, or one of the bare loops below) and write its own peak RSS
# and wall time to ``argv[1]``
MEASURED = """
import json, resource, sys, time
start = time.perf_counter()
if sys.argv[2] == "bare":
    sys.path.insert(0, sys.argv[3])
    from benchmarks.scale import bare
    extra = bare(*sys.argv[4:])
    code = 0
else:
    from distillery.cli import main
    code, extra = main(sys.argv[2:]), {}
json.dump({"code": code, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "wall_s": time.perf_counter() - start, **extra}, open(sys.argv[1], "w"))
"""


def bare(kind: str, model: str, outputs_file: str, steps: str) -> dict:
    """The same work without distillery on the rows the pipeline labelled (its outputs parquet): tokenise and
    forward in batches (``label``: every row), or a KD step loop (``train``: the rows a student trains on); rows/s
    of the loop itself."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    rows = pq.read_table(outputs_file, columns=["text", "split"]).to_pandas()  # what the pipeline labelled
    texts = rows["text"].tolist() if kind == "label" else rows.loc[rows["split"] != "validation", "text"].tolist()
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForSequenceClassification.from_pretrained(model)
    if kind == "label":
        net.eval()
        start, logits = time.perf_counter(), np.zeros((len(texts), net.config.num_labels), dtype=np.float32)
        with torch.inference_mode():
            for a in range(0, len(texts), 256):
                enc = tokenizer(texts[a:a + 256], truncation=True, max_length=MAX_LENGTH, padding=True,
                                return_tensors="pt")
                logits[a:a + 256] = net(**enc).logits.numpy()
        return {"rows_per_s": len(texts) / (time.perf_counter() - start)}
    net.bert.encoder.layer = net.bert.encoder.layer[:1]  # the student: the teacher's first layer
    ids = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    soft = torch.randn(len(texts), net.config.num_labels)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    order = torch.randperm(len(texts))
    net.train()
    start = time.perf_counter()
    for step in range(int(steps)):
        rows = order[(step * BATCH) % len(texts):][:BATCH].tolist()
        batch = tokenizer.pad({"input_ids": [ids[r] for r in rows]}, return_tensors="pt")
        out = net(**batch).logits
        loss = torch.nn.functional.kl_div(torch.log_softmax(out / 2, -1), torch.softmax(soft[rows] / 2, -1),
                                          reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"rows_per_s": int(steps) * BATCH / (time.perf_counter() - start)}


def measured(args: list[str], cwd: Path, report: Path) -> dict:
    """Run a child (see MEASURED) and return what it reported; a failure stops the benchmark with its log."""
    done = subprocess.run([sys.executable, "-c", MEASURED, str(report), *args], cwd=cwd, capture_output=True,
                          text=True)
    if not report.is_file() or json.loads(report.read_text())["code"] not in (0, 3):  # 3: the gate said no
        sys.exit(f"{' '.join(args[:2])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(report.read_text())


def setup_project(work: Path, data: Path) -> Path:
    """The scratch project (once): a tiny BERT over BANKING77's words, ingested, its teacher fine-tuned one epoch."""
    import pandas as pd
    import yaml

    from tests.helpers import build_tiny_model

    config = work / "distillery.yaml"
    if (work / "teacher.done").is_file():
        return config
    work.mkdir(parents=True, exist_ok=True)
    train = pd.read_csv(data / "train.csv")
    labels = sorted(train["category"].unique())
    build_tiny_model(work / "tiny-base", train["text"], labels, vocab_words=3000, hidden_size=64)
    config.write_text(yaml.safe_dump({
        "data": {"source": str(data.resolve()), "augment": {"multiple": 0}},
        "teacher": {"base_model": "tiny-base", "epochs": 1, "batch_size": 64, "learning_rate": 3e-3,
                    "max_length": MAX_LENGTH},
        "labelling": {"batch_size": 256, "shards": 1},
        "validation": {"min_teacher_accuracy": 0.0, "min_teacher_macro_f1": 0.0, "min_mean_confidence": 0.0,
                       "min_predictions_per_class": 0, "max_mean_entropy_fraction": 1.0},
        "student": {"init": "cut", "layers": [0], "deploy": "int8", "prune_vocab": False, "frontier": []},
        "distill": {"epochs": 1, "batch_size": BATCH, "max_length": MAX_LENGTH, "learning_rate": 1e-4,
                    "search": {"trials": 0}, "feature_weight": 0.0},
        "evaluation": {"repeats": 3, "warmup": 1, "throughput_batches": 1},
        "gate": {"max_latency_ratio": 100.0},
        "tracking": {"uri": f"sqlite:///{work.resolve() / 'mlflow.db'}"},
    }))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    for command in ("ingest", "teacher"):
        measured([command, "--config", str(config)], work, work / f"{command}.json")
    (work / "teacher.done").write_text("")
    return config


def transfer_texts(work: Path, data: Path, rows: int) -> Path:
    """``rows`` generated transfer texts (training texts, two vocabulary words and a number added), once per size."""
    import numpy as np
    import pandas as pd

    path = work / f"transfer-{rows}.csv"
    if not path.is_file():
        rng = np.random.default_rng(rows)
        texts = pd.read_csv(data / "train.csv")["text"].str.replace("\n", " ").tolist()
        words = sorted({w for t in texts for w in t.lower().split() if w.isalpha()})
        picks, a, b = rng.integers(0, len(texts), rows), rng.integers(0, len(words), rows), rng.integers(
            0, len(words), rows)
        body = "".join(f'"{texts[p].replace(chr(34), "")} {words[x]} {words[y]} {n}"\n'
                       for n, (p, x, y) in enumerate(zip(picks, a, b)))
        path.write_text("text\n" + body)
    return path


def latest_run(config: Path, stage: str, extra: str = ""):  # noqa: ANN201 - a row of mlflow.search_runs
    """The newest run tagged ``stage`` (and matching ``extra``) in the scratch project's MLflow."""
    import mlflow

    from distillery.config import load_config

    cfg = load_config(config)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.stage = '{stage}'{extra}",
                              order_by=["start_time DESC"], max_results=1)
    return runs.iloc[0]


def run_part(part: str, rows: int, config: Path, work: Path, transfer: Path, steps: int, point: dict) -> dict:
    """One part of one size (``point``: the parts done so far; the bare loops read what ``label`` stored)."""
    report = work / f"{part}-{rows}.json"
    cache = work / f"outputs-{rows}"  # one outputs cache per size: labelled afresh by ``label``, hit by ``distill``
    over = ["--config", str(config), "--set", f"data.transfer_set={transfer}", "--set", f"labelling.cache_dir={cache}"]
    if part == "label":
        shutil.rmtree(cache, ignore_errors=True)
        out = measured(["label", *over], work, report)
        run = latest_run(config, "label")
        seconds, labelled = run["metrics.labelling_seconds"], run["metrics.labelling_labelled_rows"]
        return {**out, "labelling_seconds": seconds, "rows": labelled, "rows_per_s": labelled / seconds,
                "outputs": run["tags.teacher_outputs.path"]}
    if part == "distill":  # trained afresh: no checkpoint of an earlier attempt
        shutil.rmtree(work / ".distillery" / "checkpoints", ignore_errors=True)
        out = measured(["distill", *over, "--set", f"distill.max_steps={steps}"], work, report)
        seconds = latest_run(config, "train-student", " and tags.candidate = 'distilled'")["metrics.train_seconds"]
        return {**out, "train_seconds": seconds, "rows_per_s": steps * BATCH / seconds}
    kind = "label" if part == "bare_label" else "train"
    return measured(["bare", str(ROOT), kind, str(work / "tiny-base"), point["label"]["outputs"], str(steps)], work,
                    report)


def ratios(points: dict) -> dict:
    out = {}
    for n, p in points.items():
        if {"label", "bare_label"} <= set(p):
            out[f"label_pipeline_over_bare_rows_per_s_{n}"] = p["label"]["rows_per_s"] / p["bare_label"]["rows_per_s"]
        if {"distill", "bare_train"} <= set(p):
            out[f"train_pipeline_over_bare_rows_per_s_{n}"] = p["distill"]["rows_per_s"] / p["bare_train"]["rows_per_s"]
    if "label" in points.get("1000000", {}) and "label" in points.get("10000", {}):
        out["labelling_rows_per_s_1m_over_10k"] = (points["1000000"]["label"]["rows_per_s"]
                                                   / points["10000"]["label"]["rows_per_s"])
    big = [points.get("1000000", {}).get(k, {}).get("peak_mib") for k in ("label", "distill")]
    if any(big):
        out["peak_rss_gb_at_1m"] = max(b for b in big if b) / 1024
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--work", default=str(ROOT / ".distillery" / "scale"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "banking77"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    work, data, out_file = Path(args.work), Path(args.data), Path(args.out) / "scale.json"
    results = json.loads(out_file.read_text()) if out_file.is_file() else {"points": {}}
    results.update({"machine": machine(), "steps": args.steps, "batch_size": BATCH,
                    "model": "tiny BERT teacher (2 layers, hidden 64), 1-layer cut student; BANKING77, 77 labels"})
    config = setup_project(work, data)
    for rows in args.rows:
        transfer = transfer_texts(work, data, rows)
        point = results["points"].setdefault(str(rows), {})
        for part in PARTS:
            if part in point:
                continue
            point[part] = run_part(part, rows, config, work, transfer, args.steps, point)
            print(f"{rows:>9,} rows  {part:<10} {point[part]['rows_per_s']:>9.0f} rows/s  peak "
                  f"{point[part]['peak_mib']:>6.0f} MiB  wall {point[part]['wall_s']:.0f} s", flush=True)
            results["ratios"] = ratios(results["points"])
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps(results, indent=1) + "\n")
    for key, value in results.get("ratios", {}).items():
        print(f"{key}: {value:.3f}")
    print(f"written {out_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
