"""``distillery``: the command line. Each subcommand runs a flow (or reads the registry) with one config."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

from distillery.config import ConfigError, load_config, parse_override_args

EPILOG = """\
Configuration: distillery.yaml in the current folder (or --config FILE, or $DISTILLERY_CONFIG);
override any key with --set section.key=value, e.g. --set distill.temperature=2 --set teacher.epochs=1.
Servers: set PREFECT_API_URL and MLFLOW_TRACKING_URI (or tracking.uri) to use running servers;
without them everything runs embedded (temporary Prefect server, MLflow on SQLite, DVC remote in a folder).
"""


def _environment_defaults() -> None:
    """Offline, quiet defaults for this process (the user's own settings win)."""
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "models",
        "GIT_PYTHON_REFRESH": "quiet",
    }.items():
        os.environ.setdefault(key, value)


def _known_errors() -> tuple[type[BaseException], ...]:
    from models.data import DataError
    from models.modeling import ModelError
    from tasks.tracking import TrackingError
    from tasks.versioning import VersioningError

    errors: list[type[BaseException]] = [ConfigError, DataError, ModelError, TrackingError, VersioningError]
    for module, name in (("tasks.validation", "ValidationFailed"), ("tasks.gate", "GateError"),
                         ("tasks.lineage", "LineageError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _flow_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    overrides = parse_override_args(args.set or [])
    load_config(args.config, overrides)  # validate before any flow (and its server) starts
    return {"config_path": args.config, "overrides": overrides or None}


def _gate_exit(result: dict) -> int:
    """Exit status 3 when the gate rejected the student: a scheduler or CI can tell it from a crash (2)."""
    return 0 if result["decision"]["passed"] else 3


def cmd_run(args: argparse.Namespace) -> int:
    from flows.pipeline import pipeline_flow

    return _gate_exit(pipeline_flow(**_flow_kwargs(args), teacher_version=args.teacher_version))


def cmd_distill(args: argparse.Namespace) -> int:
    from flows.distill import distill_flow
    from flows.runners import task_runner_for

    kwargs = _flow_kwargs(args)
    cfg = load_config(args.config, kwargs["overrides"])
    flow = distill_flow.with_options(task_runner=task_runner_for(cfg))
    return _gate_exit(flow(**kwargs, teacher_version=args.teacher_version))


def cmd_ingest(args: argparse.Namespace) -> int:
    from flows.ingest import ingest_flow

    ingest_flow(**_flow_kwargs(args))
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    from flows.teacher import teacher_flow

    teacher_flow(**_flow_kwargs(args))
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from flows.label import label_flow
    from flows.runners import task_runner_for

    kwargs = _flow_kwargs(args)
    cfg = load_config(args.config, kwargs["overrides"])
    label_flow.with_options(task_runner=task_runner_for(cfg))(**kwargs, teacher_version=args.teacher_version)
    return 0


def _teacher_version_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher-version", metavar="N", help="a registered teacher version (default: the alias)")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "run": (cmd_run, "run the whole pipeline on the configured data and teacher (the main job)"),
    "ingest": (cmd_ingest, "check the source data, write the train/validation/test snapshot, version it with DVC"),
    "teacher": (cmd_teacher, "fine-tune the base model and register it as teacher@production (bootstrap)"),
    "distill": (cmd_distill, "label (cached) -> distil + baseline -> evaluate -> gate, with the registered teacher"),
    "label": (cmd_label, "teacher soft labels on the snapshot (cached), checked by the Great Expectations suites"),
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="configuration YAML (default: ./distillery.yaml)")
    common.add_argument("--set", metavar="KEY=VALUE", action="append", help="override a config key (repeatable)")
    parser = argparse.ArgumentParser(
        prog="distillery", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distil a registered teacher classifier into a small, fast student; promote it only when it "
                    "passes the gate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (func, text) in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=text, description=text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        for extra in EXTRA_ARGUMENTS.get(name, []):
            extra(p)
    return parser


EXTRA_ARGUMENTS: dict[str, list[Callable[[argparse.ArgumentParser], None]]] = {
    "label": [_teacher_version_arg],
    "distill": [_teacher_version_arg],
    "run": [_teacher_version_arg],
}


def main(argv: list[str] | None = None) -> int:
    _environment_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _known_errors() as exc:
        print(f"\ndistillery {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
