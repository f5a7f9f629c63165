"""Great Expectations: the one home of the teacher-output suites ("validate the teacher before distilling it").

Two suites run in an ephemeral GX context (no files, no network): ``teacher_outputs.rows`` on one row per
output and ``teacher_outputs.classes`` on one row per class. Thresholds come from the config. Data Docs HTML is
built into a folder either way; a failing suite raises ValidationFailed listing every failed expectation with
its observed value.
"""

from __future__ import annotations

import html
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from distillery.config import ValidationConfig
from distillery.errors import DistilleryError

ROW_COLUMNS = ["id", "split", "predicted_label", "all_finite", "prob_min", "prob_max", "prob_sum", "max_prob",
               "entropy_fraction", "val_correct", "answered"]
DOCS_SITE = "distillery_teacher_outputs"


class ValidationFailed(DistilleryError, RuntimeError):
    """Teacher outputs failed the suite: nothing may train on them."""

    def __init__(self, report: "ValidationReport"):
        self.report = report
        lines = "\n".join(f"  - {f['suite']}: {f['expectation']}({f['target']}): {f['observed']}" for f in report.failed)
        super().__init__(
            f"teacher outputs failed {len(report.failed)} of {report.evaluated} expectations; distillation stopped, "
            f"nothing registered.\n{lines}\nData Docs: {report.docs_index}\n"
            f"Fix the teacher (or its data), or adjust the validation.* thresholds if they are wrong."
        )


@dataclass
class ValidationReport:
    success: bool
    evaluated: int
    failed: list[dict] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)  # every expectation: suite, expectation, target, ok, observed
    statistics: dict[str, float] = field(default_factory=dict)
    docs_dir: str = ""
    docs_index: str = ""

    def summary(self) -> dict:
        return {"success": self.success, "evaluated": self.evaluated, "failed": self.failed,
                "statistics": self.statistics}


