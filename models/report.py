"""Human-facing outputs: the results table, evaluation plots and the model card (pure; files only where asked)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from distillery.config import EvaluationConfig  # noqa: E402
from distillery.records import METRIC_PREFIX, Decision, teacher_row  # noqa: E402
from distillery.models.calibration import accuracy_cost, tradeoff_curve  # noqa: E402
from distillery.models.metrics import reliability_curve, softmax  # noqa: E402

def _name_width(metrics: dict) -> int:
    """The name column: the longest candidate name (frontier students have long ones) and two spaces."""
    return max([19, *(len(k) + 2 for k in metrics)])


def _cell(value: float, spec: str) -> str:
    """``value`` formatted by ``spec`` (e.g. ``>9.1f``), or a dash of that width when it is not measured (NaN: a
    black-box teacher has no size or parameter count here)."""
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return format(value, spec) if np.isfinite(value) else format("-", f">{width}")


def results_table(metrics: dict[str, dict]) -> str:
    """A fixed-width table of the candidates' headline metrics."""
    calibrated = all("ece_calibrated" in m for m in metrics.values())  # temperature scaling ran (on validation)
    w = _name_width(metrics)
    head = f"{'candidate':<{w}}{'accuracy':>9}{'macro-F1':>9}{'ECE':>7}{'agree':>7}{'p50 ms':>8}{'p95 ms':>8}" \
           f"{'rows/s':>8}{'params M':>9}{'MB':>7}" + (f"{'T':>6}{'ECE@T':>7}" if calibrated else "")
    lines = [head, "-" * len(head)]
    for name, m in metrics.items():
        lines.append(f"{name:<{w}}{m['accuracy']:>9.4f}{m['macro_f1']:>9.4f}{m['ece']:>7.3f}{m['agreement']:>7.3f}"
                     f"{m['latency_p50_ms']:>8.2f}{m['latency_p95_ms']:>8.2f}{m['throughput_rps']:>8.0f}"
                     f"{_cell(m['parameters'] / 1e6, '>9.1f')}{_cell(m['size_mb'], '>7.1f')}"
                     + (f"{m['calibration_temperature']:>6.2f}{m['ece_calibrated']:>7.3f}" if calibrated else ""))
    return "\n".join(lines)


OOS_COLUMNS = (("abstain_threshold", "threshold"), ("oos.inscope_accuracy", "in-scope acc"),
               ("oos.recall", "OOS recall"), ("oos.precision", "OOS prec"), ("oos.auroc", "AUROC"),
               ("oos.abstention_rate", "abstains"))


def oos_table(metrics: dict[str, dict]) -> str:
    """Out-of-scope behaviour per candidate at its threshold (abstentions count as in-scope errors); '' when no
    candidate abstains."""
    if not any("abstain_threshold" in m for m in metrics.values()):
        return ""
    w = _name_width(metrics)
    head = f"{'candidate':<{w}}" + "".join(f"{title:>13}" for _, title in OOS_COLUMNS)
    lines = [head, "-" * len(head)]
    for name, m in metrics.items():
        lines.append(f"{name:<{w}}" + "".join(f"{m[key]:>13.4f}" if key in m else f"{'-':>13}"
                                             for key, _ in OOS_COLUMNS))
    return "\n".join(lines)


