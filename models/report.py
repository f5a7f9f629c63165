"""Human-facing outputs: the results table, evaluation plots and the model card (pure; files only where asked)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from distillery.models.metrics import reliability_curve, softmax  # noqa: E402

CANDIDATES = ("teacher_fp32", "teacher_int8", "student_fp32", "student_int8", "baseline_fp32")


def results_table(metrics: dict[str, dict]) -> str:
    """A fixed-width table of the candidates' headline metrics."""
    calibrated = all("ece_calibrated" in m for m in metrics.values())  # temperature scaling ran (on validation)
    head = f"{'candidate':<19}{'accuracy':>9}{'macro-F1':>9}{'ECE':>7}{'agree':>7}{'p50 ms':>8}{'p95 ms':>8}" \
           f"{'rows/s':>8}{'params M':>9}{'MB':>7}" + (f"{'T':>6}{'ECE@T':>7}" if calibrated else "")
    lines = [head, "-" * len(head)]
    for name, m in metrics.items():
        lines.append(f"{name:<19}{m['accuracy']:>9.4f}{m['macro_f1']:>9.4f}{m['ece']:>7.3f}{m['agreement']:>7.3f}"
                     f"{m['latency_p50_ms']:>8.2f}{m['latency_p95_ms']:>8.2f}{m['throughput_rps']:>8.0f}"
                     f"{m['parameters'] / 1e6:>9.1f}{m['size_mb']:>7.1f}"
                     + (f"{m['temperature']:>6.2f}{m['ece_calibrated']:>7.3f}" if calibrated else ""))
    return "\n".join(lines)


