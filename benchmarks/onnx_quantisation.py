"""ONNX Runtime INT8: dynamic against static quantisation (calibrated on a training sample), on one classifier.

    .venv/bin/python benchmarks/onnx_quantisation.py --model <classifier folder> [--config distillery.yaml]
                                                     [--calibration-rows 256] [--repeats 200]

Exports the classifier (e.g. a student's folder under .distillery/students/) to ONNX and quantises it three ways:
dynamic (weights INT8, activations quantised on the fly: what `student.deploy: onnx-int8` ships), static QDQ with
MatMul/Gemm quantised, and static QDQ of every op, both calibrated (min-max) on rows of the training split read with
the model's own tokenizer. Measures each, and the FP32 export, on the validation split: accuracy, batch-1 p50 latency
on one thread (the same rows for all, after warm-up) and size. Prints a table; writes
``benchmarks/results/onnx-quantisation.json``. Validation, never test: this chooses a setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a classifier folder (config, safetensors, tokenizer)")
    parser.add_argument("--config", default=str(ROOT / "distillery.yaml"))
    parser.add_argument("--calibration-rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    import numpy as np

    from distillery.config import load_config
    from distillery.models.data import read_snapshot
    from distillery.models.modeling import load_classifier, load_tokenizer
    from distillery.models.onnx_runtime import (OnnxClassifier, calibration_batches, export_onnx,
                                                quantize_onnx_int8, quantize_onnx_static)

    cfg = load_config(args.config)
    splits, _ = read_snapshot(cfg.path(cfg.data.snapshot_dir))
    folder = Path(args.model)
    model, tokenizer = load_classifier(folder).eval(), load_tokenizer(folder)
    length = cfg.distill.max_length

    def batch(texts: list[str]) -> dict:
        return calibration_batches(tokenizer, texts, length, len(texts))[0]

    sample = splits["train"]["text"].sample(min(args.calibration_rows, len(splits["train"])), random_state=0).tolist()
    calibration = calibration_batches(tokenizer, sample, length)
    scratch = tempfile.TemporaryDirectory()  # the exported files, removed at the end
    work = Path(scratch.name)
    files = {"fp32": export_onnx(model, work / "fp32.onnx")}
    files["dynamic"] = quantize_onnx_int8(files["fp32"], work / "dynamic.onnx")
    for name, ops in (("static_matmul", ("MatMul", "Gemm")), ("static_all", None)):
        files[name] = quantize_onnx_static(files["fp32"], work / f"{name}.onnx", calibration, op_types=ops)
    val = splits["validation"]
    texts, gold = val["text"].tolist(), val["label_id"].to_numpy()
    rows = np.random.default_rng(0).choice(len(texts), size=20 + args.repeats, replace=True)
    results = {}
    for name, path in files.items():
        session = OnnxClassifier(path, model.config.num_labels, threads=1)
        logits = np.concatenate([session.session.run(["logits"], batch(texts[i:i + 64]))[0]
                                 for i in range(0, len(texts), 64)])
        samples = []
        for k, i in enumerate(rows):
            one = batch([texts[int(i)]])
            start = time.perf_counter()
            session.session.run(["logits"], one)
            if k >= 20:
                samples.append((time.perf_counter() - start) * 1000)
        results[name] = {"val_accuracy": float((logits.argmax(1) == gold).mean()),
                         "latency_p50_ms": float(np.median(samples)), "size_mb": path.stat().st_size / 1e6}
    scratch.cleanup()
    print(f"{'form':<16}{'val acc':>9}{'p50 ms':>9}{'MB':>7}")
    for name, r in results.items():
        print(f"{name:<16}{r['val_accuracy']:>9.4f}{r['latency_p50_ms']:>9.3f}{r['size_mb']:>7.1f}")
    out = ROOT / "benchmarks" / "results" / "onnx-quantisation.json"
    out.write_text(json.dumps({"model": str(folder), "calibration_rows": len(sample), "repeats": args.repeats,
                               "forms": results}, indent=1) + "\n")
    print(f"written {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