def plot_oos_tradeoff(curves: dict[str, tuple[np.ndarray, ...]], chosen: dict[str, dict],
                      path: Path) -> Path:
    """In-scope accuracy against out-of-scope recall as the abstention threshold moves; the chosen threshold of each
    candidate is marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for name, (probs, labels, is_oos, score) in curves.items():
        _, accuracy, recall = tradeoff_curve(probs, labels, is_oos, score)
        line, = ax.plot(recall, accuracy, label=name, lw=1.5)
        m = chosen[name]
        ax.scatter([m["oos.recall"]], [m["oos.inscope_accuracy"]], color=line.get_color(), s=45, zorder=3)
    ax.set_title("In-scope accuracy vs out-of-scope recall as the threshold moves\n"
                 "(test split; dots: thresholds chosen on validation)", fontsize=9)
    low = min(m["oos.inscope_accuracy"] for m in chosen.values() if "oos.inscope_accuracy" in m)
    ax.set_ylim(max(0.0, low - 0.25), 1.0)  # the region around the chosen points, not the collapse at recall 1
    ax.set_xlabel("out-of-scope recall (abstentions on out-of-scope texts)")
    ax.set_ylabel("in-scope accuracy (abstaining counts as wrong)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def headline_ratios(metrics: dict[str, dict], served: str = "student_int8",
                    reference: str = "teacher_int8") -> dict[str, float]:
    """The comparisons the README and the benchmarks report, from one evaluation's metrics: the ``served`` student
    against the FP32 teacher and the ``reference`` (the teacher's best quantised form), the served path against the
    bare forward, the distilled student against the baseline."""
    t, s, b = (metrics[k] for k in (teacher_row(metrics), "student_fp32", "baseline_fp32"))
    q, d = metrics[reference], metrics[served]
    ratios = {
        "served_over_teacher_accuracy": d["accuracy"] / t["accuracy"],
        "served_over_reference_accuracy": d["accuracy"] / q["accuracy"],
        "best_int8_teacher_over_served_latency": q["latency_p50_ms"] / d["latency_p50_ms"],
        "teacher_fp32_over_served_latency": t["latency_p50_ms"] / d["latency_p50_ms"],
        "teacher_fp32_over_served_size": t["size_mb"] / d["size_mb"],
        "served_over_best_int8_teacher_throughput": d["throughput_rps"] / q["throughput_rps"],
        "student_over_teacher_accuracy": s["accuracy"] / t["accuracy"],
        "distilled_minus_baseline_accuracy": s["accuracy"] - b["accuracy"],
    }
    if "latency_ratio_paired" in d:  # interleaved pairs: the figure the gate uses
        ratios["best_int8_teacher_over_served_latency_paired"] = 1.0 / d["latency_ratio_paired"]
    if "cost_per_1k_texts" in q:  # a black-box teacher: what the student saves, per request and per 1,000 texts
        ratios["endpoint_request_over_served_latency"] = q["latency_p50_ms"] / d["latency_p50_ms"]
        ratios["reference_cost_per_1k_texts"] = q["cost_per_1k_texts"]
    if "served_latency_p50_ms" in d:  # the served form's code path end to end against its bare forward
        ratios["served_path_over_bare_forward_latency"] = d["served_latency_p50_ms"] / d["latency_p50_ms"]
    return ratios


def fast_end_ratios(metrics: dict[str, dict], passing: list[str]) -> dict[str, float]:
    """The frontier's fast end against the reference, by interleaved pairs (student over reference batch-1 latency):
    the fastest of the ``passing`` students (those the gate would pass) and the fastest static-embedding student."""
    paired = {n: m["latency_ratio_paired"] for n, m in metrics.items() if "latency_ratio_paired" in m}
    out = {}
    if any(n in paired for n in passing):
        out["fastest_passing_over_reference_latency_paired"] = min(paired[n] for n in passing if n in paired)
    statics = [r for n, r in paired.items() if n.startswith("static")]
    if statics:
        out["static_over_reference_latency_paired"] = min(statics)
    return out


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


def pareto(metrics: dict[str, dict]) -> set[str]:
    """The candidates no other one matches or beats on test accuracy, batch-1 latency and size at once."""

    def beats(a: dict, b: dict) -> bool:
        ge = (a["accuracy"] >= b["accuracy"], a["latency_p50_ms"] <= b["latency_p50_ms"], a["size_mb"] <= b["size_mb"])
        gt = (a["accuracy"] > b["accuracy"], a["latency_p50_ms"] < b["latency_p50_ms"], a["size_mb"] < b["size_mb"])
        return all(ge) and any(gt)

    return {k for k, m in metrics.items() if not any(beats(o, m) for j, o in metrics.items() if j != k)}


def frontier_table(metrics: dict[str, dict], served: tuple[str, ...] = (), reference: str | None = None) -> str:
    """Accuracy, latency and size of every candidate, smallest first; ``*`` marks the Pareto frontier; ``/ref`` is a
    student's batch-1 latency over the reference's, timed in interleaved pairs (steadier than two p50s)."""
    front = pareto(metrics)
    w = _name_width(metrics)
    head = f"{'candidate':<{w}}{'accuracy':>9}{'val acc':>9}{'p50 ms':>8}{'p95 ms':>8}{'/ref':>7}{'rows/s':>8}" \
           f"{'MB':>8}{'params M':>9}  frontier"
    lines = [head, "-" * len(head)]
    for name in sorted(metrics, key=lambda k: (metrics[k]["size_mb"], metrics[k]["latency_p50_ms"])):
        m = metrics[name]
        note = ["*"] if name in front else []
        note += ["served"] if name in served[:1] else ["contender"] if name in served else []
        note += ["reference"] if name == reference else []
        val = f"{m['val_accuracy']:>9.4f}" if "val_accuracy" in m else f"{'-':>9}"
        paired = f"{m['latency_ratio_paired']:>7.3f}" if "latency_ratio_paired" in m else f"{'-':>7}"
        lines.append(f"{name:<{w}}{m['accuracy']:>9.4f}{val}{m['latency_p50_ms']:>8.2f}{m['latency_p95_ms']:>8.2f}"
                     f"{paired}{m['throughput_rps']:>8.0f}{_cell(m['size_mb'], '>8.1f')}{_cell(m['parameters'] / 1e6, '>9.1f')}"
                     f"  {' '.join(note)}")
    return "\n".join(lines)


def _place_labels(fig: plt.Figure, ax: plt.Axes, points: list[tuple[str, float, float, float]]) -> None:
    """Annotate each point (text, x, y, marker area in points^2), in order, beside its marker at the first of a few
    places where the drawn text covers no marker and no earlier label (else where it covers least), joined to its
    marker by a thin leader line. Offsets are in points, so the layout holds at any saving dpi; the labels stay out
    of tight_layout."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    pixels = fig.dpi / 72.0
    centres = [ax.transData.transform((x, y)) for _, x, y, _ in points]
    taken = [Bbox.from_bounds(cx - r, cy - r, 2 * r, 2 * r)
             for (cx, cy), r in zip(centres, (area ** 0.5 / 2 * pixels for *_, area in points))]

    def covered(box: Bbox) -> float:
        return sum(o.width * o.height for o in (Bbox.intersection(box, b) for b in taken) if o is not None)

    for text, x, y, area in points:
        r = area ** 0.5 / 2 * 0.75 + 2  # points: just off the marker, diagonally
        style = {"fontsize": 7, "textcoords": "offset points", "va": "bottom", "zorder": 2.5,  # under the markers
                 "bbox": {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.7}}
        note = ax.annotate(text, (x, y), xytext=(r, r), **style)
        note.set_in_layout(False)
        extent = note.get_window_extent(renderer)
        w, h = extent.width / pixels, extent.height / pixels
        offsets = [(r, r), (r, -r - h), (-r - w, r), (-r - w, -r - h), (-w / 2, r + 4), (-w / 2, -r - h - 4),
                   (r, r + h), (r, -r - 2 * h), (-r - w, r + h), (-r - w, -r - 2 * h)]
        best = None
        for offset in offsets:
            note.xyann = offset
            box = note.get_window_extent(renderer)
            cost = covered(box)
            if best is None or cost < best[0]:
                best = (cost, offset, box)
            if cost == 0:
                break
        note.remove()  # drawn again where it fits, with a leader to its own marker (its extent left it out)
        ax.annotate(text, (x, y), xytext=best[1], **style, arrowprops={
            "arrowstyle": "-", "color": "0.45", "lw": 0.5, "shrinkA": 0, "shrinkB": area ** 0.5 / 2}).set_in_layout(False)
        taken.append(best[2])


def plot_frontier(metrics: dict[str, dict], path: Path, served: str | None = None,
                  reference: str | None = None, accuracy_tolerance: float | None = None) -> Path:
    """Test accuracy against batch-1 latency for every form of teacher and students; marker area grows with the size
    on disk; the Pareto frontier (accuracy, latency, size) is joined; the served student and the gate's reference
    are marked, and with ``accuracy_tolerance`` the gate's accuracy bar (the reference's accuracy less it) is a
    line, so what can ship is above it."""
    front = pareto(metrics)
    fig, ax = plt.subplots(figsize=(8, 5.2))
    sizes = [m["size_mb"] for m in metrics.values() if np.isfinite(m["size_mb"])]
    largest = max(sizes) if sizes else 1.0

    def area(m: dict) -> float:  # a black-box teacher has no size here: the smallest marker
        return 30 + 600 * (m["size_mb"] / largest if np.isfinite(m["size_mb"]) else 0.0)

    def size(m: dict) -> str:
        return f"{m['size_mb']:.1f} MB" if np.isfinite(m["size_mb"]) else "behind an endpoint"

    for name, m in metrics.items():
        x, y = m["latency_p50_ms"], m["accuracy"]
        color = "tab:red" if name == served else "tab:orange" if name == reference else \
            "tab:blue" if name in front else "tab:gray"
        ax.scatter(x, y, s=area(m), color=color, alpha=0.55, edgecolors="k", zorder=3)
    ax.set_xscale("log")
    ax.margins(x=0.3, y=0.15)  # room for the labels: none is clipped at the edge
    line = sorted((metrics[k]["latency_p50_ms"], metrics[k]["accuracy"]) for k in front)
    ax.plot([p[0] for p in line], [p[1] for p in line], color="tab:blue", lw=0.8, ls="--", zorder=2,
            label="Pareto frontier (accuracy, latency, size)")
    if accuracy_tolerance is not None and reference in metrics:
        bar = metrics[reference]["accuracy"] - accuracy_tolerance
        ax.axhline(bar, color="tab:red", lw=0.8, ls=":", zorder=1, label=f"gate's accuracy bar ({bar:.4f})")
    ax.set_title("Accuracy against batch-1 latency, every form of teacher and students\n"
                 "(marker area: size on disk)", fontsize=10)
    ax.set_xlabel("p50 latency at batch 1, one thread (ms, log scale)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _place_labels(fig, ax, [
        (f"{name}{' (served)' if name == served else ' (reference)' if name == reference else ''}\n"
         f"{size(m)}", m["latency_p50_ms"], m["accuracy"], area(m))
        for name, m in sorted(metrics.items(), key=lambda kv: (kv[1]["latency_p50_ms"], -kv[1]["accuracy"]))])
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


