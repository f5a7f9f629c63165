"""Reading the served model's prediction log (written by ``served_model.PredictionLog``): a window of it, by time and
model version, from a folder or any fsspec URI. Its one home: the monitor reads production traffic through here."""

from __future__ import annotations

import datetime as dt
import io
import json

import pandas as pd

from distillery.errors import DistilleryError
from distillery.integrations.served_model import LOG_COLUMNS


class PredictionLogError(DistilleryError, RuntimeError):
    """The log cannot give the window asked for: missing, empty, corrupt, or of another model."""


def _days(start: dt.datetime, end: dt.datetime) -> list[str]:
    day, days = start.date(), []
    while day <= end.date():
        days.append(f"date={day.isoformat()}")
        day += dt.timedelta(days=1)
    return days


def read_window(uri: str, start: dt.datetime, end: dt.datetime, model: str | None = None) -> pd.DataFrame:
    """The rows logged in [``start``, ``end``) (UTC), of ``model`` (``name/version``) when given. A missing log, a
    window with no rows, a file that is not parquet or a window holding only other models' rows is a
    PredictionLogError that says which; partial files (``.*.partial``) are never read."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.exists(root):
        raise PredictionLogError(f"no prediction log at {uri}: turn it on where the champion is served "
                                 "(DISTILLERY_PREDICTION_LOG or serving.prediction_log)")
    files = [f for day in _days(start, end) if fs.exists(f"{root}/{day}")
             for f in sorted(fs.ls(f"{root}/{day}", detail=False))
             if f.rsplit("/", 1)[-1].startswith("part-") and f.endswith(".parquet")]
    frames = []
    for path in files:
        try:
            frame = pd.read_parquet(io.BytesIO(fs.cat_file(path)))
        except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a damaged file are many
            raise PredictionLogError(f"prediction log file {path} is not readable parquet ({type(exc).__name__}: "
                                     f"{exc}); move it aside to read the rest of the window") from None
        if missing := set(LOG_COLUMNS) - set(frame.columns):
            raise PredictionLogError(f"prediction log file {path} lacks columns {sorted(missing)}: not a distillery "
                                     "prediction log")
        frames.append(frame)
    window = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=LOG_COLUMNS)
    if len(window):
        times = pd.to_datetime(window["time"], utc=True)
        window = window[(times >= pd.Timestamp(start)) & (times < pd.Timestamp(end))]
    if window.empty:
        raise PredictionLogError(f"the prediction log at {uri} has no rows from {start.isoformat()} to "
                                 f"{end.isoformat()}: nothing to judge")
    if model is not None:
        ours = window[window["model"] == model]
        if ours.empty:
            others = sorted(set(window["model"]))
            raise PredictionLogError(f"the window holds {len(window)} rows of {others}, none of {model}: the log is "
                                     "another model's (or the champion moved)")
        window = ours
    window = window.reset_index(drop=True)
    window["top_k"] = [json.loads(t) for t in window["top_k"]]
    return window


def window_texts(window: pd.DataFrame) -> list[str]:
    """The texts of a window; a PredictionLogError when it holds only their digests (logged with ``digest``)."""
    texts = window["text"].dropna().tolist()
    if not texts:
        raise PredictionLogError(f"the window's {len(window)} rows hold only text digests (the log was written with "
                                 "texts: digest): input drift and re-distillation need the texts")
    return texts
