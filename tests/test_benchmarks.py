"""The seeds benchmark on tiny models: retrains distilled and baseline students per seed and reports the share of
the teacher-baseline gap recovered, as the issue defines it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, run_command

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.usefixtures("prefect_harness")
def test_seeds_benchmark_reports_gap_recovered_per_seed(teacher_project: Path, tmp_path: Path):
    cfg_path = teacher_project / "distillery.yaml"
    assert run_command(cfg_path, overrides={"gate.champion_tolerance": 1.0}).decision.passed
    (tmp_path / "tiny.json").write_text(json.dumps({"ratios": {"served_over_teacher_accuracy": 0.9}}))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "seeds.py"), "--config", str(cfg_path),
                           "--name", "tiny", "--seeds", "3", "4", "--ablations", "defaults,only-vocab", "--out",
                           str(tmp_path), "--set", "distill.epochs=3", "--set", "data.augment.multiple=1",
                           "--recipe", "temperature=3", "--recipe", "epochs=2"],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "without a flow run id" not in done.stderr  # no Prefect warning about logs outside a flow
    results = json.loads((tmp_path / "tiny-seeds.json").read_text())
    assert results["seeds"] == [3, 4] and set(results["arms"]) == {"distilled", "baseline", "defaults", "only-vocab"}
    # what every arm trained with, for the record
    assert results["overrides"] == {"distill.epochs": "3", "data.augment.multiple": "1"}
    # a per-method arm remakes the transfer set with that method alone, at the same multiple
    arms = results["arms"]
    assert arms["distilled"]["transfer"]["methods"] == ["mask", "drop", "swap", "ngram"]
    assert arms["only-vocab"]["overrides"] == {"data.augment.methods": ["vocab"]}
    assert arms["only-vocab"]["transfer"]["methods"] == ["vocab"]
    assert arms["only-vocab"]["transfer"]["content_hash"] != arms["distilled"]["transfer"]["content_hash"]
    assert arms["only-vocab"]["transfer"]["rows"] > 0
    assert arms["only-vocab"]["minus_distilled_accuracy"]["values"] == pytest.approx(
        [a - d for a, d in zip(arms["only-vocab"]["accuracy"]["values"], arms["distilled"]["accuracy"]["values"])])
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
    # filed by student shape too (the profile's here: the tiny configs cut layer 0)
    assert ratios["kd_gap_recovered_by_shape"][results["shape"]]["mean"] == pytest.approx(sum(expected) / 2)
    assert "distilled - baseline accuracy" in done.stdout


def test_method_ablations_name_a_real_method_and_need_a_transfer_set():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from seeds import method_ablation

    methods = ("mask", "drop", "swap", "ngram")
    assert method_ablation("without-swap", methods, 1) == {"data.augment.methods": ["mask", "drop", "ngram"]}
    assert method_ablation("only-vocab", methods, 0.5) == {"data.augment.methods": ["vocab"]}
    assert method_ablation("with-vocab", methods, 1) == {"data.augment.methods": [*methods, "vocab"]}
    assert "already" in method_ablation("with-mask", methods, 1)
    assert "not an augmentation method" in method_ablation("only-synonym", methods, 1)
    assert "needs a transfer set" in method_ablation("without-mask", methods, 0)
    assert "needs it there" in method_ablation("without-vocab", methods, 1)  # not in the configured methods
    assert "another method beside it" in method_ablation("without-mask", ("mask",), 1)


@pytest.mark.usefixtures("prefect_harness")
def test_seeds_benchmark_search_picks_the_distilled_recipe(teacher_project: Path, tmp_path: Path):
    """--search runs the configured Optuna search first; its best trial is the distilled arm, and that arm's run at
    the search's seed is the best trial itself (same checkpoint, same validation score)."""
    import mlflow

    cfg_path = teacher_project / "distillery.yaml"
    made = run_command(cfg_path, overrides={"gate.champion_tolerance": 1.0})
    assert made.up_to_date is not None or made.decision.passed  # a champion to benchmark (maybe an earlier test's)
    seeds = [sys.executable, str(ROOT / "benchmarks" / "seeds.py"), "--config", str(cfg_path), "--name", "tiny",
             "--out", str(tmp_path), "--seeds", "13", "14"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*seeds, "--search", "--ablations", "defaults", "--set", "distill.search.trials=3",
                           "--set", "distill.search.parallel=1", "--set", "distill.search.epochs=[1, 2]",
                           "--set", "distill.seed=13"], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "without a flow run id" not in done.stderr  # no Prefect warning about logs outside a flow
    results = json.loads((tmp_path / "tiny-seeds.json").read_text())
    search = results["search"]
    assert search["seed"] == 13 and search["trials"] == 3 and len(search["trial_results"]) == 3
    finished = [t for t in search["trial_results"] if not t["pruned"]]
    best = max(finished, key=lambda t: t["val_macro_f1"])
    assert search["best_val_macro_f1"] == best["val_macro_f1"]
    assert results["recipe"] == search["best"] and search["best"]["trial"] == best["trial"]
    assert {k: best[k] for k in search["best"]} == search["best"]
    assert 1 <= search["best"]["epochs"] <= 2  # within the searched range, not distill.epochs
    runs = results["arms"]["distilled"]["runs"]
    assert [r["seed"] for r in runs] == [13, 14]
    assert runs[0]["val_macro_f1"] == pytest.approx(best["val_macro_f1"])  # seed 13 is the best trial's training
    # the defaults arm is distill.* as configured: what the search bought, paired by seed
    assert "minus_distilled_accuracy" in results["arms"]["defaults"]
    # the search is logged on the benchmark's parent run, as on a distill run
    mlflow.set_tracking_uri(f"sqlite:///{teacher_project / 'mlflow.db'}")
    parents = mlflow.search_runs(experiment_names=["distillery-benchmarks"],
                                 filter_string="params.`search.trials` = '3'")
    assert len(parents) == 1 and parents.iloc[0]["params.search.best_trial"] == str(best["trial"])
    # --search chooses the recipe: with --recipe, or with no trials to run, it stops before any training
    clash = subprocess.run([*seeds, "--search", "--recipe", "temperature=2", "--set", "distill.search.trials=3"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert clash.returncode == 2 and "leave out --recipe" in clash.stderr
    empty = subprocess.run([*seeds, "--search", "--set", "distill.search.trials=0"], capture_output=True, text=True,
                           timeout=300, env=env)
    assert empty.returncode == 2 and "give it trials" in empty.stderr


@pytest.mark.slow
def test_the_datasets_benchmark_runs_and_measures_each_data_set_apart(tmp_path: Path, tiny_teacher_dir: Path):
    """Two data sources, each in a project folder of its own: the whole run, the seeds, a table each and the mean."""
    from tests.conftest import make_project
    from tests.helpers import write_config, write_source

    root = make_project(tmp_path / "profile", tiny_teacher_dir)
    write_config(root, distill={"epochs": 3}, gate={"champion_tolerance": 1.0, "max_latency_ratio": 100.0})
    sources = [write_source(tmp_path / name) for name in ("intents-a", "intents-b")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_sets.py"), "--config",
                           str(root / "distillery.yaml"), "--profile", "tiny", "--data", *map(str, sources),
                           "--seeds", "3", "4", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                           "--set", "distill.epochs=2"], capture_output=True, text=True, timeout=1500,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    both = json.loads((tmp_path / "out" / "tiny-datasets.json").read_text())
    assert set(both["datasets"]) == {"intents-a", "intents-b"} and both["mean"]["datasets"] == 2
    for name in ("intents-a", "intents-b"):
        row = both["datasets"][name]
        assert row["gate_passed"] and set(row["arms"]) == {"distilled", "baseline"}
        ratios = json.loads((tmp_path / "out" / f"tiny-{name}.json").read_text())["ratios"]
        assert ratios["gate_passed"] is True and 0 < ratios["served_over_teacher_accuracy"]
        assert ratios["kd_seeds"] == 2 and "kd_minus_baseline_accuracy_std" in ratios
        # each data set in a store of its own, made from that source
        assert (tmp_path / "work" / f"tiny-{name}" / "mlflow.db").is_file()
    means = both["mean"]["arms"]
    assert means["distilled"] == pytest.approx(sum(both["datasets"][n]["arms"]["distilled"]["mean"]
                                                   for n in both["datasets"]) / 2)
    assert "== tiny on intents-a" in done.stdout and "== mean over 2 data sets (gate passed on 2)" in done.stdout


@pytest.mark.usefixtures("prefect_harness")
def test_teachers_benchmark_measures_the_endpoint_forms_and_a_budget_against_random(teacher_project: Path,
                                                                                    tmp_path: Path):
    """The registered teacher served by ``distillery serve`` as the endpoint arms; the budget arms ask exactly the
    required texts and a quarter of the generated ones; the cached re-run asks nothing; a second invocation adds an
    arm and keeps the seeds already measured."""
    cfg_path = teacher_project / "distillery.yaml"
    common = [sys.executable, str(ROOT / "benchmarks" / "teachers.py"), "--config", str(cfg_path), "--name", "tiny",
              "--seeds", "3", "4", "--out", str(tmp_path), "--port", str(free_port()), "--recipe", "temperature=2",
              *[f"--set={s}" for s in ("student.init=pretrained", "student.base_model=tiny-teacher",
                                       "distill.epochs=2", "data.augment.multiple=1",
                                       "validation.max_mean_entropy_fraction=1.0")]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*common, "--arms", "full,budget-diverse,budget-random"], capture_output=True, text=True,
                          timeout=900, env=env, cwd=teacher_project)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "tiny-teachers.json").read_text())
    assert results["recipe"]["temperature"] == 2.0 and results["recipe"]["feature_weight"] == 0.0  # one for all arms
    budget = results["budget"]
    assert budget["texts"] == budget["required_texts"] + budget["transfer_texts"] // 4
    assert f"asking {budget['transfer_texts'] // 4} of the {budget['transfer_texts']} generated" in done.stderr
    assert results["ratios"]["cached_rerun_requests"] == 0 and results["cached_rerun"]["asked_texts"] == 0
    assert results["ratios"]["selected_over_random_student_accuracy_at_budget"] == pytest.approx(
        results["arms"]["budget-diverse"]["accuracy"]["mean"] / results["arms"]["budget-random"]["accuracy"]["mean"])
    again = subprocess.run([*common, "--arms", "full,top1"], capture_output=True, text=True, timeout=900, env=env,
                           cwd=teacher_project)
    assert again.returncode == 0, again.stderr[-3000:]
    results = json.loads((tmp_path / "tiny-teachers.json").read_text())
    assert sorted((r["arm"], r["seed"]) for r in results["runs"]) == sorted(
        (arm, seed) for arm in ("full", "budget-diverse", "budget-random", "top1") for seed in (3, 4))
    assert "endpoint_top1_over_whitebox_student_accuracy" not in results["ratios"]  # no whitebox arm measured
    assert all(0.0 <= r["served_accuracy"] <= 1.0 for r in results["runs"])  # the served form (ONNX INT8) too
    assert results["arms"]["top1"]["served_accuracy"]["values"] == [r["served_accuracy"] for r in results["runs"]
                                                                    if r["arm"] == "top1"]