def _precision(m: dict) -> str:
    return f"precision {m['oos.precision']:.1%}, " if "oos.precision" in m else "no abstentions, "


def _oos_section(metrics: dict[str, dict], served: str | None, score: str = "confidence") -> list[str]:
    m = metrics.get(served or "", {})
    if "abstain_threshold" not in m:
        return []
    what = ("its energy score T * logsumexp(logits / T)" if score == "energy" else "its calibrated confidence")
    lines = ["## Out-of-scope inputs", "",
             f"The served model answers the out-of-scope label when {what} (temperature "
             f"{m.get('calibration_temperature', 1.0):.3f}) is below **{m['abstain_threshold']:.4f}** (chosen on the validation "
             f"split)."]
    if "oos.recall" in m:
        cost = accuracy_cost(m)
        lines.append(f"Measured on the test split: it catches {m['oos.recall']:.1%} of out-of-scope texts "
                     f"({_precision(m)}AUROC {m.get('oos.auroc', float('nan')):.3f}) at a cost of {cost:.2%} "
                     f"in-scope accuracy ({m['oos.inscope_accuracy_no_abstention']:.4f} -> "
                     f"{m['oos.inscope_accuracy']:.4f}).")
    else:
        lines.append(f"The data has no out-of-scope texts: at this threshold it abstains on "
                     f"{m['oos.abstention_rate']:.1%} of in-scope test texts.")
    return [*lines, "", "```", oos_table(metrics), "```", ""]


