"""The loader that travels with every registered distillery model (MLflow models-from-code).

This file is copied into the logged model, so ``mlflow.pyfunc.load_model("models:/student@champion")`` needs only the
model's own requirements (torch, transformers, pandas, mlflow): it imports nothing from distillery, and
``tests/test_served_model.py`` checks that in a fresh virtual environment without the project.

Served as gated: the classifier folder's ``distillery-serving.json`` says which form (``fp32``, torch dynamic ``int8``
or the ``onnx-int8`` file) and which tokenizer settings (max length, truncation) the evaluation harness measured, and
the loader applies the same. A static-embedding student (model type ``distillery-static``) is served from its ONNX
file alone: its labels come from config.json, so no model class of distillery's is needed.

Input: a list of texts, a ``pandas.Series``, a one-column ``DataFrame`` (or one with a ``text`` column), or a 1-D
array. Output: one row per text with ``label``, ``confidence``, ``top_k`` (the ``top_k`` most probable labels with
their probabilities; ``params={"top_k": 3}``) and ``abstained``. An empty input gives an empty result.

A prediction log (off by default): with the environment variable ``DISTILLERY_PREDICTION_LOG`` (a folder or an fsspec
URI such as ``s3://bucket/log``) or the model config key ``prediction_log``, each request's texts (or only their
SHA-256 digests: ``DISTILLERY_PREDICTION_LOG_TEXTS=digest`` / ``prediction_log_texts``) and answers are appended, off
the request path, as parquet files ``<log>/date=YYYY-MM-DD/part-*.parquet`` (``PredictionLog``). A log that cannot be
written never fails or slows a prediction: its rows are counted as lost and a warning is logged at most once a minute.

Calibration travels in the same file: probabilities are ``softmax(logits / temperature)``, and with ``abstain_below``
set, a text whose in-scope score is below it gets the out-of-scope label (``oos_label``) and ``abstained: true``
(its ``top_k`` still lists the known labels). The score is the top-1 probability, or with ``abstain_score: energy``
``temperature * logsumexp(logits / temperature)``.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

CLASSIFIER_ARTIFACT = "classifier"
SERVING_FILE = "distillery-serving.json"
OUTPUT_COLUMNS = ["label", "confidence", "top_k", "abstained"]
DEFAULT_OOS_LABEL = "out_of_scope"
BATCH_SIZE = 64
ONNX_INT8_FILE = "model-int8.onnx"  # the ONNX Runtime INT8 form (student.deploy: onnx-int8), beside the weights
STATIC_MODEL_TYPE = "distillery-static"  # a static-embedding student (distillery.models.static): served as ONNX only


class InputError(MlflowException):
    """The model input is not a batch of texts (HTTP 400 when served); the message says what is expected."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def as_texts(model_input: Any) -> list[str]:
    """The texts of any accepted input shape, in order."""
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] == 1:
            column = model_input.columns[0]
        elif "text" in model_input.columns:
            column = "text"
        else:
            raise InputError(f"a DataFrame input needs one column or a `text` column; got {list(model_input.columns)}")
        values = model_input[column].tolist()
    elif isinstance(model_input, np.ndarray):
        values = list(model_input.astype(object).ravel())
    elif isinstance(model_input, (pd.Series, list, tuple)):
        values = list(model_input)
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        raise InputError(f"expected texts (a list, Series or one-column DataFrame); got {type(model_input).__name__}")
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise InputError(f"every input must be a string; item {bad[0]} is {type(values[bad[0]]).__name__}")
    return values


def read_serving(folder: Path) -> dict:
    """The serving settings written beside the weights (form and tokenizer settings)."""
    path = Path(folder) / SERVING_FILE
    settings = json.loads(path.read_text()) if path.is_file() else {}
    defaults = {"quantize": "fp32", "max_length": 128, "truncation": True, "calibration_temperature": 1.0, "abstain_below": None,
                "abstain_score": "confidence", "oos_label": DEFAULT_OOS_LABEL}
    return {**defaults, **settings}


