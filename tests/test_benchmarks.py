"""The seeds benchmark on tiny models: retrains distilled and baseline students per seed and reports the share of
the teacher-baseline gap recovered, as the issue defines it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_command

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_seeds_benchmark_reports_gap_recovered_per_seed(teacher_project: Path, tmp_path: Path):
    cfg_path = teacher_project / "distillery.yaml"
    assert run_command(cfg_path, overrides={"gate.champion_tolerance": 1.0}).decision.passed
    (tmp_path / "tiny.json").write_text(json.dumps({"ratios": {"served_over_teacher_accuracy": 0.9}}))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "seeds.py"), "--config", str(cfg_path),
                           "--name", "tiny", "--seeds", "3", "4", "--ablations", "defaults", "--out", str(tmp_path),
                           "--set", "distill.epochs=3", "--recipe", "temperature=3", "--recipe", "epochs=2"],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "tiny-seeds.json").read_text())
    assert results["seeds"] == [3, 4] and set(results["arms"]) == {"distilled", "baseline", "defaults"}
    assert results["overrides"] == {"distill.epochs": "3"}  # what every arm trained with, for the record
    # --recipe replaces those fields of the champion's recipe for the distilled arm only
    assert results["recipe"]["temperature"] == 3.0 and results["recipe"]["epochs"] == 2
    t = results["teacher"]["accuracy"]
    for arm in results["arms"].values():
        assert [r["seed"] for r in arm["runs"]] == [3, 4]
    s, b = (results["arms"][k]["accuracy"]["values"] for k in ("distilled", "baseline"))
    expected = [(si - bi) / (t - bi) for si, bi in zip(s, b)]
    assert results["kd_gap_recovered"]["values"] == pytest.approx(expected)
    ratios = json.loads((tmp_path / "tiny.json").read_text())["ratios"]
    assert ratios["served_over_teacher_accuracy"] == 0.9  # the file's other ratios are kept
    assert ratios["kd_seeds"] == 2 and ratios["kd_gap_recovered"] == pytest.approx(sum(expected) / 2)
    assert "distilled - baseline accuracy" in done.stdout