def model_card(name: str, version: str, lineage: dict, metrics: dict[str, dict], decision: dict,
               params: dict, served: str = "student_int8", abstain_score: str = "confidence",
               reference: str = "teacher_int8") -> str:
    """Markdown model card: what the model is, where it came from, how it scored, why it was promoted."""
    ratios = headline_ratios(metrics, served, reference)
    lines = [
        f"# {name} v{version}", "",
        "Distilled intent classifier produced by distillery.", "",
        "## Lineage", "",
        *[f"- **{k}**: `{v}`" for k, v in lineage.items()], "",
        "## Training", "",
        *[f"- {k}: `{v}`" for k, v in params.items()], "",
        "## Test-split results", "", f"Served as `{served}`; the gate compared it with `{reference}`, the teacher's "
        "quantised form with the best validation accuracy.", "", "```", results_table(metrics), "```", "",
        *[f"- {k.replace('_', ' ')}: {v:.4f}" for k, v in ratios.items()], "",
        *_oos_section(metrics, served, abstain_score),
        f"## Gate decision: {'PROMOTED' if decision['passed'] else 'REJECTED'}", "",
        *[f"- {'PASS' if c['passed'] else 'FAIL'} `{c['name']}`: {c['observed']:.4g} vs {c['threshold']:.4g} ({c['rule']})"
          for c in decision["criteria"]], "",
        *[f"{note}\n" for note in decision.get("notes", [])],
        "## Use", "", "```python", "import mlflow",
        f"model = mlflow.pyfunc.load_model(\"models:/{name}/{version}\")",
        "model.predict([\"my card has not arrived yet\"])", "```", "",
    ]
    return "\n".join(lines)


