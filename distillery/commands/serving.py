"""Using the champion: predict on texts in process, or serve it over HTTP with ``mlflow models serve``.

Both load the registered model exactly as any user would (``mlflow.pyfunc.load_model``): the self-contained loader
that travels with it, in its served form. The server is MLflow's own scoring app behind the serving limits. Plain
functions like the admin commands: no orchestration needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import pandas as pd

from distillery.config import Config
from distillery.integrations import registry
from distillery.integrations.guard import ServingLimits
from distillery.commands.admin import parse_ref

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


SERVE_ENV = "DISTILLERY_SERVE"  # the model URI and limits handed to each uvicorn worker (several workers)


def limits_of(cfg: Config) -> ServingLimits:
    return ServingLimits(**cfg.serving.model_dump(exclude={"prediction_log", "prediction_log_texts"}))


def app_from_environment():  # noqa: ANN201 - an ASGI app; uvicorn's factory in each worker process
    settings = json.loads(os.environ[SERVE_ENV])
    return registry.scoring_app(settings["model_uri"], ServingLimits(**settings["limits"]))


def prediction_log_environment(cfg: Config, uri: str) -> None:
    """Turn the served model's prediction log on for this process and its workers as ``serving.prediction_log``
    says (an environment variable already set wins), naming the model version it serves."""
    from distillery.integrations.served_model import LOG_ENV, LOG_MODEL_ENV, LOG_TEXTS_ENV

    log = cfg.serving.prediction_log
    if log and LOG_ENV not in os.environ:
        os.environ[LOG_ENV] = log if "://" in log else str(cfg.path(log))
        os.environ.setdefault(LOG_TEXTS_ENV, cfg.serving.prediction_log_texts)
    os.environ.setdefault(LOG_MODEL_ENV, uri.removeprefix("models:/"))


def serve(cfg: Config, ref: str | None, host: str, port: int, workers: int = 1,
          on_ready: Callable[[str], None] = lambda uri: None) -> None:
    """Serve the model over HTTP with MLflow's scoring protocol (POST /invocations, GET /ping, /health, /version),
    loaded as any user loads it, behind the limits of ``cfg.serving`` (``integrations.guard``); until interrupted."""
    import uvicorn

    uri = model_uri(cfg, ref)
    limits = limits_of(cfg)
    prediction_log_environment(cfg, uri)
    on_ready(uri)
    if workers == 1:
        uvicorn.run(registry.scoring_app(uri, limits), host=host, port=port, log_level="info", access_log=True)
        return
    os.environ[SERVE_ENV] = json.dumps({"model_uri": uri, "limits": dataclasses.asdict(limits)})
    uvicorn.run("distillery.commands.serving:app_from_environment", factory=True, host=host, port=port,
                workers=workers, log_level="info", access_log=True)