def config_labels(folder: Path) -> list[str]:
    """The labels in output order, from the folder's config.json (``id2label``)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    names = {int(i): str(name) for i, name in config["id2label"].items()}
    return [names[i] for i in range(len(names))]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True)) if len(z) else z
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32) if len(z) else z


class ServedClassifier:
    """A classifier folder in its served form: tokenise (as measured), forward, softmax, top-k."""

    def __init__(self, folder: Path, settings: dict | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        self.settings = {**read_serving(folder), **(settings or {})}  # ``settings``: the harness timing a form
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self._encoder = self._fast_encoder()
        self.session = None
        if self.settings["quantize"] == "onnx-int8":  # ONNX Runtime: the INT8 file the harness measured
            import onnxruntime

            options = onnxruntime.SessionOptions()
            if self.settings.get("threads"):  # default: the runtime's choice (all cores)
                options.intra_op_num_threads = int(self.settings["threads"])
            self.session = onnxruntime.InferenceSession(str(folder / ONNX_INT8_FILE), options,
                                                        providers=["CPUExecutionProvider"])
            self.model = None
            self.labels = config_labels(folder)  # from the file: a static student's model type is not transformers'
            return
        if json.loads((folder / "config.json").read_text()).get("model_type") == STATIC_MODEL_TYPE:
            raise ValueError(f"{folder} is a static-embedding student: it is served as onnx-int8 (its ONNX file), "
                             f"not as {self.settings['quantize']}")
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True).eval()
        if self.settings["quantize"] == "int8":
            from torch.ao.quantization import quantize_dynamic

            model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]

    def _fast_encoder(self):  # noqa: ANN202 - a tokenizers.Tokenizer, or None
        """The tokenizer's Rust backend set to the served truncation and padding (a copy: the transformers tokenizer
        keeps its own state). It gives the ids ``tokenizer(texts, truncation=..., padding=True, max_length=...)``
        gives, without the Python wrapping that costs as much as a small model's forward pass at batch 1."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or self.tokenizer.pad_token_id is None:
            return None
        from tokenizers import Tokenizer

        encoder = Tokenizer.from_str(backend.to_str())
        encoder.no_truncation()
        if self.settings["truncation"]:
            encoder.enable_truncation(int(self.settings["max_length"]), direction=self.tokenizer.truncation_side)
        encoder.enable_padding(pad_id=self.tokenizer.pad_token_id, pad_token=self.tokenizer.pad_token,
                               direction=self.tokenizer.padding_side)
        return encoder

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """input_ids and attention_mask (int64) of a batch, padded to its longest text."""
        if self._encoder is None:
            enc = self.tokenizer(texts, truncation=self.settings["truncation"], padding=True,
                                 max_length=self.settings["max_length"], return_tensors="np")
            return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        encodings = self._encoder.encode_batch(texts)
        return {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}

    def scaled_logits(self, texts: list[str]) -> np.ndarray:
        """``logits / temperature`` for every text, tokenised as the harness measured."""
        out = []
        for start in range(0, len(texts), BATCH_SIZE):
            out.append(self._forward(self.encode(texts[start:start + BATCH_SIZE]))
                       / float(self.settings["calibration_temperature"]))
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def _forward(self, enc: dict[str, np.ndarray]) -> np.ndarray:
        """Logits (float32) of one tokenised batch, from the ONNX Runtime session or the torch model."""
        if self.session is not None:
            (logits,) = self.session.run(["logits"], enc)
            return logits.astype(np.float32)
        import torch

        with torch.inference_mode():
            return self.model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.float().numpy()

    def probabilities(self, texts: list[str]) -> np.ndarray:
        return _softmax(self.scaled_logits(texts))

    def top_labels(self, texts: list[str]) -> list[str]:
        """Each text's most probable label (before any abstention)."""
        return [self.labels[int(i)] for i in self.scaled_logits(texts).argmax(1)]

    def in_scope_scores(self, scaled: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """What the abstention threshold applies to: the top-1 probability, or the energy score
        ``T * logsumexp(logits / T)`` (``abstain_score: energy``)."""
        if self.settings["abstain_score"] == "energy":
            top = scaled.max(axis=1, keepdims=True)
            lse = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
            return float(self.settings["calibration_temperature"]) * lse
        return probs.max(axis=1)

    def predict(self, texts: list[str], top_k: int = 1) -> pd.DataFrame:
        if not texts:
            return pd.DataFrame({c: pd.Series([], dtype=object) for c in OUTPUT_COLUMNS})
        k = max(1, min(int(top_k), len(self.labels)))
        scaled = self.scaled_logits(texts)
        probs = _softmax(scaled)
        scores = self.in_scope_scores(scaled, probs)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        threshold = self.settings["abstain_below"]
        abstained = [threshold is not None and float(score) < float(threshold) for score in scores]
        # built by columns, in OUTPUT_COLUMNS order (a quarter of the cost of a frame from row dicts at batch 1;
        # naming the columns again costs another 40%, in pandas' reindexing)
        return pd.DataFrame({
            "label": [self.settings["oos_label"] if a else self.labels[int(top[0])] for a, top in zip(abstained, order)],
            "confidence": [float(p[top[0]]) for p, top in zip(probs, order)],
            "top_k": [[{"label": self.labels[int(i)], "probability": float(p[i])} for i in top]
                      for p, top in zip(probs, order)],
            "abstained": abstained})


LOG_ENV = "DISTILLERY_PREDICTION_LOG"  # a folder or fsspec URI: turns the prediction log on
LOG_TEXTS_ENV = "DISTILLERY_PREDICTION_LOG_TEXTS"  # text (default) | digest: only each text's SHA-256
LOG_MODEL_ENV = "DISTILLERY_PREDICTION_LOG_MODEL"  # name/version recorded on every row (distillery serve sets it)
LOG_FLUSH_ENV = "DISTILLERY_PREDICTION_LOG_FLUSH_S"  # seconds between writes (default 10)
# the model config keys a loader accepts (MLflow overrides only the keys logged with the model): off by default
LOG_CONFIG = {"prediction_log": "", "prediction_log_texts": "text", "prediction_log_model": "",
              "prediction_log_flush_s": 10.0}
LOG_COLUMNS = ["time", "model", "text", "text_sha256", "label", "confidence", "top_k", "abstained"]
logger = logging.getLogger("distillery.prediction_log")


class PredictionLog:
    """Appends predictions to parquet files in batches, from a background thread: ``record`` only queues (bounded:
    beyond ``max_pending`` requests the oldest are dropped, their rows counted as lost), ``flush`` writes one file. Nothing here raises
    into a prediction; ``written``, ``lost`` and ``errors`` say how it went."""

    def __init__(self, uri: str, model: str = "", texts: str = "text", flush_s: float = 10.0, batch: int = 1000,
                 max_pending: int = 100_000):
        if texts not in ("text", "digest"):
            raise ValueError(f"prediction log texts must be text or digest, not {texts!r}")
        self.uri, self.model, self.texts, self.flush_s, self.batch = uri.rstrip("/"), model, texts, flush_s, batch
        self.pending: deque = deque(maxlen=max_pending)
        self.written = self.lost = self.errors = self._queued = 0
        self._lock, self._wake, self._closed, self._warned = threading.Lock(), threading.Event(), False, 0.0
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @classmethod
    def from_settings(cls, config: dict | None = None) -> "PredictionLog | None":
        """The log the model config (``prediction_log``...) or the environment turns on; None when off."""
        config = config or {}

        def setting(key: str, env: str) -> str:
            """A value set in the model config; else the environment's; else the default (which a registered
            model's config also carries: it never hides the environment)."""
            value = config.get(key)
            if value not in (None, "") and value != LOG_CONFIG[key]:
                return str(value)
            return os.environ.get(env) or str(LOG_CONFIG[key])

        uri = setting("prediction_log", LOG_ENV)
        if not uri:
            return None
        return cls(uri, model=setting("prediction_log_model", LOG_MODEL_ENV),
                   texts=setting("prediction_log_texts", LOG_TEXTS_ENV),
                   flush_s=float(setting("prediction_log_flush_s", LOG_FLUSH_ENV)))

    def record(self, texts: list[str], answers: pd.DataFrame) -> None:
        """Queue one request's rows (cheap: the columns as they are; rows are built when written)."""
        try:
            if len(self.pending) == self.pending.maxlen:
                self.lost += len(self.pending[0][1])
            self.pending.append((time.time(), list(texts), answers["label"].tolist(), answers["confidence"].tolist(),
                                 answers["top_k"].tolist(), answers["abstained"].tolist()))
            self._queued += len(texts)
            if self._queued >= self.batch:  # a full batch is written now, not at the next interval
                self._wake.set()
        except Exception:  # noqa: BLE001 - a prediction never fails for its log
            self.errors += 1

    def _rows(self, taken: list) -> pd.DataFrame:
        out: dict[str, list] = {c: [] for c in LOG_COLUMNS}
        for stamp, texts, labels, confidences, top_ks, abstained in taken:
            for text, label, confidence, top_k, abstain in zip(texts, labels, confidences, top_ks, abstained):
                out["time"].append(stamp)
                out["text"].append(text if self.texts == "text" else None)
                out["text_sha256"].append(hashlib.sha256(text.encode("utf-8")).hexdigest())
                out["label"].append(label)
                out["confidence"].append(float(confidence))
                out["top_k"].append(json.dumps(top_k))
                out["abstained"].append(bool(abstain))
        out["model"] = [self.model] * len(out["time"])
        frame = pd.DataFrame(out, columns=LOG_COLUMNS)
        frame["time"] = pd.to_datetime(frame["time"], unit="s", utc=True)
        frame["text"] = frame["text"].astype("string")
        return frame

    def flush(self) -> int:
        """Write what is queued as one parquet file; the number of rows written (0 on an error, counted)."""
        with self._lock:
            taken = [self.pending.popleft() for _ in range(len(self.pending))]
            self._queued = 0
            if not taken:
                return 0
            rows = sum(len(t[1]) for t in taken)
            try:
                import fsspec

                frame = self._rows(taken)
                buffer = io.BytesIO()
                frame.to_parquet(buffer, index=False)
                fs, root = fsspec.core.url_to_fs(self.uri)
                stamp = time.gmtime(taken[0][0])
                folder = f"{root}/date={time.strftime('%Y-%m-%d', stamp)}"
                micros = int(taken[0][0] * 1e6) % 1_000_000  # names sort as the batches were asked
                name = f"part-{time.strftime('%Y%m%dT%H%M%S', stamp)}.{micros:06d}-{uuid.uuid4().hex[:12]}.parquet"
                fs.makedirs(folder, exist_ok=True)
                if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
                    partial = f"{folder}/.{name}.partial"  # readers see whole files only
                    fs.pipe_file(partial, buffer.getvalue())
                    fs.mv(partial, f"{folder}/{name}")
                else:  # an object store's put is whole or nothing
                    fs.pipe_file(f"{folder}/{name}", buffer.getvalue())
                self.written += rows
                return rows
            except Exception as exc:  # noqa: BLE001 - counted and warned about, never raised into a prediction
                self.errors += 1
                self.lost += rows
                if time.monotonic() - self._warned > 60.0:
                    self._warned = time.monotonic()
                    logger.warning("prediction log %s cannot be written (%s: %s); %d rows lost so far, predictions "
                                   "go on", self.uri, type(exc).__name__, exc, self.lost)
                return 0

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        """Write what is left (at exit, too)."""
        self._closed = True
        self._wake.set()
        self.flush()


class DistilledClassifierModel(PythonModel):
    """The pyfunc face of ``ServedClassifier`` (and its prediction log, when one is turned on)."""

    # predict() takes several input shapes on purpose and validates them itself (``as_texts``): MLflow's type-hint
    # based input validation (and its warning that predict has no type hints) does not apply
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:  # noqa: ANN001 - MLflow's context type
        self.classifier = ServedClassifier(Path(context.artifacts[CLASSIFIER_ARTIFACT]))
        self.log = PredictionLog.from_settings(getattr(context, "model_config", None))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:  # noqa: ANN001
        top_k = (params or {}).get("top_k", 1)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise InputError(f"top_k must be a positive integer; got {top_k!r}")
        texts = as_texts(model_input)
        answers = self.classifier.predict(texts, int(top_k))
        if getattr(self, "log", None) is not None and texts:
            self.log.record(texts, answers)
        return answers


mlflow.models.set_model(DistilledClassifierModel())
