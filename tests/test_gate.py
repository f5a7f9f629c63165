"""The gate's pure decision logic."""

from __future__ import annotations

from distillery.models.gate import decide

RULES = dict(accuracy_tolerance=0.02, macro_f1_tolerance=0.02, max_latency_ratio=0.5, max_class_f1_drop=0.2,
             champion_tolerance=0.005)
TEACHER = {"accuracy": 0.92, "macro_f1": 0.91, "latency_p50_ms": 10.0, "per_class_f1": [0.9, 0.9, 0.9]}
INT8 = {"accuracy": 0.91, "macro_f1": 0.90, "latency_p50_ms": 6.0, "per_class_f1": [0.9, 0.9, 0.9]}


def student(**changes):
    return {"accuracy": 0.90, "macro_f1": 0.89, "latency_p50_ms": 2.0, "per_class_f1": [0.85, 0.9, 0.88], **changes}


def test_a_good_student_passes_every_criterion():
    decision = decide(student(), INT8, TEACHER, None, **RULES)
    assert decision.passed and [c.name for c in decision.criteria] == [
        "accuracy_vs_int8_teacher", "macro_f1_vs_int8_teacher", "latency_vs_int8_teacher", "per_class_f1_drop"]


def test_every_failed_criterion_is_reported():
    decision = decide(student(accuracy=0.80, latency_p50_ms=3.5, per_class_f1=[0.5, 0.9, 0.9]), INT8, TEACHER, None,
                      labels=["a", "b", "c"], **RULES)
    assert not decision.passed
    assert {c.name for c in decision.failed} == {"accuracy_vs_int8_teacher", "latency_vs_int8_teacher",
                                                 "per_class_f1_drop"}
    assert any("worst: a" in r and r.startswith("FAIL") for r in decision.reasons())


def test_tolerance_boundary_is_inclusive():
    assert decide(student(accuracy=0.89), INT8, TEACHER, None, **RULES).passed
    assert not decide(student(accuracy=0.8899), INT8, TEACHER, None, **RULES).passed


def test_champion_must_not_be_beaten():
    assert decide(student(), INT8, TEACHER, {"accuracy": 0.903}, **RULES).passed
    decision = decide(student(), INT8, TEACHER, {"accuracy": 0.95}, **RULES)
    assert not decision.passed and [c.name for c in decision.failed] == ["accuracy_vs_champion"]


def test_on_held_out_production_texts_the_student_must_agree_with_the_teacher_as_the_champion_does():
    """The criterion exists with a champion measured on the hold-out and enough texts; the bar is the champion's
    agreement less the tolerance; too few texts, no champion or no hold-out: not judged."""
    champion, rules = {"accuracy": 0.88}, {**RULES, "production_min_texts": 30, "production_tolerance": 0.02}
    ahead = decide(student(production_agreement=0.85, production_texts=40), INT8, TEACHER, champion,
                   champion_production=0.80, **rules)
    criterion = next(c for c in ahead.criteria if c.name == "production_agreement_vs_champion")
    assert ahead.passed and criterion.threshold == 0.78 and "40 held-out production texts" in criterion.rule
    behind = decide(student(production_agreement=0.77, production_texts=40), INT8, TEACHER, champion,
                    champion_production=0.80, **rules)
    assert [c.name for c in behind.failed] == ["production_agreement_vs_champion"]
    for few in (decide(student(production_agreement=0.1, production_texts=29), INT8, TEACHER, champion,
                       champion_production=0.80, **rules),
                decide(student(production_agreement=0.1, production_texts=40), INT8, TEACHER, None,
                       champion_production=0.80, **rules),
                decide(student(), INT8, TEACHER, champion, champion_production=0.80, **rules)):
        assert few.passed and "production_agreement_vs_champion" not in {c.name for c in few.criteria}


def test_latency_is_judged_on_interleaved_pairs_when_measured():
    """A student whose p50 was taken while the machine was loaded (35 ms) but whose paired ratio says it is 3x faster
    passes; a paired ratio above the limit fails even when the separate p50s look fine."""
    loaded = student(latency_p50_ms=35.0, latency_ratio_paired=0.33)
    decision = decide(loaded, INT8, TEACHER, None, **RULES)
    latency = next(c for c in decision.criteria if c.name == "latency_vs_int8_teacher")
    assert decision.passed and latency.observed == 0.33 and "interleaved" in latency.rule
    slow = decide(student(latency_p50_ms=1.0, latency_ratio_paired=0.7), INT8, TEACHER, None, **RULES)
    assert [c.name for c in slow.failed] == ["latency_vs_int8_teacher"]