def write_evaluation(folder: Path, metrics: dict[str, dict], logits: dict[str, np.ndarray], curves: dict[str, tuple],
                     gold: np.ndarray, labels: list[str], served: str, reference: str, contenders: tuple[str, ...],
                     ece_bins: int, oos_rows: int = 0, accuracy_tolerance: float | None = None) -> str:
    """The evaluation's files in ``folder``: ``results.txt`` (the results table, the frontier and, with abstention,
    the out-of-scope table), ``frontier.txt`` and the plots of the form the gate judges and that is served
    (confusion, reliability, frontier, per-class F1 difference, and the out-of-scope trade-off when abstention was
    measured, ``curves``, on ``oos_rows`` out-of-scope test rows; the frontier with the gate's accuracy bar, the
    reference's accuracy less ``accuracy_tolerance``); returns the table."""
    frontier_text = frontier_table(metrics, contenders, reference)
    table = results_table(metrics) + "\n\nFrontier (smallest first; * = no other candidate is as accurate, as fast and " \
        "as small):\n" + frontier_text
    if curves:
        table += "\n\nOut of scope (each candidate at its own threshold):\n" + oos_table(metrics)
    shown = tuple(dict.fromkeys((teacher_row(metrics), reference, served, "baseline_fp32")))
    plot_confusion(logits[served], gold, labels, folder / "confusion_student.png",
                   f"Confusion of the served student ({served})")
    plot_reliability({k: (logits[k], gold) for k in shown}, folder / "reliability.png", ece_bins)
    plot_frontier(metrics, folder / "frontier.png", served=served, reference=reference,
                  accuracy_tolerance=accuracy_tolerance)
    plot_f1_difference(metrics[teacher_row(metrics)]["per_class_f1"], metrics[served]["per_class_f1"], labels,
                       folder / "per_class_f1_student_minus_teacher.png", student=served)
    if curves and oos_rows:
        plot_oos_tradeoff({k: curves[k] for k in shown}, metrics, folder / "oos_tradeoff.png")
    (folder / "results.txt").write_text(table + "\n")
    (folder / "frontier.txt").write_text(frontier_text + "\n")
    return table


