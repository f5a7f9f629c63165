"""MLflow: the one home of experiment tracking and the model registry.

The registry is reached through ``Registry``, an adapter around an explicit ``MlflowClient`` that tells "not there"
(``None`` / ``NotFound``) from "cannot tell" (``RegistryUnavailable``, after retries with backoff): a store that does
not answer is never read as an empty registry, so no decision is made on missing facts.

Models are logged as MLflow pyfunc models that carry the transformers classifier folder (safetensors weights +
tokenizer) as an artifact, so ``mlflow.pyfunc.load_model("models:/student@champion").predict([...])`` serves
them anywhere, and the pipeline itself downloads the same folder to run torch on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from distillery import processes
from distillery.config import Config
from distillery.integrations.guard import Guard, ServingLimits
from distillery.models.folders import MAX_PARAMETERS, check_classifier_folder, refuse_custom_code
from distillery.integrations.served_model import CLASSIFIER_ARTIFACT, LOG_CONFIG, ONNX_INT8_FILE, SERVING_FILE
from distillery.records import SnapshotRef
from distillery.errors import DistilleryError

logger = logging.getLogger(__name__)

PER_CLASS_FILE = "per_class_f1.json"


class TrackingError(DistilleryError, RuntimeError):
    """MLflow is unreachable or the registry lacks what was asked for; the message says what to do."""


class NotFound(TrackingError):
    """The registry answered: the model, version or alias does not exist."""


class RegistryUnavailable(TrackingError):
    """The tracking/registry store did not answer (after retries): nothing can be concluded from it."""


_NOT_FOUND_CODES = {"RESOURCE_DOES_NOT_EXIST"}


def _is_not_found(exc: BaseException) -> bool:
    """MLflow's own word that a thing does not exist (a missing alias comes as INVALID_PARAMETER_VALUE)."""
    if not isinstance(exc, MlflowException):
        return False
    return exc.error_code in _NOT_FOUND_CODES or (
        exc.error_code == "INVALID_PARAMETER_VALUE" and "alias" in str(exc) and "not found" in str(exc))


def _short_reason(exc: BaseException) -> str:
    """The gist of a transport failure (urllib3's messages run to several hundred characters)."""
    text = str(exc)
    for gist in ("Connection refused", "Read timed out", "Connection reset", "Name or service not known",
                 "database is locked", "No route to host"):
        if gist in text:
            return gist.lower()
    return (text.splitlines()[0][:200] if text else "") or type(exc).__name__


