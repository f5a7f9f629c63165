"""A large transfer set (100,000 generated texts, tiny models) goes through labelling and distillation in bounded
memory: the outputs are written a chunk at a time and read back as arrays, token ids are arrays, and nothing holds a
Python object per row and class. Each run is a real `distillery distill` in its own process, whose peak resident
memory it reports itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers import LABELS, make_texts

# the child runs the CLI and writes its own peak RSS (Linux: ru_maxrss in KiB) where it is told
_MEASURED = """
import json, resource, sys
from distillery.cli import main
code = main(sys.argv[2:])
json.dump({"code": code, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, open(sys.argv[1], "w"))
"""


def generated_transfer(path: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` distinct in-domain texts no split holds: fixture templates with a numbered tail."""
    rng = np.random.default_rng(seed)
    pool = [t for label in LABELS for t in make_texts(label)]
    picks = rng.integers(0, len(pool), rows)
    path.write_text("text\n" + "".join(f"{pool[p]} ref {n}\n" for n, p in enumerate(picks)))
    return path


def measured_distill(project: Path, transfer: Path, tmp: Path) -> dict:
    from prefect.settings import get_current_settings

    report = tmp / f"{transfer.stem}.json"
    args = [sys.executable, "-c", _MEASURED, str(report), "distill", "--config", str(project / "distillery.yaml"),
            "--set", f"data.transfer_set={transfer}", "--set", "distill.max_steps=40",
            "--set", "distill.sweep.temperature=[]", "--set", "labelling.batch_size=256"]
    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}
    done = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0 and report.is_file(), done.stderr[-3000:]
    return json.loads(report.read_text())


def test_a_100k_row_transfer_set_is_labelled_and_distilled_in_bounded_memory(teacher_project: Path, tmp_path: Path):
    from distillery.config import load_config
    from distillery.models.labelling import read_outputs

    small = measured_distill(teacher_project, generated_transfer(tmp_path / "small.csv", 1_000), tmp_path)
    large = measured_distill(teacher_project, generated_transfer(tmp_path / "large.csv", 100_000), tmp_path)
    # the run went through (40 steps make a weak student: the gate may well reject it, exit 3)
    assert small["code"] in (0, 3) and large["code"] in (0, 3)
    # every generated text was labelled, checked and stored
    cfg = load_config(teacher_project / "distillery.yaml")
    stored = [read_outputs(p) for p in cfg.work.teacher_outputs.glob("*/outputs.parquet")]
    large_outputs = [o for o in stored if (o.frame["split"] == "transfer").sum() == 100_000]
    assert len(large_outputs) == 1 and large_outputs[0].logits.shape == (len(large_outputs[0]), len(LABELS))
    assert np.isfinite(large_outputs[0].logits).all()
    # 99,000 more texts: their strings, logits and token ids are tens of MB; the bound leaves room for the
    # allocator, not for a Python object per row and class or a second copy of every logit
    growth = large["peak_mib"] - small["peak_mib"]
    print(f"peak RSS: {small['peak_mib']:.0f} MiB at 1,000 transfer texts, {large['peak_mib']:.0f} MiB at 100,000")
    assert growth < 400, f"peak RSS grew {growth:.0f} MiB from 1,000 to 100,000 transfer texts"
