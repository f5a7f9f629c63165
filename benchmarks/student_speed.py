"""One trained student folder in its served ONNX Runtime INT8 form against the registered teacher's INT8 form.

    .venv/bin/python benchmarks/student_speed.py --model <student folder> [--config distillery.yaml]
        [--repeats 400] [--set KEY=VALUE ...]

For a student that was not part of a pipeline run's frontier (e.g. one that ``benchmarks/seeds.py`` trained, under
``.distillery/students/<run id>``), what the harness measures for the frontier: test accuracy of the INT8 file, the
median of interleaved batch-1 latency ratios against the teacher's ONNX INT8 form (the gate's reference; one
thread), the served path end to end (the registered loader: tokenise, forward, softmax, answer frame) against the
bare forward of the same file, and the file's size. Prints one JSON object. The teacher is ``teacher.registered_name``
@ ``teacher.alias``; its INT8 file is the one the pipeline's evaluation made (made here when missing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a student's classifier folder")
    parser.add_argument("--config", default=str(ROOT / "distillery.yaml"))
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    from distillery.cli import environment_defaults

    environment_defaults()
    import numpy as np

    from distillery.config import load_config, parse_override_args
    from distillery.integrations import registry
    from distillery.integrations.served_model import ServedClassifier
    from distillery.models.data import read_snapshot
    from distillery.models.evaluation import (
        TimingSettings,
        encode_per_folder,
        evaluate_model,
        paired_latency_ratio,
        served_path_latency,
    )
    from distillery.models.modeling import load_classifier
    from distillery.models.onnx_runtime import folder_onnx_int8
    from distillery.tasks.data import freeze
    from distillery.tasks.evaluate import onnx_teacher_folder
    from distillery.tasks.teacher import resolve_teacher

    cfg = load_config(args.config, parse_override_args(args.set))
    registry.configure_tracking(cfg)
    teacher = resolve_teacher.fn(cfg, None)
    splits, labels = read_snapshot(Path(freeze(cfg).path))
    texts, gold = splits["test"]["text"].tolist(), splits["test"]["label_id"].tolist()
    folder = Path(args.model)
    encoded = encode_per_folder({str(folder), teacher.folder}, texts, gold, cfg.distill.max_length)
    student = folder_onnx_int8(load_classifier(folder).eval(), folder)
    reference = folder_onnx_int8(load_classifier(Path(teacher.folder)).eval(), onnx_teacher_folder(cfg, teacher))
    timing = TimingSettings(threads=1, warmup=40, repeats=args.repeats, throughput_batches=1)
    data, pad = encoded[str(folder)]
    quality, _ = evaluate_model(student, data, pad, len(labels), None, timing, parameters=0,
                                size_bytes=student.size_bytes())
    paired = paired_latency_ratio(student, data, pad, reference, *encoded[teacher.folder], timing)
    served = ServedClassifier(folder, {"quantize": "onnx-int8", "max_length": cfg.distill.max_length, "threads": 1})
    path = served_path_latency(served.predict, texts, timing)
    bare = served_path_latency(lambda batch: served._forward(served.encode(batch)), texts, timing)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    result = {"model": str(folder), "model_type": model_type, "accuracy": quality["accuracy"],
              "macro_f1": quality["macro_f1"], **paired,
              "served_path_p50_ms": path["served_latency_p50_ms"],
              "tokenise_and_forward_p50_ms": bare["served_latency_p50_ms"],
              "size_mb": student.size_bytes() / 1e6, "teacher": f"{teacher.name} v{teacher.version}",
              "teacher_int8_size_mb": reference.size_bytes() / 1e6, "test_texts": len(texts),
              "repeats": args.repeats}
    result["speedup_vs_reference_paired"] = 1.0 / result["latency_ratio_paired"]
    print(json.dumps(result, indent=1, default=float))
    return 0 if np.isfinite(result["accuracy"]) else 1


if __name__ == "__main__":
    sys.exit(main())