def headline_ratios(metrics: dict[str, dict]) -> dict[str, float]:
    t, q, s, b = (metrics[k] for k in ("teacher_fp32", "teacher_int8", "student_fp32", "baseline_fp32"))
    s8 = metrics.get("student_int8", s)
    ratios = {
        "student_int8_over_teacher_accuracy": s8["accuracy"] / t["accuracy"],
        "int8_teacher_over_student_int8_latency": q["latency_p50_ms"] / s8["latency_p50_ms"],
        "student_over_teacher_accuracy": s["accuracy"] / t["accuracy"],
        "student_over_int8_teacher_accuracy": s["accuracy"] / q["accuracy"],
        "int8_teacher_over_student_latency": q["latency_p50_ms"] / s["latency_p50_ms"],
        "teacher_over_student_latency": t["latency_p50_ms"] / s["latency_p50_ms"],
        "distilled_minus_baseline_accuracy": s["accuracy"] - b["accuracy"],
    }
    if "student_int8_onnx" in metrics:  # the ONNX Runtime deployment target, against both INT8 teachers
        so = metrics["student_int8_onnx"]
        ratios["student_int8_onnx_over_teacher_accuracy"] = so["accuracy"] / t["accuracy"]
        ratios["int8_teacher_over_student_int8_onnx_latency"] = q["latency_p50_ms"] / so["latency_p50_ms"]
        if "teacher_int8_onnx" in metrics:
            ratios["onnx_int8_teacher_over_onnx_int8_student_latency"] = \
                metrics["teacher_int8_onnx"]["latency_p50_ms"] / so["latency_p50_ms"]
    return ratios


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(logits: np.ndarray, labels_true: np.ndarray, names: list[str], path: Path, title: str,
                   max_classes: int = 25) -> Path:
    """Row-normalised confusion matrix with class names; with many classes, the ``max_classes`` most confused ones
    (lowest recall), so the names stay readable."""
    k = len(names)
    matrix = np.zeros((k, k))
    np.add.at(matrix, (labels_true, logits.argmax(1)), 1)
    matrix = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    shown = np.arange(k)
    if k > max_classes:
        shown = np.sort(np.argsort(np.diag(matrix), kind="stable")[:max_classes])
        title = f"{title}: the {max_classes} classes with the lowest recall (of {k})"
    sub = matrix[np.ix_(shown, shown)]
    size = max(6.0, len(shown) * 0.32)
    fig, ax = plt.subplots(figsize=(size + 2.5, size + 1.5))
    image = ax.imshow(sub, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.04, label="share of the true class")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(len(shown)), [names[i] for i in shown], rotation=90, fontsize=7)
    ax.set_yticks(range(len(shown)), [names[i] for i in shown], fontsize=7)
    return _save(fig, path)


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, bins: int = 15) -> Path:
    """Reliability diagram: accuracy against confidence per bin, one line per candidate."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for name, (logits, labels) in curves.items():
        conf, acc, _ = reliability_curve(softmax(logits), labels, bins)
        ok = ~np.isnan(conf)
        ax.plot(conf[ok], acc[ok], marker="o", label=name)
    ax.set_title("Reliability on the test split (closer to the diagonal is better calibrated)", fontsize=9)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_latency(metrics: dict[str, dict], path: Path, served: str | None = None) -> Path:
    """Every candidate form; the served student form is marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in metrics.items():
        mark = name == served
        ax.scatter(m["latency_p50_ms"], m["accuracy"], s=90 if mark else 40, marker="*" if mark else "o",
                   color="tab:red" if mark else "tab:blue", zorder=3)
        ax.annotate(name + (" (served)" if mark else ""), (m["latency_p50_ms"], m["accuracy"]), fontsize=8,
                    xytext=(5, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.margins(x=0.35, y=0.15)  # room for the labels: none is clipped at the edge
    ax.set_title("Accuracy against batch-1 latency, every form of teacher and students", fontsize=10)
    ax.set_xlabel("p50 latency at batch 1 (ms, log scale)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_f1_difference(teacher_f1: list[float], student_f1: list[float], names: list[str], path: Path,
                       student: str = "student") -> Path:
    """Per-class F1 of the student minus the teacher's, every class named (horizontal bars, worst at the top)."""
    diff = np.asarray(student_f1) - np.asarray(teacher_f1)
    order = np.argsort(diff, kind="stable")[::-1]
    fig, ax = plt.subplots(figsize=(8, max(4.0, 0.2 * len(names) + 1.2)))
    ax.barh(range(len(diff)), diff[order], color=np.where(diff[order] < 0, "tab:red", "tab:green"))
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(diff)), [names[i] for i in order], fontsize=7)
    ax.set_ylim(-0.6, len(diff) - 0.4)
    ax.set_xlabel(f"{student} F1 - teacher F1")
    ax.set_title(f"Per-class F1: {student} minus teacher (FP32), classes sorted", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def model_card(name: str, version: str, lineage: dict, metrics: dict[str, dict], decision: dict,
               params: dict) -> str:
    """Markdown model card: what the model is, where it came from, how it scored, why it was promoted."""
    ratios = headline_ratios(metrics)
    lines = [
        f"# {name} v{version}", "",
        "Distilled intent classifier produced by distillery.", "",
        "## Lineage", "",
        *[f"- **{k}**: `{v}`" for k, v in lineage.items()], "",
        "## Training", "",
        *[f"- {k}: `{v}`" for k, v in params.items()], "",
        "## Test-split results", "", "```", results_table(metrics), "```", "",
        *[f"- {k.replace('_', ' ')}: {v:.4f}" for k, v in ratios.items()], "",
        f"## Gate decision: {'PROMOTED' if decision['passed'] else 'REJECTED'}", "",
        *[f"- {'PASS' if c['passed'] else 'FAIL'} `{c['name']}`: {c['observed']:.4g} vs {c['threshold']:.4g} ({c['rule']})"
          for c in decision["criteria"]], "",
        "## Use", "", "```python", "import mlflow",
        f"model = mlflow.pyfunc.load_model(\"models:/{name}/{version}\")",
        "model.predict([\"my card has not arrived yet\"])", "```", "",
    ]
    return "\n".join(lines)
