"""The frontier plot's labels: each beside its own marker, none over another label or marker where there is room."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from distillery.models.report import _place_labels, plot_frontier  # noqa: E402


def _boxes(fig, ax):
    """Each label's text (its leader line left out)."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [Text.get_window_extent(t, renderer) for t in ax.texts]


def test_crowded_labels_overlap_neither_each_other_nor_markers():
    fig, ax = plt.subplots(figsize=(8, 5.2))
    # four points a few pixels apart: the first place (upper right) collides for all but the first
    points = [(f"candidate_{i}_int8_onnx\n{10 + i}.0 MB", 1.0 + 0.02 * i, 0.92 + 0.0005 * i, 60.0) for i in range(4)]
    for _, x, y, area in points:
        ax.scatter(x, y, s=area)
    ax.set_xscale("log")
    ax.set_xlim(0.1, 100)
    ax.set_ylim(0.85, 0.95)
    fig.tight_layout()
    _place_labels(fig, ax, points)
    boxes = _boxes(fig, ax)
    assert len(boxes) == 4
    assert all(t.arrow_patch is not None for t in ax.texts)  # each joined to its own marker by a leader
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    pixels = fig.dpi / 72.0
    for box in boxes:  # no label covers any marker's circle's bounding square
        for _, x, y, area in points:
            cx, cy = ax.transData.transform((x, y))
            r = area ** 0.5 / 2 * pixels
            assert not (box.x0 < cx + r and cx - r < box.x1 and box.y0 < cy + r and cy - r < box.y1)
    # each label stays beside its own marker: its nearest corner within a few marker radii
    for box, (_, x, y, area) in zip(boxes, points):
        cx, cy = ax.transData.transform((x, y))
        dx = 0 if box.x0 <= cx <= box.x1 else min(abs(cx - box.x0), abs(cx - box.x1))
        dy = 0 if box.y0 <= cy <= box.y1 else min(abs(cy - box.y0), abs(cy - box.y1))
        assert max(dx, dy) < 3 * (area ** 0.5 / 2 * pixels) + 40
    plt.close(fig)


def test_frontier_plot_names_every_form(tmp_path: Path):
    metrics = {name: {"latency_p50_ms": lat, "accuracy": acc, "size_mb": mb} for name, lat, acc, mb in [
        ("teacher_fp32", 50.0, 0.94, 438.0), ("teacher_int8_onnx", 9.0, 0.928, 110.0),
        ("student_int8_onnx", 1.0, 0.926, 12.3), ("minilm_int8_onnx", 1.1, 0.9285, 23.1),
        ("baseline_fp32", 7.5, 0.92, 47.7)]}
    path = plot_frontier(metrics, tmp_path / "frontier.png", served="student_int8_onnx", reference="teacher_int8_onnx")
    assert path.stat().st_size > 10_000
    barred = plot_frontier(metrics, tmp_path / "barred.png", served="student_int8_onnx", reference="teacher_int8_onnx",
                           accuracy_tolerance=0.01)  # the gate's bar is drawn (and named in the legend)
    assert barred.read_bytes() != path.read_bytes()


def test_a_black_box_teacher_is_tabled_plotted_and_priced_without_a_size(tmp_path: Path):
    """A black-box teacher has no size or parameter count here: the tables show a dash, the frontier plot draws it
    as the smallest marker, and the ratios say what the student saves per request and what 1,000 answers cost."""
    import math

    from distillery.models.report import frontier_table, headline_ratios, results_table

    def row(accuracy: float, p50: float, size: float, **extra) -> dict:
        return {"accuracy": accuracy, "macro_f1": accuracy, "ece": 0.1, "agreement": 1.0, "latency_p50_ms": p50,
                "latency_p95_ms": p50 * 1.2, "throughput_rps": 100.0, "parameters": size * 1e6 / 4, "size_mb": size,
                "val_accuracy": accuracy, **extra}

    metrics = {"teacher_endpoint": row(0.95, 250.0, math.nan, cost_per_1k_texts=2.5),
               "student_fp32": row(0.93, 5.0, 90.0), "student_int8": row(0.93, 2.5, 23.0),
               "baseline_fp32": row(0.90, 5.0, 90.0)}
    table = results_table(metrics)
    assert "nan" not in table and table.splitlines()[2].split()[-1] == "-"
    assert "nan" not in frontier_table(metrics, ("student_int8",), "teacher_endpoint")
    ratios = headline_ratios(metrics, "student_int8", "teacher_endpoint")
    assert ratios["endpoint_request_over_served_latency"] == 100.0 and ratios["reference_cost_per_1k_texts"] == 2.5
    assert ratios["served_over_teacher_accuracy"] == 0.93 / 0.95
    assert plot_frontier(metrics, tmp_path / "frontier.png", served="student_int8", reference="teacher_endpoint").is_file()


def test_fast_end_ratios_take_the_fastest_passing_and_the_fastest_static_student():
    from distillery.models.report import fast_end_ratios

    metrics = {"student_int8_onnx": {"latency_ratio_paired": 0.2},
               "minilm-cut0-5-pv_int8_onnx": {"latency_ratio_paired": 0.08},
               "static256_int8_onnx": {"latency_ratio_paired": 0.01},
               "teacher_int8_onnx": {}}
    # the 2-layer cut and the static student failed the gate: the fastest passing one is the 6-layer student
    assert fast_end_ratios(metrics, ["student_int8_onnx"]) == {
        "fastest_passing_over_reference_latency_paired": 0.2, "static_over_reference_latency_paired": 0.01}
    assert fast_end_ratios(metrics, ["student_int8_onnx", "static256_int8_onnx"])[
        "fastest_passing_over_reference_latency_paired"] == 0.01
    assert fast_end_ratios({"student_int8_onnx": {"latency_ratio_paired": 0.2}}, []) == {}  # none passing, none static