class Registry:
    """The model registry (and run lookups) through one explicit client, with faults classified and retried.

    Reads and idempotent writes (tags, aliases, deletes) are retried ``retries`` times with exponential backoff when
    the store does not answer; creating a version is not retried (a retry could register it twice).
    """

    def __init__(self, uri: str, retries: int = 3, backoff_s: float = 1.0):
        self.uri = uri
        self.retries = max(1, retries)
        self.backoff_s = backoff_s
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    @classmethod
    def from_config(cls, cfg: Config) -> "Registry":
        return cls(tracking_uri(cfg), cfg.tracking.retries, cfg.tracking.retry_backoff_s)

    def _call(self, what: str, fn: Callable[[], Any], retry: bool = True) -> Any:
        """Run ``fn``; NotFound when MLflow says the thing does not exist, RegistryUnavailable when it cannot answer."""
        attempts = self.retries if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - every failure is classified below
                if _is_not_found(exc):
                    raise NotFound(f"{what}: {str(exc).splitlines()[0]}") from None
                if isinstance(exc, MlflowException) and exc.error_code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
                    raise TrackingError(f"{what}: {str(exc).splitlines()[0]}") from None
                if attempt == attempts:
                    detail = _short_reason(exc)
                    raise RegistryUnavailable(
                        f"the MLflow store at {self.uri} did not answer {what} after {attempts} attempt(s): {detail}. "
                        f"Nothing was decided on it; check the server (or tracking.uri / MLFLOW_TRACKING_URI) and "
                        f"run again."
                    ) from None
                wait = self.backoff_s * 2 ** (attempt - 1)
                logger.warning("registry: %s failed (%s); retrying in %.1f s", what, type(exc).__name__, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def alias_version(self, name: str, alias: str) -> ModelVersion | None:
        """The version behind ``name@alias``; None only when the registry says the model or alias does not exist."""
        try:
            return self._call(f"reading {name}@{alias}", lambda: self.client.get_model_version_by_alias(name, alias))
        except NotFound:
            return None

    def champion(self, cfg: Config) -> ModelVersion | None:
        """The version behind ``student@champion`` as the config names them (None only when the registry says the
        alias is not set)."""
        return self.alias_version(cfg.tracking.student_name, cfg.tracking.champion_alias)

    def version(self, name: str, version: str) -> ModelVersion:
        return self._call(f"reading {name} v{version}", lambda: self.client.get_model_version(name, str(version)))

    def resolve(self, name: str, ref: str) -> ModelVersion:
        """``ref`` is an alias (``production``) or a version number (``3``); NotFound with what to do when missing."""
        try:
            if str(ref).isdigit():
                return self.version(name, str(ref))
            return self._call(f"reading {name}@{ref}", lambda: self.client.get_model_version_by_alias(name, ref))
        except NotFound:
            raise NotFound(
                f"registered model {name}@{ref} not found in {self.uri}: run `distillery teacher` to bootstrap one, "
                f"or check the name/alias in the config"
            ) from None

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of ``name``, oldest first (an empty list only when the registry answered so)."""
        found = self._call(f"listing versions of {name}",
                           lambda: self.client.search_model_versions(f"name='{name}'"))
        return sorted(found, key=lambda v: int(v.version))

    def register(self, model_uri: str, name: str, tags: dict[str, Any]) -> ModelVersion:
        """Create a version with its tags (never an alias: callers move aliases last). Not retried."""
        mlflow.set_registry_uri(self.uri)
        return self._call(f"registering {name}", lambda: mlflow.register_model(
            model_uri, name, tags={k: tag_value(v) for k, v in tags.items()}), retry=False)

    def set_tags(self, name: str, version: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self._call(f"tagging {name} v{version}",
                       lambda k=key, v=value: self.client.set_model_version_tag(name, str(version), k, tag_value(v)))

    def describe(self, name: str, version: str, text: str) -> None:
        """The version's description (markdown in the MLflow UI): distillery writes the model card there."""
        self._call(f"describing {name} v{version}",
                   lambda: self.client.update_model_version(name, str(version), description=text))

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._call(f"moving {name}@{alias} to v{version}",
                   lambda: self.client.set_registered_model_alias(name, alias, str(version)))

    def model_tags(self, name: str) -> dict[str, str]:
        """The registered model's own tags (not a version's)."""
        return dict(self._call(f"reading {name}", lambda: self.client.get_registered_model(name)).tags)

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self._call(f"tagging {name}", lambda: self.client.set_registered_model_tag(name, key, value))

    def delete_version(self, name: str, version: str) -> None:
        try:
            self._call(f"deleting {name} v{version}", lambda: self.client.delete_model_version(name, str(version)))
        except NotFound:
            pass  # already gone: what a delete wants

    def run(self, run_id: str):  # noqa: ANN201 - mlflow.entities.Run or None
        """A tracking run, or None when the store says it does not exist."""
        try:
            return self._call(f"reading run {run_id}", lambda: self.client.get_run(run_id))
        except NotFound:
            return None


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{cfg.path('mlflow.db')}"


def check_server(uri: str, timeout: float = 5.0) -> None:
    """For an http(s) tracking URI, fail fast with a clear message when the server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status != 200:
                raise TrackingError(f"MLflow server at {uri} answered {resp.status} on /health")
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(
            f"MLflow tracking server at {uri} is not reachable ({exc}). Start it (`scripts/stack.sh up` starts one), fix "
            f"tracking.uri / MLFLOW_TRACKING_URI, or unset them to use the embedded SQLite store."
        ) from None


def configure_tracking(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment (created with a project-local artifact root when local)."""
    uri = tracking_uri(cfg)
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        location = None
        if not uri.startswith(("http://", "https://", "databricks")):
            location = cfg.path(cfg.tracking.artifact_location).as_uri()
        try:
            mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
        except MlflowException:
            pass  # created meanwhile by a parallel run
    mlflow.set_experiment(cfg.tracking.experiment)
    return uri


SERVED_MODEL_CODE = Path(__file__).with_name("served_model.py")


def _requirements(quantize: str = "fp32") -> list[str]:
    """What loading the model needs, pinned to this environment: never the project itself."""
    from importlib.metadata import version

    names = ("mlflow", "torch", "transformers", "pandas", "numpy")
    if quantize == "onnx-int8":
        names += ("onnxruntime",)
    return [f"{name}=={version(name)}" for name in names]


def model_signature(labels: list[str]):  # noqa: ANN201 - an mlflow ModelSignature
    """Outputs and the ``top_k`` parameter; the input schema is left open so an empty batch gives an empty result
    (MLflow's own check refuses an empty list) and the loader validates the input itself."""
    from mlflow.models import ModelSignature, infer_signature

    example = pd.DataFrame({"label": [labels[0]], "confidence": [1.0],
                            "top_k": [[{"label": labels[0], "probability": 1.0}]], "abstained": [False]})
    inferred = infer_signature(["a text"], example, params={"top_k": 1})
    return ModelSignature(inputs=None, outputs=inferred.outputs, params=inferred.params)


def log_classifier(folder: Path, name: str = "model", quantize: str = "fp32", max_length: int = 128,
                   input_example: list[str] | None = None,
                   calibration: dict[str, Any] | None = None) -> mlflow.models.model.ModelInfo:
    """Log a classifier folder as a self-contained pyfunc model of the active run.

    The loader is ``served_model.py`` (models-from-code), so the model loads wherever its requirements are installed;
    ``quantize`` and ``max_length`` are the served form and tokenizer settings the harness measured;
    ``calibration`` (``calibration_temperature``, ``abstain_below``, ``oos_label``) how confidences are scaled and when to abstain.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / CLASSIFIER_ARTIFACT
        shutil.copytree(folder, staged)
        extra = {}
        if quantize == "onnx-int8":  # the served bytes are the measured bytes: say which
            onnx = staged / ONNX_INT8_FILE
            if not onnx.is_file():
                raise TrackingError(f"{folder} has no {ONNX_INT8_FILE}: the harness writes it when it measures the "
                                    f"onnx-int8 form")
            extra["onnx_sha256"] = hashlib.sha256(onnx.read_bytes()).hexdigest()
        (staged / SERVING_FILE).write_text(json.dumps({"quantize": quantize, "max_length": max_length,
                                                       "truncation": True, **extra, **(calibration or {})}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=str(SERVED_MODEL_CODE),
                artifacts={CLASSIFIER_ARTIFACT: str(staged)},
                signature=model_signature(labels),
                input_example=input_example or ["I lost my card", "how do I top up?"],
                pip_requirements=_requirements(quantize),
                model_config=LOG_CONFIG,  # the prediction log's keys, off: `load_model(..., model_config=)` turns it on
            )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "sentencepiece.bpe.model", "spiece.model")
MODEL_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "wasbs://", "file:")


def _classifier_folders(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("config.json") if any(p.parent.glob("*.safetensors"))})


def fetch_classifier(source: str, target: Path, max_parameters: int = MAX_PARAMETERS) -> Path:
    """Copy an existing classifier into ``target`` as one transformers folder (config, safetensors, tokenizer).

    ``source`` is a transformers folder, an MLflow model folder, or an MLflow model URI (``models:/name@alias``,
    ``runs:/id/path``...) of a distillery pyfunc or of the MLflow transformers flavour (weights in ``model/``,
    tokenizer in ``components/tokenizer/``). Only safetensors weights are accepted and remote code never is.
    """
    target = Path(target)
    shutil.rmtree(target, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        if str(source).startswith(MODEL_URI_SCHEMES):
            try:
                root = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(source), dst_path=tmp))
            except MlflowException as exc:
                raise TrackingError(f"teacher source {source}: {str(exc).splitlines()[0]}") from None
        else:
            root = Path(source).expanduser()
            if not root.is_dir():
                raise TrackingError(f"teacher source {source} is neither a folder nor an MLflow model URI "
                                    f"(models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH)")
        folders = _classifier_folders(root)
        if not folders:
            weights = sorted(p.name for p in root.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            hint = f" (found {weights[:3]}: re-save it with save_pretrained(safe_serialization=True))" if weights else ""
            raise TrackingError(f"teacher source {source} holds no transformers classifier with safetensors "
                                f"weights (config.json + *.safetensors){hint}")
        if len(folders) > 1:
            raise TrackingError(f"teacher source {source} holds {len(folders)} models ({[str(f) for f in folders]}): "
                                f"point at one")
        model_dir = folders[0]
        check_classifier_folder(model_dir, max_parameters)  # custom code, a config that is not JSON, a memory bomb: before anything is copied
        shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.pth", "*.ckpt",
                                                                         SERVING_FILE))
        if not any((target / f).is_file() for f in TOKENIZER_FILES):
            tokenizers = sorted({p.parent for name in TOKENIZER_FILES for p in root.rglob(name)})
            if len(tokenizers) != 1:
                raise TrackingError(f"teacher source {source}: found {len(tokenizers)} tokenizer folders beside the "
                                    f"weights; expected one (save the tokenizer with the model)")
            refuse_custom_code(tokenizers[0])  # the tokenizer is read too: no custom code there either
            for f in tokenizers[0].iterdir():
                if f.is_file():
                    shutil.copy2(f, target / f.name)
    return target


def load_served_model(model_uri: str):  # noqa: ANN201 - mlflow.pyfunc.PyFuncModel
    """Load a registered model as any user would (its own loader, its served form)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return mlflow.pyfunc.load_model(model_uri)
        except MlflowException as exc:
            raise TrackingError(f"cannot load {model_uri}: {str(exc).splitlines()[0]}") from None
        except (ImportError, AttributeError) as exc:  # a cloudpickled wrapper from before the self-contained loader
            raise TrackingError(
                f"cannot load {model_uri} ({type(exc).__name__}: {exc}): it was registered by an older distillery as a "
                f"pickled wrapper of code that has moved; `distillery distill --force` registers the current student "
                f"in the self-contained form") from None


def scoring_app(model_uri: str, limits: ServingLimits):  # noqa: ANN201 - an ASGI app
    """MLflow's own scoring app (``POST /invocations``, ``GET /ping``) on the registered model as any user loads it,
    behind the serving limits (``guard.Guard``)."""
    from mlflow.pyfunc import scoring_server

    return Guard(scoring_server.init(load_served_model(model_uri)), limits)


def tag_value(value: Any) -> str:
    """A value as MLflow stores it in a tag (JSON for non-strings, capped at MLflow's length limit)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:4900]  # MLflow caps tag values at 5000 characters


def download_classifier(version: ModelVersion, cache_root: Path) -> Path:
    """Local classifier folder of a registry version (downloaded once into ``cache_root``)."""
    target = Path(cache_root) / f"{version.name}-v{version.version}"
    folder = target / "artifacts" / CLASSIFIER_ARTIFACT
    if (folder / "config.json").is_file():
        return folder
    partial = target.with_name(target.name + ".partial")  # a crash mid-download never looks complete
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(partial))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    if not (folder / "config.json").is_file():
        raise TrackingError(f"{version.name} v{version.version} holds no classifier folder: was it logged by distillery?")
    return folder


def curve_logger(prefix: str = "curve.") -> Callable[[int, dict], None]:
    """An ``on_epoch_end`` callback that logs an epoch's training row as metrics at step=epoch."""

    def log(epoch: int, row: dict) -> None:
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in row.items() if k != "epoch"}, step=epoch)

    return log