def harness_summary(metrics: dict[str, dict], contenders: list[str], reference: str, references: tuple[str, ...],
                    e: EvaluationConfig, abstained: bool) -> list[str]:
    """The lines the evaluation logs after measuring: how the reference was chosen, each served student's paired
    latency and served path, the out-of-scope table and the calibration temperatures."""
    if reference in references:
        lines = ["gate reference: %s (validation accuracy %s)" % (reference, ", ".join(
            f"{k} {metrics[k]['val_accuracy']:.4f}" for k in references if k in metrics))]
    else:  # a black-box teacher: its one form, as served
        lines = [f"gate reference: {reference}, the teacher as served (validation accuracy "
                 f"{metrics[reference]['val_accuracy']:.4f}, test accuracy {metrics[reference]['accuracy']:.4f})"]
    for c in contenders:
        m = metrics[c]
        if "latency_ratio_paired" not in m:  # a black-box reference: its latency is per request
            lines.append(f"{c} batch-1 p50 {m['latency_p50_ms']:.2f} ms, served path end to end p50 "
                         f"{m['served_latency_p50_ms']:.2f} ms; {reference} p50 {metrics[reference]['latency_p50_ms']:.1f}"
                         f" ms per request")
            continue
        lines.append(f"{c} / {reference} batch-1 latency, interleaved pairs: median {m['latency_ratio_paired']:.3f}, "
                     f"p90 {m['latency_ratio_paired_p90']:.3f}; served path end to end p50 "
                     f"{m['served_latency_p50_ms']:.2f} ms (bare forward {m['latency_p50_ms']:.2f} ms)")
    if abstained:
        lines.append(f"out of scope (threshold on {e.abstain_score} chosen on validation for {e.abstain_target}="
                     f"{e.abstain_value}):\n{oos_table(metrics)}")
    if e.calibrate:
        lines.append("temperature scaling (fitted on validation): " + ", ".join(
            f"{k} T={m['calibration_temperature']:.2f} ECE {m['ece']:.3f} -> {m['ece_calibrated']:.3f}"
            for k, m in metrics.items()))
    return lines


def gated_model_card(name: str, version: str, lineage_tags: dict[str, str], logged: dict[str, dict],
                     decision: Decision, recipe: dict, served: str, abstain_score: str, reference: str) -> str:
    """The model card of a version the gate promotes: its lineage (without the metrics, gate and GX keys the card
    shows in tables), the gate's criteria and notes, the recipe."""
    card_lineage = {k: v for k, v in lineage_tags.items()
                    if not k.startswith((METRIC_PREFIX, "gate.", "gx.", "candidate"))}
    notes = [r for r in decision.reasons if not r.startswith(("PASS ", "FAIL "))]
    return model_card(name, version, card_lineage, logged,
                      {"passed": decision.passed, "criteria": list(decision.criteria), "notes": notes}, recipe,
                      served=served, abstain_score=abstain_score, reference=reference)


def plot_drift(window: dict, reference: dict, folder: Path, top: int = 20) -> list[Path]:
    """A production window against the test split: the ``top`` most frequent predicted labels (shares), word counts
    and confidences. Each dict holds ``labels``, ``lengths`` and ``confidences`` (lists)."""
    from collections import Counter

    folder = Path(folder)
    w, r = Counter(window["labels"]), Counter(reference["labels"])
    names = [n for n, _ in (w + r).most_common(top)]
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(names) + 1.5))
    y = np.arange(len(names))
    ax.barh(y - 0.2, [r[n] / max(sum(r.values()), 1) for n in names], height=0.4, label="test split (promotion)")
    ax.barh(y + 0.2, [w[n] / max(sum(w.values()), 1) for n in names], height=0.4, label="production window")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of predictions")
    ax.set_title(f"Predicted labels (the {len(names)} most frequent)", fontsize=9)
    ax.legend(fontsize=8)
    paths = [_save(fig, folder / "labels.png")]
    for key, xlabel, name in (("lengths", "words per text", "lengths.png"),
                              ("confidences", "confidence of the predicted label", "confidence.png")):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        both = np.r_[reference[key], window[key]].astype(float)
        bins = np.histogram_bin_edges(both, bins=30) if len(both) else 10
        ax.hist(reference[key], bins=bins, density=True, alpha=0.55, label="test split (promotion)")
        ax.hist(window[key], bins=bins, density=True, alpha=0.55, label="production window")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
        paths.append(_save(fig, folder / name))
    return paths
