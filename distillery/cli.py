"""``distillery``: the command line. Each subcommand runs a flow (or reads the registry) with one config."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import textwrap
import threading
import traceback
from typing import Any, Callable

from distillery.config import load_config, parse_override_args
from distillery.errors import DistilleryError

EPILOG = """\
Configuration: distillery.yaml in the current folder (or --config FILE, or $DISTILLERY_CONFIG);
override any key with --set section.key=value, e.g. --set distill.temperature=2 --set teacher.epochs=1.
Servers: set PREFECT_API_URL and MLFLOW_TRACKING_URI (or tracking.uri) to use running servers;
without them everything runs embedded (temporary Prefect server, MLflow on SQLite, DVC remote in a folder).
"""


def environment_defaults() -> None:
    """Offline, quiet defaults for this process (the user's own settings win)."""
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # the temporary server's first start in a fresh PREFECT_HOME migrates its database: 20-35 s on 2 cores,
        # over Prefect's own 20 s limit
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "distillery",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # a line logged outside a flow goes to the console only
        "GIT_PYTHON_REFRESH": "quiet",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Writing model shards" bars; training bars stay
        # a down tracking server answers within seconds; the registry adapter then retries with its own backoff
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    }.items():
        os.environ.setdefault(key, value)


def _known_errors() -> tuple[type[BaseException], ...]:
    """What ends a command in one line: distillery's own errors and MLflow's (a store that answered with an error).
    MLflow's are looked up only when MLflow was loaded (nothing else raises them): a configuration error ends the
    command in well under a second, before torch, transformers, MLflow or Prefect are imported."""
    if "mlflow" not in sys.modules:
        return (DistilleryError,)
    from distillery.integrations.registry import KNOWN_ERRORS  # MLflow's own, from its one home

    return (DistilleryError, *KNOWN_ERRORS)


def _overrides(args: argparse.Namespace) -> dict[str, str] | None:
    return parse_override_args(args.set or []) or None


def _config(args: argparse.Namespace):  # noqa: ANN202 - Config
    return load_config(args.config, _overrides(args))


def _quiet_stdout(args: argparse.Namespace):  # noqa: ANN202 - a context manager
    """With --json, whatever a library prints (MLflow's "View run at ..." against a server) goes to stderr: stdout
    holds the JSON result alone."""
    import contextlib

    return contextlib.redirect_stdout(sys.stderr) if getattr(args, "json", False) else contextlib.nullcontext()


def _pipeline(args: argparse.Namespace, command: str, **params: Any) -> int:
    """Run one pipeline command; exit 3 when the gate rejected the student (a scheduler can tell it from a crash)."""
    cfg = _config(args)  # validate before any flow (and its server) starts: a bad key fails in a second
    if command in ("run", "ingest"):
        from distillery.models.data import locate_source

        d = cfg.data  # a missing file, an unknown format or a wrong column fails here, in one line
        locate_source(cfg.path(d.source), d.text_column, d.label_column, d.split_column)
    from distillery.integrations.events import check_prefect_server, prefect_errors
    from distillery.flows.pipeline import pipeline_flow

    check_prefect_server()
    if not args.verbose:
        hide_console_tracebacks()
    with prefect_errors(), _quiet_stdout(args):
        result = pipeline_flow(args.config, _overrides(args), command=command,
                               teacher_version=getattr(args, "teacher_version", None),
                               force=getattr(args, "force", False), **params)
    if args.json:  # logs go to stderr: stdout holds the result alone
        print(json.dumps(dataclasses.asdict(result), indent=1, default=str))
    return 0 if result.decision is None or result.decision.passed else 3


def cmd_run(args: argparse.Namespace) -> int:
    return _pipeline(args, "run")


def cmd_distill(args: argparse.Namespace) -> int:
    return _pipeline(args, "distill")


def cmd_ingest(args: argparse.Namespace) -> int:
    return _pipeline(args, "ingest")


def cmd_teacher(args: argparse.Namespace) -> int:
    if args.action != "import":
        return _pipeline(args, "teacher")
    source = args.source
    if source and os.path.exists(source):
        source = os.path.abspath(source)  # a path on the command line is relative to where it was typed
    return _pipeline(args, "import-teacher", teacher_source=source)