def log_params(params: dict[str, Any]) -> None:
    """Log many params at once (values stringified, MLflow's 6000-character cap respected)."""
    mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})


def log_metrics(metrics: dict[str, float]) -> None:
    """Log metrics to the active run (tasks log through this adapter, never MLflow itself)."""
    mlflow.log_metrics(metrics)


def set_tags(tags: dict[str, Any]) -> None:
    """Tag the active run."""
    mlflow.set_tags(tags)


def log_text(text: str, artifact_file: str) -> None:
    """A text artifact on the active run."""
    mlflow.log_text(text, artifact_file)


def log_json(data: Any, artifact_file: str) -> None:
    mlflow.log_dict(data, artifact_file)


def load_run_json(run_id: str, artifact_file: str) -> Any:
    """A JSON artifact of a run, or None when the run has no such file."""
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{artifact_file}")
    except (MlflowException, OSError):
        return None


def log_folder(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifacts(str(path), artifact_path)


PROCESS_TAG = "distillery.process"  # "<host> <pid> <process start time>": which process a run's status depends on
_CREATED_RUNS: list[str] = []  # the runs this process created: an interrupted command marks those still RUNNING


def mark_interrupted_runs(status: str = "KILLED") -> list[str]:
    """End the runs this process created that are still RUNNING (an interrupted command); best effort, never raises:
    what cannot be marked now, ``distillery gc`` marks as failed later."""
    marked = []
    for run_id in _CREATED_RUNS:
        try:
            client = MlflowClient()
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status=status)
                marked.append(run_id)
        except Exception:  # noqa: BLE001 - an unreachable store: gc marks them later
            continue
    return marked


