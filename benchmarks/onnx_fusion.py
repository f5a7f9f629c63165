"""ONNX Runtime's transformer fusions (Attention, SkipLayerNormalization, BiasGelu) against today's export, batch 1.

    .venv/bin/python benchmarks/onnx_fusion.py [--model minilm|mpnet|<classifier folder>] [--rounds 3]

Today every ONNX form (teacher and students) is the TorchScript export quantised dynamically to INT8 and opened with
ORT_ENABLE_ALL, whose session-level fusions (LayerNormalization, FusedMatMul, DynamicQuantizeMatMul) apply to every
model alike. The offline optimizer of ``onnxruntime.transformers`` fuses more where it knows the graph: the model is
exported with eager attention (the pattern the BERT fusions match), optimised as ``bert``, then quantised (weights of
ops from the com.microsoft domain typed through ``DefaultTensorType``). This measures, on the same texts in
interleaved rounds on one thread: each form's ops, its largest logit difference from the plain FP32 export, the p50
latency and the median of per-text latency ratios (fused INT8 over today's INT8). Writes
``benchmarks/results/onnx-fusion-<model>.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXTS = ["my card has not arrived yet, what should I do", "what is the exchange rate for euros",
         "how do I top up by bank transfer", "I think someone used my card without permission",
         "can I change my PIN at an ATM", "why was I charged a fee for this transfer"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", help="minilm, mpnet or a classifier folder")
    parser.add_argument("--config", default=str(ROOT / "distillery.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--labels", type=int, default=77)
    args = parser.parse_args()
    import numpy as np
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModelForSequenceClassification

    from distillery.config import load_config
    from distillery.models.modeling import load_classifier, load_tokenizer
    from distillery.models.onnx_runtime import OnnxClassifier, export_onnx, quantize_onnx_int8
    from distillery.models.students import resolve_base_model

    cfg = load_config(args.config)
    folder = Path(args.model) if Path(args.model).is_dir() else resolve_base_model(args.model, cfg.work.pretrained)
    labels = [f"label{i}" for i in range(args.labels)]
    model, tokenizer = load_classifier(folder, labels).eval(), load_tokenizer(folder)
    scratch = tempfile.TemporaryDirectory()
    work = Path(scratch.name)
    files = {"fp32": export_onnx(model, work / "fp32.onnx")}
    files["int8"] = quantize_onnx_int8(files["fp32"], work / "int8.onnx")
    eager = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=len(labels),
                                                               attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())  # the same weights (the head too)
    fused = optimize_model(str(export_onnx(eager, work / "eager.onnx")), model_type="bert", opt_level=1,
                           num_heads=model.config.num_attention_heads, hidden_size=model.config.hidden_size)
    fused.save_model_to_file(str(work / "fused-fp32.onnx"))
    files["fused_fp32"] = work / "fused-fp32.onnx"
    quantize_dynamic(str(files["fused_fp32"]), str(work / "fused-int8.onnx"), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    files["fused_int8"] = work / "fused-int8.onnx"

    feeds = [{k: v.astype(np.int64) for k, v in tokenizer([t], return_tensors="np").items()
              if k in ("input_ids", "attention_mask")} for t in TEXTS * 20]
    sessions = {name: OnnxClassifier(path, len(labels), threads=1).session for name, path in files.items()}
    reference = np.concatenate([sessions["fp32"].run(["logits"], f)[0] for f in feeds[:len(TEXTS)]])
    times: dict[str, list[float]] = {name: [] for name in files}
    for _ in range(args.rounds):
        for feed in feeds:  # interleaved: a busy moment costs every form alike
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(["logits"], feed)
                times[name].append((time.perf_counter() - start) * 1000)
    forms = {}
    for name, path in files.items():
        out = np.concatenate([sessions[name].run(["logits"], f)[0] for f in feeds[:len(TEXTS)]])
        ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        forms[name] = {"p50_ms": float(np.median(times[name])), "size_mb": path.stat().st_size / 1e6,
                       "max_abs_logit_diff_vs_fp32": float(np.abs(out - reference).max()),
                       "fused_ops": {k: ops[k] for k in ("Attention", "QAttention", "SkipLayerNormalization",
                                                         "BiasGelu", "EmbedLayerNormalization") if ops[k]}}
    ratio = float(np.median(np.asarray(times["fused_int8"]) / np.asarray(times["int8"])))
    scratch.cleanup()
    print(f"{'form':<12}{'p50 ms':>9}{'MB':>8}{'max |dlogit|':>14}  fused ops")
    for name, r in forms.items():
        print(f"{name:<12}{r['p50_ms']:>9.3f}{r['size_mb']:>8.1f}{r['max_abs_logit_diff_vs_fp32']:>14.2e}  "
              f"{r['fused_ops'] or '-'}")
    print(f"fused_int8_over_int8_latency_paired = {ratio:.3f}  (median of per-text ratios, {len(feeds)} texts x "
          f"{args.rounds} rounds)")
    name = folder.name if Path(args.model).is_dir() else args.model
    out = ROOT / "benchmarks" / "results" / f"onnx-fusion-{name}.json"
    out.write_text(json.dumps({"model": str(folder), "rounds": args.rounds, "texts": len(feeds), "forms": forms,
                               "fused_int8_over_int8_latency_paired": ratio}, indent=1) + "\n")
    print(f"written {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