def cmd_label(args: argparse.Namespace) -> int:
    if not args.dry_run:
        return _pipeline(args, "label")
    cfg = _config(args)
    from distillery.flows.label import plan_labelling

    plan = plan_labelling(cfg)
    if args.json:
        print(json.dumps(plan, indent=1))
    else:
        print("\n".join(f"{k}: {v}" for k, v in plan.items()))
    return 0 if not plan.get("over_budget") else 3


def cmd_watch(args: argparse.Namespace) -> int:
    _config(args)
    from distillery.integrations.events import check_prefect_server, prefect_errors
    from distillery.flows.pipeline import watch_flow

    check_prefect_server()
    if not args.verbose:
        hide_console_tracebacks()
    with prefect_errors():
        watch_flow(args.config, _overrides(args))
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    _config(args)
    from distillery.integrations.events import check_prefect_server, prefect_errors
    from distillery.flows.pipeline import monitor_entry

    check_prefect_server()
    if not args.verbose:
        hide_console_tracebacks()
    with prefect_errors(), _quiet_stdout(args):
        result = monitor_entry(args.config, _overrides(args), end=args.end)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    return 4 if result["drifted"] else 0


def cmd_lineage(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from distillery.commands.admin import lineage_of, verify_lineage

    info = lineage_of(cfg, args.ref)
    checks = verify_lineage(cfg, info) if args.verify else []
    failed = [name for name, ok, _ in checks if not ok]
    if args.json:  # JSON only, so a script can parse it
        if args.verify:
            info = {**info, "verification": {"passed": not failed,
                                             "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks]}}
        print(json.dumps(info, indent=1, default=str))
        return 4 if failed else 0
    else:
        t, d = info["teacher"], info["data"]
        print(f"{info['model']} v{info['version']}  aliases: {', '.join(info['aliases']) or '-'}")
        print(f"  teacher        {t['name']} v{t['version']} (run {t['run_id']})")
        if "taught_by_assistant" in info:
            a = info["taught_by_assistant"]
            print(f"  taught by      the teacher assistant {a['shape']} v{a['version']} (run {a['run_id']}; its "
                  f"soft labels: run {a['outputs_run_id']}), itself taught by the teacher above")
        print(f"  data snapshot  {d['snapshot_md5']}  (DVC remote {d['dvc_remote']!r}; data.dvc at git commit "
              f"{d['git_commit_with_data_dvc'] or 'not in this repository history'}; `dvc pull data.dvc` there)")
        print(f"  code revision  {info['git_revision']}" + (f"; trained on {info['trained_on']}"
                                                            if info.get("trained_on") else ""))
        print(f"  model files    sha256 {info['model_sha256'] or 'not recorded'}"
              f"{'; lineage tags signed' if info['signed'] else ''}")
        print(f"  config         hash {info['config_hash']}; candidate {info['candidate']}")
        v = info["validation"]
        print(f"  validation     GX success={v['gx_success']} {v['summary']}")
        print("  metrics        " + ", ".join(f"{k}={val:.4g}" for k, val in sorted(info["metrics"].items())))
        print(f"  gate           {info['gate']['decision']}")
        for c in info["gate"]["criteria"] or []:
            print(f"    {'PASS' if c['passed'] else 'FAIL'} {c['name']}: {c['observed']:.4g} vs {c['threshold']:.4g}")
        print(f"  runs           {info['runs']}")
        if info["rollback"]:
            print(f"  rollback       {info['rollback']}")
    if not args.verify:
        return 0
    for name, ok, detail in checks:
        print(f"  [{'ok' if ok else 'FAILED'}] {name}: {detail}")
    print("lineage verified" if not failed else f"lineage verification FAILED: {', '.join(failed)}")
    return 0 if not failed else 4


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from distillery.commands.admin import status_of

    state = status_of(cfg)
    if args.json:
        print(json.dumps(state, indent=1, default=str))
        return 0
    t, c = state["teacher"], state["champion"]
    print("teacher   " + (f"{t['ref']} -> v{t['version']} (data {t['snapshot_md5']}, val accuracy {t['val_accuracy']})"
                          if t else "none registered: run `distillery teacher`"))
    print("champion  " + (f"{c['ref']} -> v{c['version']} (teacher v{c['teacher_version']}, data {c['snapshot_md5']}, "
                          f"accuracy {c['accuracy']}, p50 {c['latency_p50_ms']} ms)" if c else "none promoted yet"))
    for failure in (c or {}).get("integrity_failures", []):
        print(f"WARNING   the champion v{c['version']} fails a promotion check: {failure}. It was not promoted by "
              f"distillery's gate as it is: `distillery promote --rollback` or `--version N` moves it back")
    for left in state["leftovers"]:
        print(f"leftover  {cfg.tracking.student_name} v{left['version']} is {left['state']} (interrupted promotion): "
              f"the next run or `distillery gc` will {left['next_run_will']} it")
    print("last runs")
    for r in state["runs"]:
        took = f"{r['seconds']:.0f} s" if r["seconds"] is not None else "running"
        print(f"  {r['started']}  {r['run_id'][:12]}  {r['status']:<9} {r['name']:<18} {took:>8}  {r['gate'] or ''}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    if args.approve or args.refuse:
        return _answer_approval(args)
    if args.rollback == bool(args.version):
        print("say either --rollback, --version N, or --approve / --refuse [--version N] (with --reason TEXT)",
              file=sys.stderr)
        return 2
    cfg = _config(args)
    from distillery.commands.admin import promote_version, rollback_champion
    from distillery.models.gate import GateError

    ref = f"{cfg.tracking.student_name}@{cfg.tracking.champion_alias}"
    if args.rollback:
        retired, restored = rollback_champion(cfg, args.reason)
        print(f"{ref}: v{retired} -> v{restored} ({args.reason})")
        return 0
    try:
        previous, decision = promote_version(cfg, args.version, args.reason)
    except GateError as exc:
        print(f"\ndistillery promote: {exc}", file=sys.stderr)
        return 3
    print("\n".join(decision.reasons) + f"\n{ref}: v{previous or '-'} -> v{args.version} ({args.reason})")
    return 0


def _answer_approval(args: argparse.Namespace) -> int:
    if args.approve and args.refuse or args.rollback:
        print("say --approve or --refuse (with --version N for one of several waiting versions)", file=sys.stderr)
        return 2
    cfg = _config(args)
    from distillery.commands.admin import answer_approval
    from distillery.integrations.events import check_prefect_server, prefect_errors

    check_prefect_server()
    with prefect_errors():
        answer = answer_approval(cfg, args.version, bool(args.approve), args.reason)
    ref = f"{answer['model']} v{answer['version']}"
    print(f"{ref}: {answer['approval']} by {answer['by'] or '-'} (flow run {answer['flow_run']}); "
          f"{cfg.tracking.student_name}@{cfg.tracking.champion_alias} is v{answer['champion'] or '-'}")
    return 0 if answer["approval"] in ("approved", "refused") else 3


def cmd_history(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from distillery.commands.admin import alias_moves

    state = alias_moves(cfg)
    if args.json:
        print(json.dumps(state, indent=1))
        return 0
    if not state["moves"]:
        print(f"{state['ref']}: no move recorded")
    for m in state["moves"]:
        made = "" if m["took_effect"] else "  [not made: recorded, then the alias stayed]"
        why = textwrap.shorten(m["reason"], 200, placeholder=" … (--json: all of it)")
        print(f"{m['at']}  {m['kind']:<8} v{m['from_version'] or '-'} -> v{m['to_version']}  by {m['by']}{made}\n"
              f"    {why}")
    print(f"{state['ref']} -> {'v' + state['holder'] if state['holder'] else 'none'}")
    if state["note"]:
        print(f"WARNING   {state['note']}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from distillery.commands.admin import collect_garbage

    report = collect_garbage(cfg, keep_runs=args.keep, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for item in report["deleted"]:
        print(f"  {verb} {item}")
    for version, action in report["registry"]:
        print(f"  registry: {action} pending v{version}")
    for run_id in report["orphaned_runs_failed"]:
        print(f"  run {run_id}: left RUNNING by a process that no longer exists; {'would mark' if args.dry_run else 'marked'} FAILED")
    for pid in report["orphaned_servers_stopped"]:
        print(f"  temporary Prefect server (pid {pid}) of a killed command: {'would stop' if args.dry_run else 'stopped'}")
    print(f"gc: {verb} {len(report['deleted'])} entries ({report['freed_bytes'] / 1e6:.1f} MB), kept {report['kept']}")
    return 0


def cmd_webhook(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from distillery.commands.admin import register_webhook, serve_webhook

    if args.action == "register":
        print(register_webhook(cfg, args.url))
        return 0
    serve_webhook(cfg, args.host, args.port, lambda: print(
        f"webhook receiver on http://{args.host}:{args.port}/ (POST MLflow deliveries, GET /health); events go to "
        f"the Prefect server at {os.environ['PREFECT_API_URL']}", flush=True))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from distillery.commands.serving import predict
    from distillery.models.data import read_texts

    texts: list[str] = []
    for source in args.inputs or ["-"]:
        texts += read_texts(None if source == "-" else source, args.column,
                            sys.stdin.read() if source == "-" else None)
    out = predict(cfg, texts, args.model, args.top_k)
    if args.format == "csv":
        out.assign(top_k=out["top_k"].map(json.dumps)).to_csv(sys.stdout, index=False)
    else:
        for row in out.to_dict("records"):
            print(json.dumps(row, ensure_ascii=False))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from distillery.commands.serving import serve

    s = cfg.serving
    serve(cfg, args.model, args.host, args.port, args.workers, lambda uri: print(
        f"serving {uri} on http://{args.host}:{args.port}/invocations (MLflow scoring protocol; GET /ping); at most "
        f"{s.max_body_bytes} bytes, {s.max_texts} texts and {s.max_text_chars} characters a text per request",
        flush=True))
    return 0


def _teacher_version_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher-version", metavar="N", help="a registered teacher version (default: the alias)")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "run": (cmd_run, "run the whole pipeline on the configured data and teacher (the main job)"),
    "ingest": (cmd_ingest, "check the source data, write the train/validation/test snapshot, version it with DVC"),
    "teacher": (cmd_teacher, "fine-tune the base model and register it as teacher@production (bootstrap); "
                             "`teacher import SOURCE`: register an existing classifier instead, without training"),
    "distill": (cmd_distill, "label (cached) -> distil + baseline -> evaluate -> gate, with the registered teacher"),
    "watch": (cmd_watch, "compare teacher@alias and the data snapshot with the champion; emit a re-distill event"),
    "monitor": (cmd_monitor, "judge a window of the champion's prediction log against its training data and its "
                             "promotion; on drift emit the event that re-distils on those texts (exit 4)"),
    "lineage": (cmd_lineage, "show (and --verify) the lineage of a registered student, e.g. student@champion"),
    "status": (cmd_status, "current teacher, champion and the last runs"),
    "promote": (cmd_promote, "--rollback, or --version N: move the champion alias by hand (N after the gate's checks); "
                             "--approve / --refuse: answer a student that awaits approval"),
    "history": (cmd_history, "every move of the champion alias: when, from and to which version, by the gate, by hand "
                             "or a rollback, by whom and why"),
    "webhook": (cmd_webhook, "serve: MLflow registry webhook receiver; register: point an MLflow webhook at it"),
    "label": (cmd_label, "teacher soft labels on the snapshot (cached), checked by the Great Expectations suites"),
    "gc": (cmd_gc, "delete work files no run needs (keeps the champion's and the latest runs'); clean the registry"),
    "predict": (cmd_predict, "the champion's answers for texts from files (txt: one per line; csv/parquet/jsonl: "
                             "--column) or stdin, as JSON lines or CSV"),
    "serve": (cmd_serve, "serve the champion over HTTP (MLflow's scoring protocol: POST /invocations), with limits"),
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="configuration YAML (default: ./distillery.yaml)")
    common.add_argument("--set", metavar="KEY=VALUE", action="append", help="override a config key (repeatable)")
    common.add_argument("--verbose", action="store_true", help="library logs at INFO, and tracebacks with errors")
    parser = argparse.ArgumentParser(
        prog="distillery", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distil a registered teacher classifier into a small, fast student; promote it only when it "
                    "passes the gate.",
    )
    from distillery import __version__

    parser.add_argument("--version", action="version", version=f"distillery {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (func, text) in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=text, description=text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        for extra in EXTRA_ARGUMENTS.get(name, []):
            extra(p)
    return parser


def _force_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="re-distil even when the champion was made from the same teacher, data and config")


def _lineage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", nargs="?", default="student@champion", help="NAME@ALIAS, NAME/VERSION or VERSION")
    parser.add_argument("--verify", action="store_true", help="fetch the data snapshot from DVC, check teacher/runs")
    parser.add_argument("--json", action="store_true", help="print the record as JSON")


def _promote_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rollback", action="store_true", help="move the champion back to the previous promoted version")
    parser.add_argument("--version", metavar="N", help="make version N the champion, after the gate's checks")
    parser.add_argument("--approve", action="store_true", help="approve the version that awaits approval "
                        "(gate.approval: manual): its waiting run moves the alias")
    parser.add_argument("--refuse", action="store_true", help="refuse it: the champion stays")
    parser.add_argument("--reason", default="manual change", help="why (recorded on the versions)")


def _webhook_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["serve", "register"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--url", default="http://127.0.0.1:8765/", help="receiver URL (register)")


def _teacher_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["import"], help="import: register an existing classifier")
    parser.add_argument("source", nargs="?", help="a transformers folder (safetensors) or an MLflow model URI "
                                                  "(models:/NAME@ALIAS, runs:/RUN_ID/PATH); default teacher.source")


def _json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON only")


def _label_dry_run_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="say how many texts the teacher would be asked, in how "
                        "many requests, at what estimated cost (nothing is asked; exit 3 when over the budget)")


def _monitor_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--end", metavar="TIME", help="the window's end, ISO 8601 (default now; its length is "
                                                      "monitor.window_hours)")
    _json_arg(parser)


def _gc_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", type=int, metavar="N", help="latest entries of each kind to keep (runtime.keep_runs)")
    parser.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="REF", help="student@champion (default), student/3, 3 or an MLflow model URI")


def _predict_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="FILE", help="files with texts ('-' or none: stdin)")
    _model_arg(parser)
    parser.add_argument("--column", default="text", help="the text column of a csv/parquet/jsonl file (default text)")
    parser.add_argument("--top-k", type=int, default=1, help="also list the k most probable labels (default 1)")
    parser.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")


def _serve_args(parser: argparse.ArgumentParser) -> None:
    _model_arg(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=1)


EXTRA_ARGUMENTS: dict[str, list[Callable[[argparse.ArgumentParser], None]]] = {
    "label": [_teacher_version_arg, _json_arg, _label_dry_run_arg],
    "distill": [_teacher_version_arg, _force_arg, _json_arg],
    "run": [_teacher_version_arg, _force_arg, _json_arg],
    "ingest": [_json_arg],
    "teacher": [_teacher_args, _json_arg],
    "lineage": [_lineage_args],
    "promote": [_promote_args],
    "webhook": [_webhook_args],
    "gc": [_gc_args],
    "status": [_json_arg],
    "history": [_json_arg],
    "monitor": [_monitor_args],
    "predict": [_predict_args],
    "serve": [_serve_args],
}


# Libraries whose INFO (and some WARNING) lines say nothing a distillery user can act on; --verbose brings them back.
QUIET_LOGGERS = {
    "httpx": logging.WARNING, "httpcore": logging.WARNING, "alembic": logging.WARNING,
    "mlflow.store.db.utils": logging.WARNING,
    "great_expectations": logging.WARNING,  # e.g. one `_docs_decorators ... is a closure` line per decorated function
    "transformers": logging.ERROR,          # the LOAD REPORT table of every model load (a new head is expected here)
    "mlflow.pyfunc": logging.ERROR,         # the cloudpickle notice on every logged model
    "mlflow.models.signature": logging.WARNING,
}


class _NoTraceback(logging.Formatter):
    """Wraps a console formatter: the message without the traceback (the CLI prints the error once, at the end)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


class _RunFormatter(logging.Formatter):
    """Our console format, with the Prefect run a line comes from: ``[task or flow run name]``."""

    def format(self, record: logging.LogRecord) -> str:
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        record.run = f" [{run}]" if run else ""
        return super().format(record)


def _not_a_repeated_failure(record: logging.LogRecord) -> bool:
    """Prefect reports one failure on the task, then on each flow around it; the CLI tells it once, at the end."""
    if record.name not in ("prefect.task_runs", "prefect.flow_runs"):
        return True
    return record.levelno < logging.ERROR and not record.getMessage().startswith("Finished in state Failed")


def hide_console_tracebacks() -> None:
    """Console handlers (Prefect's included) print no tracebacks and no repeats of a failure; the API handler (the
    Prefect UI) keeps everything."""
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if type(handler).__name__ in ("StreamHandler", "PrefectConsoleHandler", "RichHandler") \
                    and not isinstance(handler.formatter, _NoTraceback):
                handler.setFormatter(_NoTraceback(handler.formatter))
                handler.addFilter(_not_a_repeated_failure)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_RunFormatter("%(asctime)s %(levelname)s %(name)s%(run)s: %(message)s", "%H:%M:%S"))
    if not verbose:
        # transformers sets its own level when it first logs, from TRANSFORMERS_VERBOSITY (it is imported later)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)


PIPELINE_COMMANDS = ("run", "ingest", "teacher", "distill", "label")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the command ends through its cleanup (not caught as an error)."""


_STOPPING = threading.Lock()  # one cleanup: the main thread's or the watchdog's, whichever comes first
STOP_GRACE_S = 10.0  # how long the command may unwind (Prefect marking its runs) before it is stopped from outside


def _interrupted(command: str, signal_name: str, code: int) -> int:
    """One line, the runs this process opened marked KILLED, the processes it started (the temporary Prefect server,
    Dask workers) stopped; then out at once: training threads are not waited for."""
    from distillery import processes
    from distillery.integrations.registry import mark_interrupted_runs

    _STOPPING.acquire()  # a second caller waits here until the first one has ended the process
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    marked = mark_interrupted_runs("KILLED")
    import psutil

    stopped = processes.stop(psutil.Process().children(recursive=True))
    done = [f"{len(marked)} MLflow run(s) it had open marked KILLED"] if marked else []
    done += [f"{stopped} process(es) it started stopped (temporary Prefect server, workers)"] if stopped else []
    after = (" The registry is consistent (an alias moves last); run it again to resume from its checkpoints."
             if command in PIPELINE_COMMANDS else "")
    print(f"\ndistillery {command}: stopped by {signal_name}{'; ' if done else ''}{', '.join(done)}.{after}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _stop_on_signals(command: str) -> None:
    """SIGINT and SIGTERM raise in the main thread, so the command unwinds through Prefect (which marks its runs);
    a watchdog ends it the same way after STOP_GRACE_S if unwinding waits on something (a task thread still
    training, a task runner shutting down)."""

    def handler(signum: int, frame) -> None:  # noqa: ANN001 - a signal handler's frame
        name, code = ("Ctrl-C (SIGINT)", 130) if signum == signal.SIGINT else ("SIGTERM", 143)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        watchdog = threading.Timer(STOP_GRACE_S, _interrupted, (command, name, code))
        watchdog.daemon = True
        watchdog.start()
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    environment_defaults()
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    from distillery import processes

    os.environ[processes.COMMAND_ENV] = processes.this_process()  # inherited by the helpers this command starts
    if threading.current_thread() is threading.main_thread():
        _stop_on_signals(args.command)
    try:
        return args.func(args)
    except _known_errors() as exc:
        if args.verbose:
            traceback.print_exc()
        _end_runs_failed(exc)
        print(f"\ndistillery {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        return _interrupted(args.command, "Ctrl-C (SIGINT)", 130)
    except BaseException as exc:  # SIGTERM, ours or Prefect's TerminationSignal inside a flow
        if isinstance(exc, Terminated) or type(exc).__name__ == "TerminationSignal":
            return _interrupted(args.command, "SIGTERM", 143)
        _end_runs_failed(exc)
        raise


def _end_runs_failed(exc: BaseException) -> None:
    """A command that failed leaves none of the MLflow runs it opened RUNNING: they end FAILED. Not when the store
    itself is what failed (asking it again would only wait on it): ``distillery gc`` marks those later."""
    if "mlflow" not in sys.modules:
        return
    from distillery.integrations.registry import RegistryUnavailable, mark_interrupted_runs

    if not isinstance(exc, RegistryUnavailable):
        mark_interrupted_runs("FAILED")


if __name__ == "__main__":
    sys.exit(main())