def fail_orphaned_runs(reg: Registry, experiment_name: str, apply: bool = True) -> list[str]:
    """Runs left RUNNING by a distillery process that no longer exists (killed, crashed): marked FAILED."""
    experiment = reg._call(f"reading experiment {experiment_name}",
                           lambda: reg.client.get_experiment_by_name(experiment_name))
    if experiment is None:
        return []
    running = reg._call("listing running runs", lambda: reg.client.search_runs(
        [experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=1000))
    orphans = [run.info.run_id for run in running
               if processes.process_alive(run.data.tags.get(PROCESS_TAG, "")) is False]
    for run_id in orphans if apply else ():
        reg._call(f"marking run {run_id} failed", lambda r=run_id: reg.client.set_terminated(r, status="FAILED"))
    return orphans


def source_tags(cfg: Config) -> dict[str, str]:
    """MLflow's standard source tags (the UI's Source column: the code revision), the Prefect flow run behind it and
    the process that runs it (so that a run left RUNNING by a killed process can be told from a live one)."""
    from distillery.integrations.store import git_revision

    revision = git_revision(Path(cfg.root))
    tags = {"mlflow.source.type": "JOB", "mlflow.source.name": "distillery", PROCESS_TAG: processes.this_process()}
    if revision != "unknown":
        tags["mlflow.source.git.commit"] = revision.removesuffix("-dirty")
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            tags |= {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
            if str(flow_run.ui_url or "").startswith("http"):  # a temporary server has no UI address to link
                tags["prefect.flow_run_url"] = str(flow_run.ui_url)
    except Exception:  # noqa: BLE001 - outside a flow run there is nothing to link
        pass
    return tags


def snapshot_dataset(cfg: Config, snapshot: SnapshotRef, split: str):  # noqa: ANN201 - an MLflow PandasDataset
    """The DVC snapshot as an MLflow dataset: digest = the snapshot md5, source = where the DVC remote keeps it."""
    import pandas as pd

    remote = cfg.dvc.remote_url if "://" in cfg.dvc.remote_url else str(cfg.path(cfg.dvc.remote_url))
    md5 = snapshot.md5.removesuffix(".dir")
    frame = pd.read_parquet(Path(snapshot.path) / f"{split}.parquet", columns=["text", "label"])
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns that it is ambiguous
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_pandas(frame, source=f"{remote.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}.dir",
                                       targets="label", name=f"{Path(cfg.data.snapshot_dir).name}-{split}",
                                       digest=snapshot.md5[:10])


def create_run(cfg: Config, run_name: str, tags: dict[str, Any] | None = None, parent_run_id: str | None = None,
               snapshot: SnapshotRef | None = None, split: str = "train", params: dict[str, Any] | None = None) -> str:
    """Create a run (nested under ``parent_run_id`` when given) and return its id; tasks reopen it by id.

    Every run carries the standard source tags and its Prefect flow run; a run that reads the data snapshot logs it
    as an MLflow dataset input (``split``: which part it reads; the context says training or evaluation).
    """
    configure_tracking(cfg)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    all_tags = {**source_tags(cfg), **{k: tag_value(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    client = MlflowClient()
    run = client.create_run(experiment.experiment_id, run_name=run_name, tags=all_tags)
    _CREATED_RUNS.append(run.info.run_id)
    if snapshot is not None:
        from mlflow.entities import DatasetInput, InputTag

        dataset = snapshot_dataset(cfg, snapshot, split)
        context = InputTag(key="mlflow.data.context", value="evaluation" if split == "test" else "training")
        client.log_inputs(run.info.run_id, [DatasetInput(dataset._to_mlflow_entity(), tags=[context])])
    if params:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(run.info.run_id, params=items[start:start + 100])
    return run.info.run_id


@contextmanager
def open_run(cfg: Config, run_id: str) -> Iterator[mlflow.ActiveRun]:
    """Reopen a run by id in this thread/process; it ends FINISHED, FAILED when the block raises an error, KILLED when
    the command was interrupted (Ctrl-C, SIGTERM: exceptions that are not errors)."""
    configure_tracking(cfg)
    run = mlflow.start_run(run_id=run_id)
    try:
        yield run
    except BaseException as exc:
        mlflow.end_run("FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    mlflow.end_run("FINISHED")


def log_to_run(cfg: Config, run_id: str, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
               tags: dict[str, Any] | None = None, folder: Path | None = None, artifact_path: str | None = None,
               json_files: dict[str, Any] | None = None) -> None:
    """Log to a run by id, in one reopening: params, metrics, tags, JSON artifacts (``{artifact file: data}``) and a
    folder of files (as ``artifact_path``)."""
    with open_run(cfg, run_id):
        for artifact_file, data in (json_files or {}).items():
            log_json(data, artifact_file)
        if params:
            log_params(params)
        if metrics:
            mlflow.log_metrics(metrics)
        if tags:
            mlflow.set_tags({k: tag_value(v) for k, v in tags.items()})
        if folder is not None:
            log_folder(folder, artifact_path)


def log_candidate_runs(cfg: Config, eval_run_id: str, metrics: dict[str, dict], labels: list[str],
                       tags: dict[str, dict[str, Any]]) -> None:
    """One nested run per measured candidate under the evaluation run: its metrics, its per-class F1 (by label, what
    the gate reads back) and its ``tags`` (the measured files' hash among them)."""
    for name, m in metrics.items():
        run_id = create_run(cfg, name, {"stage": "evaluate", "candidate": name, **tags.get(name, {})}, eval_run_id)
        with open_run(cfg, run_id):
            mlflow.log_metrics({k: v for k, v in m.items() if k != "per_class_f1"})
            log_json(dict(zip(labels, m["per_class_f1"])), PER_CLASS_FILE)


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status=status)


def registered_files_sha256(reg: Registry, name: str, version: str) -> str:
    """The hash of a registered version's classifier files as the registry serves them (downloaded afresh), with the
    function and exclusions the evaluation hashed the measured folder with (``store.tree_sha256``)."""
    from distillery.integrations.store import tree_sha256

    def read() -> str:
        with tempfile.TemporaryDirectory(prefix="distillery-verify-model-") as tmp:
            root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
            folder = root / "artifacts" / CLASSIFIER_ARTIFACT
            if not (folder / "config.json").is_file():
                raise NotFound(f"{name} v{version} holds no {CLASSIFIER_ARTIFACT}/ folder: not a distillery model")
            return tree_sha256(folder, exclude=(SERVING_FILE,))

    return reg._call(f"downloading {name} v{version}", read)


def candidate_tags(reg: Registry, eval_run_id: str) -> dict[str, dict[str, str]]:
    """The tags of an evaluation's candidate runs, by candidate name (the measured files' hash among them)."""

    def read() -> dict[str, dict[str, str]]:
        parent = reg.client.get_run(eval_run_id)
        runs = reg.client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{eval_run_id}'", max_results=50)
        return {run.data.tags.get("candidate"): dict(run.data.tags) for run in runs}

    return reg._call(f"reading the candidates of evaluation run {eval_run_id}", read)


def set_run_tags(reg: Registry, run_id: str, tags: dict[str, Any]) -> None:
    """Tag a finished run (retried like any registry write)."""
    for key, value in tags.items():
        reg._call(f"tagging run {run_id}", lambda k=key, v=value: reg.client.set_tag(run_id, k, tag_value(v)))


def logged_candidate_metrics(reg: Registry, eval_run_id: str) -> dict[str, dict]:
    """Read the candidates' metrics (and per-class F1) back from MLflow: what the gate decides on."""

    def read() -> dict[str, dict]:
        parent = reg.client.get_run(eval_run_id)
        runs = reg.client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{eval_run_id}'", max_results=50)
        out = {}
        for run in runs:
            name = run.data.tags.get("candidate")
            per_class = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{PER_CLASS_FILE}")
            out[name] = {**run.data.metrics, "per_class_f1": list(per_class.values()), "labels": list(per_class)}
        return out

    return reg._call(f"reading the metrics of evaluation run {eval_run_id}", read)


# What the CLI reports as one clear line: our own errors, and MLflow's for a call outside the adapter (a run's logging)
KNOWN_ERRORS: tuple[type[BaseException], ...] = (TrackingError, MlflowException)