def test_paired_latency_ratio_holds_under_a_changing_load():
    """Two fake models (1 ms and 3 ms of sleep); halfway through, every call gets 20 ms slower for a while (a busy
    machine): separate medians would move, the median of paired ratios stays near 1/3."""
    import time

    import torch

    from distillery.models.evaluation import TimingSettings, paired_latency_ratio
    from distillery.models.training import Encoded

    class Fake:
        calls = 0

        def __init__(self, seconds):
            self.seconds = seconds

        def __call__(self, input_ids, attention_mask):
            Fake.calls += 1
            busy = 40 <= Fake.calls < 80  # a load spike covering both models' calls alike
            time.sleep(self.seconds + (0.02 if busy else 0.0))

    data = Encoded.from_rows([[1, 2, 3]] * 8, torch.zeros(8, dtype=torch.long))
    result = paired_latency_ratio(Fake(0.001), data, 0, Fake(0.003), data, 0,
                                  TimingSettings(warmup=2, repeats=60))
    assert 0.2 < result["latency_ratio_paired"] < 0.5


def test_the_reference_is_the_quantised_teacher_with_the_best_validation_accuracy():
    from distillery.models.gate import best_reference

    metrics = {"teacher_int8": {"val_accuracy": 0.85}, "teacher_int8_onnx": {"val_accuracy": 0.92}}
    assert best_reference(metrics, "int8") == "teacher_int8_onnx"  # torch INT8 broke this teacher: not the bar
    metrics["teacher_int8"]["val_accuracy"] = 0.95
    assert best_reference(metrics, "onnx-int8") == "teacher_int8"
    metrics["teacher_int8"]["val_accuracy"] = 0.92  # a tie goes to the student's own runtime
    assert best_reference(metrics, "int8") == "teacher_int8"
    assert best_reference(metrics, "onnx-int8") == "teacher_int8_onnx"
    assert best_reference({"teacher_int8": {"accuracy": 0.9}}, "int8") == "teacher_int8"  # no validation figures


def test_smallest_passing_student_is_chosen():
    from distillery.models.gate import choose_smallest
    from distillery.records import Decision

    sizes = {"student": 5.0, "cut0": 3.0, "h128x1": 1.0}
    ok, no = Decision(passed=True), Decision(passed=False)
    assert choose_smallest({"student": ok, "cut0": ok, "h128x1": no}, sizes) == "cut0"
    assert choose_smallest({"student": ok, "cut0": ok, "h128x1": ok}, sizes) == "h128x1"
    assert choose_smallest({"student": no, "cut0": no, "h128x1": no}, sizes) == "student"  # its reasons are the run's
    assert choose_smallest({"student": ok, "cut0": no}, sizes) == "student"


def test_pareto_frontier_and_its_table():
    from distillery.models.report import frontier_table, pareto

    def m(acc, ms, mb):
        return {"accuracy": acc, "latency_p50_ms": ms, "size_mb": mb, "latency_p95_ms": ms, "throughput_rps": 1.0,
                "parameters": 1e6}

    metrics = {"teacher_fp32": m(0.93, 5.0, 90.0), "teacher_int8": m(0.92, 3.0, 25.0), "student_int8": m(0.91, 1.0, 16),
               "slow_big_worse": m(0.90, 4.0, 30.0), "cut0_int8": m(0.85, 0.5, 10.0)}
    assert pareto(metrics) == {"teacher_fp32", "teacher_int8", "student_int8", "cut0_int8"}
    table = frontier_table(metrics, ("student_int8", "cut0_int8"), "teacher_int8").splitlines()
    assert table[2].startswith("cut0_int8") and table[2].endswith("* contender")  # smallest first
    assert next(r for r in table if r.startswith("student_int8")).endswith("* served")
    assert next(r for r in table if r.startswith("teacher_int8")).endswith("* reference")
    assert next(r for r in table if r.startswith("slow_big_worse")).endswith("  ")


def _decision(passed: bool, passing: dict | None = None, **gaps) -> "Decision":  # noqa: F821 - imported inside
    """A decision whose failed criteria are ``name=(observed, threshold)`` and passed ones ``passing``."""
    from distillery.records import Decision

    criteria = [{"name": name, "passed": False, "observed": o, "threshold": t, "rule": ""} for name, (o, t) in
                gaps.items()]
    criteria += [{"name": name, "passed": True, "observed": o, "threshold": t, "rule": ""} for name, (o, t) in
                 (passing or {"per_class_f1_drop": (0.1, 0.25)}).items()]
    return Decision(passed=passed, criteria=tuple(criteria))


def test_the_baseline_is_promoted_only_when_it_should_be():
    from distillery.models.gate import choose_candidate

    ok, bad = _decision(True), _decision(False, accuracy_vs_int8_teacher=(0.90, 0.91))
    sizes = {"student": 12.0, "cut0-2": 5.0, "baseline": 12.0}
    better_base = {"student": 0.93, "cut0-2": 0.90, "baseline": 0.94}
    # fallback (default): the distilled student whenever it passes, the baseline when nothing distilled passes
    assert choose_candidate({"student": ok, "baseline": ok}, sizes, better_base, "best", "fallback") == "student"
    assert choose_candidate({"student": bad, "baseline": ok}, sizes, better_base, "best", "fallback") == "baseline"
    assert choose_candidate({"student": bad, "baseline": bad}, sizes, better_base, "best", "fallback") == "student"
    # compete: also when it beats the distilled student of its shape on validation accuracy
    assert choose_candidate({"student": ok, "baseline": ok}, sizes, better_base, "best", "compete") == "baseline"
    assert choose_candidate({"student": ok, "baseline": ok}, sizes, {**better_base, "baseline": 0.93}, "best",
                            "compete") == "student"  # a tie is the distilled student's
    # under smallest a smaller passing distilled student stays chosen; off never picks the baseline
    both = {"student": ok, "cut0-2": ok, "baseline": ok}
    assert choose_candidate(both, sizes, better_base, "smallest", "compete") == "cut0-2"
    assert choose_candidate({"student": bad, "baseline": ok}, sizes, better_base, "best", "off") == "student"