def test_the_monitoring_benchmark_runs_the_loop_and_resumes(teacher_project: Path, tmp_path: Path):
    """benchmarks/monitoring.py on a tiny champion: every stage measured (the served log's cost, calm windows, the
    shift's detection, the re-distillation on the shifted window, before and after, a large window monitored), the
    ratios written; a second invocation finds every stage done and measures nothing again."""
    from benchmarks.monitoring import texting

    assert texting("Why hasn't my card arrived yet?") == texting("Why hasn't my card arrived yet?") == \
        "y hsnt mah crd arrvd yt"
    cfg_path = teacher_project / "distillery.yaml"
    # force: another test of this module may already have made a champion from this teacher, data and config
    assert run_command(cfg_path, overrides={"gate.champion_tolerance": 1.0}, force=True).decision.passed
    out = tmp_path / "monitoring-tiny.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "monitoring.py"), "--config", str(cfg_path), "--name", "tiny",
               "--out", str(tmp_path),
               "--port", str(free_port()), "--calm-windows", "2", "--window-texts", "20", "--probe-texts", "20",
               "--shift-texts", "60", "--pairs", "20", "--monitor-texts", "300", "--set", "monitor.min_texts=20",
               "--set", "monitor.teacher_sample=20", "--set", "gate.production_min_texts=5",
               "--set", "gate.champion_tolerance=1.0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    stages, ratios = results["stages"], results["ratios"]
    assert set(stages) == {"log_cost", "calm", "detection", "redistill", "after", "monitor_large"}
    assert len(stages["calm"]["windows"]) == 2 and stages["detection"]["detection_delay_texts"] is not None
    assert stages["redistill"]["passed"] and stages["after"]["champion_after"] != results["champion_before"]
    assert stages["monitor_large"]["texts"] == 300 and ratios["monitor_seconds_300_texts"] > 0
    assert 0 < ratios["served_path_with_log_over_without"] < 10 and ratios["shifted_accuracy_after_over_before"] > 0
    again = subprocess.run(command, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(out.read_text())["stages"] == stages  # resumed: nothing measured twice
    # a re-distillation the gate rejects is a result too: the champion and the teacher measured alone
    results["stages"] = {k: v for k, v in stages.items() if k not in ("redistill", "after", "monitor_large")}
    out.write_text(json.dumps(results))
    rejecting = [*command[:-1], "gate.max_latency_ratio=0.0001"]  # no student is 10,000x faster than its teacher
    rejected = subprocess.run(rejecting, capture_output=True, text=True, timeout=1200,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert rejected.returncode == 0, rejected.stderr[-3000:]
    results = json.loads(out.read_text())
    after = results["stages"]["after"]
    assert not results["stages"]["redistill"]["passed"] and after["promoted"] is False and "after" not in after
    assert any("latency_vs_int8_teacher" in r for r in results["stages"]["redistill"]["gate"])
    assert {"before", "teacher"} <= set(after) and results["ratios"]["shifted_accuracy_after_over_before"] is None
    assert results["stages"]["monitor_large"]["texts"] == 300


def test_the_gpu_benchmark_trains_through_the_models_layer_repeats_a_seed_and_measures_the_fast_end(
        teacher_project: Path, tmp_path: Path):
    """benchmarks/gpu.py on the CPU (where it runs without a GPU too), its groups side by side in processes of their
    own: the default student's training from a run's snapshot and outputs twice with one seed (the CPU's weights
    repeat exactly); a cut of the student taught by the teacher and by the student of the same seed (the
    assistant); the static student's recipes on a second snapshot with a teacher fine-tuned there; each row where it
    belongs, the paired ratios from them."""
    run_command(teacher_project / "distillery.yaml", "label")
    snapshot = next((teacher_project / ".distillery" / "snapshots").iterdir())
    outputs = next((teacher_project / ".distillery" / "teacher-outputs").glob("*/outputs.parquet"))
    out = tmp_path / "gpu-cuts.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--snapshot", str(snapshot),
                           "--outputs", str(outputs), "--student", str(teacher_project / "tiny-teacher"),
                           "--device", "cpu", "--max-steps", "2", "--groups", "first,cuts-s13,static-second",
                           "--only", "bf16-det-s13,bf16-det-s13-again", "--parallel",
                           "--cuts", "0", "--cut-recipe", "epochs=2", "--second-snapshot", str(snapshot),
                           "--static-hidden", "16", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    runs = {r["name"]: r for r in results["students"]}
    assert {"full-s13", "cut1-teacher-s13", "cut1-assistant-s13", f"teacher-{snapshot.name}"} <= set(runs)
    assert {f"static-{r}-s{s}" for r in ("default", "soft", "baseline") for s in (13, 14, 15)} <= set(runs)
    assert runs["cut1-assistant-s13"]["recipe"] == {"epochs": 2} and runs["cut1-teacher-s13"]["steps"] == 2
    assert runs["cut1-assistant-s13"]["weights"] != runs["cut1-teacher-s13"]["weights"]  # other soft labels
    ratios = results["ratios"]
    assert ratios["cut1_assistant_minus_teacher"][0] == pytest.approx(
        runs["cut1-assistant-s13"]["test_accuracy"] - runs["cut1-teacher-s13"]["test_accuracy"], abs=1e-4)
    assert {"static-soft_minus_baseline", "static-default_minus_baseline", "full_test_accuracy"} <= set(ratios)
    assert not list(tmp_path.glob("gpu-cuts.json.*"))  # the parts merged
    repeats = [runs["bf16-det-s13"], runs["bf16-det-s13-again"]]
    assert all(r["device"] == "cpu" and r["steps"] == 2 and r["finite"] for r in repeats)  # no bf16 on a CPU
    assert ratios["bf16_repeats_bit_identical"] is True and "teacher" not in results  # the rest of first skipped


def test_a_models_remeasure_keeps_the_seed_ratios_of_its_results_file(tmp_path: Path):
    """benchmarks/run.py (--models-only too) rewrites <name>.json; seeds.py's kd_* ratios in it are kept, its own
    ratios replaced."""
    from benchmarks.run import with_seed_ratios

    out = tmp_path / "default.json"
    assert with_seed_ratios(out, {"a": 1}) == {"a": 1}
    out.write_text(json.dumps({"ratios": {"kd_gap_recovered": 0.4, "kd_seeds": 3, "a": 0, "stale": 2}}))
    assert with_seed_ratios(out, {"a": 1}) == {"kd_gap_recovered": 0.4, "kd_seeds": 3, "a": 1}