def _expectations(cfg: ValidationConfig, expected_rows: int, labels: list[str]) -> dict[str, list]:
    import great_expectations.expectations as gxe

    rows = [
        gxe.ExpectTableRowCountToEqual(value=expected_rows),
        gxe.ExpectTableColumnsToMatchSet(column_set=ROW_COLUMNS, exact_match=True),
        gxe.ExpectColumnValuesToNotBeNull(column="id"),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValuesToBeInSet(column="all_finite", value_set=[True]),
        gxe.ExpectColumnValuesToBeBetween(column="prob_min", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToBeBetween(column="prob_max", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToBeBetween(column="prob_sum", min_value=1.0 - cfg.prob_sum_tolerance,
                                          max_value=1.0 + cfg.prob_sum_tolerance),
        gxe.ExpectColumnValuesToBeInSet(column="predicted_label", value_set=list(labels)),
        gxe.ExpectColumnMeanToBeBetween(column="max_prob", min_value=cfg.min_mean_confidence,
                                        max_value=cfg.max_mean_confidence),
        gxe.ExpectColumnMeanToBeBetween(column="entropy_fraction", min_value=0.0,
                                        max_value=cfg.max_mean_entropy_fraction),
        gxe.ExpectColumnMeanToBeBetween(column="val_correct", min_value=cfg.min_teacher_accuracy, max_value=1.0),
        gxe.ExpectColumnMeanToBeBetween(column="answered", min_value=cfg.min_answered_share, max_value=1.0),
    ]
    classes = [
        gxe.ExpectTableRowCountToEqual(value=len(labels)),
        gxe.ExpectColumnValuesToBeBetween(column="predicted_count", min_value=cfg.min_predictions_per_class),
        gxe.ExpectColumnMeanToBeBetween(column="val_f1", min_value=cfg.min_teacher_macro_f1, max_value=1.0),
    ]
    return {"teacher_outputs.rows": rows, "teacher_outputs.classes": classes}


def _observed(result) -> str:  # noqa: ANN001 - a GX ExpectationValidationResult
    if result.exception_info and result.exception_info.get("raised_exception"):
        return f"error: {result.exception_info.get('exception_message')}"
    r = result.result or {}
    if "observed_value" in r:
        value = r["observed_value"]
        return f"observed {value:.4g}" if isinstance(value, float) else f"observed {value}"
    if r.get("unexpected_count"):
        return f"{r['unexpected_count']} unexpected rows, e.g. {r.get('partial_unexpected_list', [])[:5]}"
    return "failed"


def validate_teacher_outputs(rows: pd.DataFrame, classes: pd.DataFrame, labels: list[str], expected_rows: int,
                             cfg: ValidationConfig, docs_dir: Path, run_name: str = "teacher outputs") -> ValidationReport:
    """Run both suites through GX checkpoints with a Data Docs action; never raises for failed expectations.

    ``run_name`` (teacher version and snapshot) names the validation run in the Data Docs. Beside GX's own docs
    (which load their styles from a CDN) ``summary.html`` is written: one self-contained page that renders offline
    and in the MLflow artifact viewer.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    docs_dir = Path(docs_dir)
    context.add_data_docs_site(
        site_name=DOCS_SITE,
        site_config={"class_name": "SiteBuilder",
                     "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                     "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}},
    )
    source = context.data_sources.add_pandas("teacher_outputs")
    frames = {"teacher_outputs.rows": rows, "teacher_outputs.classes": classes}
    report = ValidationReport(success=True, evaluated=0)
    for suite_name, expectations in _expectations(cfg, expected_rows, labels).items():
        asset = source.add_dataframe_asset(suite_name.split(".")[1])
        batch = asset.add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=suite_name, data=batch, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=suite_name, validation_definitions=[definition], result_format="SUMMARY",
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])],
        ))
        outcome = checkpoint.run(batch_parameters={"dataframe": frames[suite_name]},
                                 run_id=RunIdentifier(run_name=f"{run_name}: {suite_name}"))
        for run_result in outcome.run_results.values():
            for result in run_result.results:
                report.evaluated += 1
                config = result.expectation_config
                entry = {"suite": suite_name, "expectation": config.type,
                         "target": config.kwargs.get("column", "table"), "observed": _observed(result)}
                report.results.append({**entry, "ok": bool(result.success)})
                if not result.success:
                    report.success = False
                    report.failed.append(entry)
    _name_classes(report.failed, classes, cfg)
    report.statistics = _statistics(rows, classes)
    report.docs_dir = str(docs_dir)
    report.docs_index = str(docs_dir / "index.html")
    docs_dir.mkdir(parents=True, exist_ok=True)
    (docs_dir / "summary.html").write_text(summary_html(report, run_name))
    (docs_dir / "summary.md").write_text(summary_markdown(report, run_name))
    return report


def _name_classes(failed: list[dict], classes: pd.DataFrame, cfg: ValidationConfig) -> None:
    """Name the classes behind a class-level failure, not just their values (in place)."""
    for failure in failed:
        if failure["target"] == "predicted_count":
            low = classes.loc[classes["predicted_count"] < cfg.min_predictions_per_class, "label"].tolist()
            failure["observed"] += f"; classes predicted too rarely: {low[:10]}"
        elif failure["target"] == "val_f1":
            worst = classes.nsmallest(5, "val_f1")[["label", "val_f1"]].round(3).values.tolist()
            failure["observed"] += f"; weakest classes: {worst}"


def _statistics(rows: pd.DataFrame, classes: pd.DataFrame) -> dict[str, float]:
    """What the suites looked at, as numbers logged beside the verdict."""
    return {
        "rows": float(len(rows)),
        "mean_confidence": float(rows["max_prob"].mean()) if len(rows) else math.nan,
        "mean_entropy_fraction": float(rows["entropy_fraction"].mean()) if len(rows) else math.nan,
        "teacher_val_accuracy": float(rows["val_correct"].mean()) if len(rows) else math.nan,
        "answered_share": float(rows["answered"].mean()) if len(rows) else math.nan,
        "teacher_val_macro_f1": float(classes["val_f1"].mean()),
        "min_predictions_per_class": float(classes["predicted_count"].min()),
    }


def summary_markdown(report: ValidationReport, run_name: str) -> str:
    verdict = "PASSED" if report.success else f"FAILED ({len(report.failed)} of {report.evaluated})"
    lines = [f"# Teacher outputs: {verdict}", "", run_name, "", "| suite | expectation | on | result | observed |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['suite']} | {r['expectation']} | {r['target']} | {'pass' if r['ok'] else '**FAIL**'} | "
              f"{r['observed']} |" for r in report.results]
    lines += ["", "| statistic | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in report.statistics.items()]
    return "\n".join(lines) + "\n"


def summary_html(report: ValidationReport, run_name: str) -> str:
    """One page, inline styles only: renders offline and inside MLflow's artifact viewer."""
    esc = html.escape
    verdict = "passed" if report.success else f"FAILED: {len(report.failed)} of {report.evaluated}"
    rows = "".join(
        f"<tr class={'ok' if r['ok'] else 'bad'}><td>{esc(r['suite'])}</td><td>{esc(r['expectation'])}</td>"
        f"<td>{esc(str(r['target']))}</td><td>{'pass' if r['ok'] else 'FAIL'}</td><td>{esc(str(r['observed']))}</td></tr>"
        for r in report.results)
    stats = "".join(f"<tr><td>{esc(k)}</td><td>{v:.4g}</td></tr>" for k, v in report.statistics.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Teacher outputs: {esc(verdict)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}}th{{background:#f0f0f0}}
tr.ok td:nth-child(4){{color:#1a7f37;font-weight:bold}}tr.bad td{{background:#fde8e8}}
tr.bad td:nth-child(4){{color:#b42318;font-weight:bold}}</style></head><body>
<h1>Teacher outputs: {esc(verdict)}</h1><p>{esc(run_name)}</p>
<table><tr><th>suite</th><th>expectation</th><th>on</th><th>result</th><th>observed</th></tr>{rows}</table>
<h2>Statistics</h2><table><tr><th>statistic</th><th>value</th></tr>{stats}</table>
<p>Full Great Expectations Data Docs: index.html in this folder.</p></body></html>
"""