def test_when_everything_fails_the_closest_one_and_its_knobs_are_named():
    from distillery.models.gate import closest_miss

    decisions = {"student": _decision(False, accuracy_vs_int8_teacher=(0.9540, 0.9589),
                                      oos_recall_vs_teacher=(0.69, 0.747)),
                 "minilm": _decision(False, accuracy_vs_int8_teacher=(0.9584, 0.9589)),
                 "baseline": _decision(False, accuracy_vs_int8_teacher=(0.9570, 0.9589))}
    served = {k: f"{k}_int8_onnx" for k in decisions}
    message = closest_miss(decisions, served, {"minilm": "make it the student: --set student.prune_vocab=false"})
    assert message.startswith("closest to passing: minilm_int8_onnx (accuracy_vs_int8_teacher 0.9584 vs bar 0.9589 "
                              "(0.0005 short))")
    assert "--set student.prune_vocab=false" in message and "gate.accuracy_tolerance (this run needs 0.0005 more)" \
        in message
    only_baseline = closest_miss({"student": decisions["student"], "baseline": decisions["baseline"]}, served, {})
    assert "baseline_int8_onnx" in only_baseline and "distillation is not what helps" in only_baseline
    # closest on the bars but less accurate than the distilled student: said so, no claim that distillation lost
    weaker = {"student": _decision(False, {"accuracy_vs_int8_teacher": (0.8214, 0.7833)},
                                   per_class_f1_drop=(0.65, 0.25)),
              "baseline": _decision(False, {"accuracy_vs_int8_teacher": (0.7847, 0.7833)},
                                    per_class_f1_drop=(0.30, 0.25))}
    message = closest_miss(weaker, served, {})
    assert message.startswith("closest to passing: baseline_int8_onnx") and "distillation is not" not in message
    assert "the best distilled student is more accurate (0.8214 against 0.7847)" in message
    # against a black box as served: the criterion is named for it, and the same knob moves it
    served_teacher = {"student": _decision(False, accuracy_vs_served_teacher=(0.80, 0.85)),
                      "baseline": _decision(False, accuracy_vs_served_teacher=(0.81, 0.85))}
    message = closest_miss(served_teacher, served, {})
    assert "accuracy_vs_served_teacher 0.8100 vs bar 0.8500" in message and "distillation is not what helps" in message
    assert "gate.accuracy_tolerance (this run needs 0.0400 more)" in message


def test_the_criteria_against_the_reference_are_named_for_it():
    from distillery.models.gate import reference_key

    assert [reference_key(r) for r in ("teacher_int8", "teacher_int8_onnx", "teacher_endpoint", "teacher_m1_int8")] \
        == ["int8_teacher", "int8_teacher", "served_teacher", "best_member"]
    decision = decide(student(), INT8, TEACHER, None, reference_name="endpoint teacher",
                      reference_key="served_teacher", **RULES)
    assert [c.name for c in decision.criteria][:3] == [
        "accuracy_vs_served_teacher", "macro_f1_vs_served_teacher", "latency_vs_served_teacher"]


def test_the_promotion_reason_reads_short_first():
    """The alias history shows the start of the reason: what was served, how many criteria, then the notes (the
    baseline's note when it ships), then each criterion."""
    from distillery.models.gate import promotion_reason
    from distillery.records import Decision

    criteria = decide(student(), INT8, TEACHER, None, **RULES).reasons()
    note = "the hard-label baseline is promoted: distillation did not beat training the student alone"
    reason = promotion_reason(Decision(passed=True, reasons=(*criteria, "policy smallest", note)), "baseline_int8_onnx")
    assert reason.startswith("baseline_int8_onnx passed the gate (4 criteria); policy smallest; " + note)
    assert reason.endswith(criteria[-1]) and all(c in reason for c in criteria)


def test_an_alias_move_fits_its_tag_whatever_the_script_of_its_reason():
    """A reason is cut at 2,000 characters and stored as written: escaped, 2,000 characters of another script would
    be 12,000 and MLflow refuses a tag value over 5,000, which would stop the move."""
    from distillery.records import AliasMove

    move = AliasMove("2026-12-03T07:00:00.000000Z", "champion", "1", "2", "rollback", "a@b", "カナリア" * 1000)
    key, value = move.to_tag()
    assert len(value) <= 5000 and AliasMove.from_tag(key, value).reason == ("カナリア" * 1000)[:2000]
