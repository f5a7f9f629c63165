"""Using the champion: predict on texts in process, or serve it over HTTP with ``mlflow models serve``.

Both load the registered model exactly as any user would (``mlflow.pyfunc.load_model``): the self-contained loader
that travels with it, in its served form. Plain functions like the admin commands: no orchestration needed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd

from distillery.config import Config
from distillery.integrations import registry
from distillery.flows.admin import parse_ref

LOCAL_MODEL_PREFIXES = ("/", "./", "../")  # an MLflow model folder on disk


def model_uri(cfg: Config, ref: str | None = None) -> str:
    """A loadable URI for ``ref``: ``student@champion`` (default), ``student/3``, ``3``, or any MLflow model URI.

    A registry reference is resolved first, so a missing champion is a clear error (not a loader stack trace) and
    an unreachable registry is never read as "no champion".
    """
    if ref and ref.startswith(registry.MODEL_URI_SCHEMES + LOCAL_MODEL_PREFIXES):
        if ref.startswith(LOCAL_MODEL_PREFIXES) and not (Path(ref) / "MLmodel").is_file():
            raise registry.TrackingError(f"{ref} is not an MLflow model folder (no MLmodel file)")
        if ref.startswith(("models:/", "runs:/")):
            registry.configure_tracking(cfg)
        return ref
    registry.configure_tracking(cfg)
    name, which = parse_ref(ref or f"{cfg.tracking.student_name}@{cfg.tracking.champion_alias}",
                            cfg.tracking.student_name)
    try:
        mv = registry.Registry.from_config(cfg).resolve(name, which)
    except registry.NotFound:
        raise registry.NotFound(f"no model {name}@{which} in {registry.tracking_uri(cfg)}: `distillery run` "
                                f"registers and promotes a student (or pass --model URI)") from None
    return f"models:/{name}/{mv.version}"


def predict(cfg: Config, texts: list[str], ref: str | None = None, top_k: int = 1) -> pd.DataFrame:
    """The served model's answers for ``texts``: one row each with label, confidence and the top-k labels."""
    model = registry.load_served_model(model_uri(cfg, ref))
    out = model.predict(texts, params={"top_k": top_k})
    return out.assign(text=texts)[["text", *out.columns]]


def serve_command(cfg: Config, ref: str | None, host: str, port: int, workers: int = 1) -> tuple[list[str], dict]:
    """The ``mlflow models serve`` command line and environment for ``ref`` (in this environment: no conda/venv)."""
    uri = model_uri(cfg, ref)
    env = dict(os.environ)
    # mlflow starts its server by name: put this interpreter's scripts first so it is found without an activated venv
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MLFLOW_TRACKING_URI"] = registry.tracking_uri(cfg)
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
           "--host", host, "--port", str(port), "--workers", str(workers)]
    return cmd, env


def serve(cfg: Config, ref: str | None, host: str, port: int, workers: int = 1) -> None:
    """Replace this process with ``mlflow models serve`` on the model (POST /invocations, GET /ping)."""
    cmd, env = serve_command(cfg, ref, host, port, workers)
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)
