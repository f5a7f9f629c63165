"""`gate.approval: manual`: a student that passes waits, registered but not serving, until someone answers (the
paused Prefect flow run resumed with an answer, as `distillery promote --approve/--refuse` does); a refusal or no
answer in time leaves the champion alone, an approval moves the alias through the same crash-safe path."""

from __future__ import annotations

import threading
import time

import pytest

from tests.helpers import run_command


def distill_waiting(project, overrides: dict, answer=None):  # noqa: ANN001, ANN201 - (RunResult, answer dict)
    """Run a distillation that will wait for approval in a thread; ``answer(cfg)`` once a version awaits."""
    from distillery.config import load_config
    from distillery.integrations import registry
    from distillery.records import APPROVAL_STATE_TAG, AWAITING

    cfg = load_config(project / "distillery.yaml", overrides)
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(result=run_command(
        project / "distillery.yaml", overrides={**overrides}, force=True)))
    worker.start()
    given = None
    if answer is not None:
        registry.configure_tracking(cfg)
        reg = registry.Registry.from_config(cfg)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and worker.is_alive():
            if any(v.tags.get(APPROVAL_STATE_TAG) == AWAITING for v in reg.versions("student")):
                given = answer(cfg)
                break
            time.sleep(1)
    worker.join(600)
    assert not worker.is_alive() and "result" in out, "the distillation did not finish"
    return out["result"], given


def test_a_passing_student_waits_for_approval_and_only_an_approval_moves_the_champion(teacher_project):
    from distillery.commands.admin import alias_moves, answer_approval
    from distillery.config import load_config
    from distillery.integrations import registry
    from distillery.models.gate import GateError

    manual = {"gate.approval": "manual", "gate.approval_timeout_s": 300}
    cfg = load_config(teacher_project / "distillery.yaml")
    registry.configure_tracking(cfg)
    reg = registry.Registry.from_config(cfg)
    before = reg.alias_version("student", "champion")

    refused, answer = distill_waiting(teacher_project, manual, lambda c: answer_approval(c, None, False, "not on a Friday"))
    assert answer["approval"] == "refused" and answer["decision"] == "rejected"
    assert not refused.decision.passed and "approval refused" in refused.decision.reasons[-1]
    assert reg.alias_version("student", "champion") == before or (
        before is not None and reg.alias_version("student", "champion").version == before.version)
    tags = reg.version("student", refused.decision.version).tags
    assert tags["approval.reason"] == "not on a Friday" and tags["gate.decision"] == "rejected"

    approved, answer = distill_waiting(teacher_project, manual, lambda c: answer_approval(c, None, True, "looks good"))
    assert approved.decision.passed and answer["approval"] == "approved"
    assert answer["champion"] == approved.decision.version == answer["version"]
    last = alias_moves(cfg)["moves"][-1]
    assert last["to_version"] == approved.decision.version and "approved by" in last["by"] and "looks good" in last["reason"]

    timed_out, _ = distill_waiting(teacher_project, {**manual, "gate.approval_timeout_s": 3})
    assert not timed_out.decision.passed and "approval timed out" in timed_out.decision.reasons[-1]
    assert str(reg.alias_version("student", "champion").version) == approved.decision.version
    assert reg.version("student", timed_out.decision.version).tags["approval.state"] == "timed_out"

    with pytest.raises(GateError, match="no version of student awaits approval"):
        answer_approval(cfg, None, True, "late")


def test_an_answer_that_comes_before_the_run_has_paused_waits_for_the_pause(prefect_harness):
    """The run tags its version awaiting just before it pauses: an answer in between is held until the pause (the
    race CI met), and a run that ended unpaused is reported as such instead of waited on."""
    from prefect import flow
    from prefect.flow_runs import pause_flow_run
    from prefect.input import RunInput

    from distillery.commands.admin import _resume_paused

    class Answer(RunInput):
        approve: bool

    seen: dict = {}

    @flow
    def waits_then_pauses(delay: float) -> bool:
        from prefect.context import FlowRunContext

        seen["id"] = FlowRunContext.get().flow_run.id
        time.sleep(delay)
        return pause_flow_run(wait_for_input=Answer, timeout=60, poll_interval=1).approve

    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(answer=waits_then_pauses(3.0)))
    worker.start()
    while "id" not in seen and worker.is_alive():
        time.sleep(0.05)
    assert _resume_paused(seen["id"], {"approve": True})  # still running: three seconds from its pause
    worker.join(60)
    assert out.get("answer") is True
    assert not _resume_paused(seen["id"], {"approve": False}, grace_s=5)  # it ended: no pause to answer
