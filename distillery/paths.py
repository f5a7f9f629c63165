"""The catalog of the work folder (``runtime.workdir``): every folder distillery writes there is named here, once.

Tasks, runners, ``gc`` and the benchmarks ask this catalog for a path; none spells a folder name of its own. A kind is
either collected by ``gc`` (what no run needs any more goes, per ``runtime.keep_runs``) or listed in ``KEPT`` with
the reason; a test fails when a kind is neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# kinds gc collects: one entry (a folder or file) per run, model, data version or cache key
COLLECTED = (
    "checkpoints",      # resumable training state, per (teacher or student) configuration key
    "students",         # each distillation run's trained students, by MLflow run id
    "teachers",         # fine-tuned teachers, by MLflow run id
    "imports",          # imported teachers, by source hash (``.fetch-*``: downloads in progress)
    "registry",         # registered versions downloaded from the registry, ``<name>-v<version>``
    "onnx",             # teachers exported to ONNX Runtime for the harness, per teacher version
    "teacher-outputs",  # soft labels cached by (teacher, data, rows); ``labelling.cache_dir`` may move it
    "data-docs",        # Great Expectations Data Docs, per labelling run
    "snapshots",        # frozen data snapshots, by DVC md5
    "pretrained",       # packaged base models made whole from their wheels (re-made in seconds)
)
# kinds gc never touches, and why
KEPT = {
    "locks": "held by running commands: deleting a lock file would let a second distillation in",
    "dvc-remote": "the default local DVC remote (dvc.remote_url): every data version pushed, the only copy of some",
    "teacher-answers": "a black-box teacher's answers (teacher.kind: endpoint), each paid for once: asking again "
                       "costs money, so only a person deletes them",
    "benchmark-teachers": "benchmarks/teachers.py's budget arms, each a work folder of its own (its answers asked "
                          "once, its students): the benchmark resumes from them",
}


@dataclass(frozen=True)
class WorkFolder:
    """The work folder of one project: ``root`` (``runtime.workdir``) and the teacher-outputs cache
    (``labelling.cache_dir``), which a project may keep elsewhere (a shared disk)."""

    root: Path
    outputs_cache: Path

    def kind(self, kind: str) -> Path:
        """The folder of one kind (one of ``COLLECTED`` or ``KEPT``)."""
        if kind not in COLLECTED and kind not in KEPT:
            raise KeyError(f"{kind!r} is not a work-folder kind: add it to distillery/paths.py (COLLECTED or KEPT)")
        return self.outputs_cache if kind == "teacher-outputs" else self.root / kind

    @property
    def checkpoints(self) -> Path:
        return self.kind("checkpoints")

    @property
    def students(self) -> Path:
        return self.kind("students")

    @property
    def teachers(self) -> Path:
        return self.kind("teachers")

    @property
    def imports(self) -> Path:
        return self.kind("imports")

    @property
    def registry(self) -> Path:
        return self.kind("registry")

    @property
    def onnx(self) -> Path:
        return self.kind("onnx")

    @property
    def teacher_outputs(self) -> Path:
        return self.kind("teacher-outputs")

    @property
    def data_docs(self) -> Path:
        return self.kind("data-docs")

    @property
    def snapshots(self) -> Path:
        return self.kind("snapshots")

    @property
    def pretrained(self) -> Path:
        return self.kind("pretrained")

    @property
    def teacher_answers(self) -> Path:
        return self.kind("teacher-answers")

    @property
    def locks(self) -> Path:
        return self.kind("locks")

    def collected(self) -> dict[str, Path]:
        """Every kind gc collects, with its folder."""
        return {kind: self.kind(kind) for kind in COLLECTED}
