"""One typed configuration for the whole pipeline.

Frozen pydantic models, loaded from one YAML file, overridable by dotted keys (``distill.temperature=2.0``) from the
CLI and from flow parameters. The defaults here are the default profile (``distillery.yaml`` shows each with why;
a profile such as ``configs/fast.yaml`` lists only what differs). A check on one field sits on the field (``Field``
bounds, ``Literal`` choices, ``Share`` for a value in [0, 1]); only rules across fields are in ``validate_config``.
A bad value ends in one ``ConfigError`` that names the key and says what is allowed. Load it once at an entry point
and hand it (or the section a step needs) down.

Layering (``extends:``) and the section-by-section merge are the ~30 lines of ``_read_layered``: smaller than the
glue a config library (OmegaConf, Hydra) would need to keep these frozen pydantic models and their one-line errors.
"""

from __future__ import annotations

import hashlib
import json
import re
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, model_validator
from distillery.errors import DistilleryError
from distillery.paths import WorkFolder

CONFIG_ENV = "DISTILLERY_CONFIG"
DEFAULT_CONFIG_NAME = "distillery.yaml"


def _switch_word(value: object) -> object:
    """YAML 1.1 (PyYAML, and so a config file or --set) reads a bare on/off as a boolean: back to the word."""
    return ("on" if value else "off") if isinstance(value, bool) else value


YamlSwitch = BeforeValidator(_switch_word)  # for choices that include "on"/"off"


class ConfigError(DistilleryError, ValueError):
    """A configuration value is missing, unknown or out of range."""


def _in_unit_interval(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be in [0, 1]")
    return value


Share = Annotated[float, AfterValidator(_in_unit_interval)]  # a share of accuracy, recall, probability...
Fraction = Annotated[float, Field(gt=0.0, lt=0.5)]  # a split carved from the data
Positive = Annotated[int, Field(ge=1)]
Length = Annotated[int, Field(ge=8, le=512)]  # tokens a model reads
Layers = tuple[Annotated[int, Field(ge=0)], ...]


class Section(BaseModel):
    """A frozen config section: unknown keys are errors, YAML numbers are accepted where text is expected."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)


class AugmentConfig(Section):
    """Augmented variants of the training texts, labelled by the teacher as a transfer set (models.augment)."""

    multiple: float = Field(1.0, ge=0.0)  # variants per training text; 0 makes none
    methods: tuple[Literal["mask", "drop", "swap", "ngram", "vocab"], ...] = Field(("mask", "drop", "swap", "ngram"),
                                                                                  min_length=1)
    p_mask: Share = 0.1
    p_drop: Share = 0.1
    p_swap: Share = 0.1
    p_vocab: Share = 0.1
    seed: int | None = None  # null: data.seed
    # no variant (nor data.transfer_set text) within this many word edits of a validation or test text: a near copy
    # would teach the distilled student a held-out text (models.augment); 0 drops exact copies only. 0 until its
    # effect on accuracy is measured on both data sets (benchmarks/README.md); 1 is the filter
    near_copy_words: int = Field(0, ge=0, le=3)


class DataConfig(Section):
    source: str = "../shared/data/banking77"
    text_column: str = Field("text", min_length=1)
    label_column: str = Field("category", min_length=1)
    split_column: str = "split"  # in a single-table source: train/test/validation per row (else test is carved)
    snapshot_dir: str = "data"
    validation_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.1  # the test split carved from a source that has none
    seed: int = 13
    max_drop_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    transfer_set: str | None = None
    # out-of-scope inputs: rows labelled `oos_label` belong to no intent (not a class: the models learn to abstain);
    # for data without such rows, `holdout_intents` intents (a seeded choice, recorded in the snapshot) are held out
    # of training and count as out of scope at evaluation
    oos_label: str | None = None
    holdout_intents: int = Field(0, ge=0)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class DvcConfig(Section):
    remote_name: str = "local"
    remote_url: str = ".distillery/dvc-remote"


class TrainingSection(Section):
    """What the teacher's fine-tune and the students' training share."""

    epochs: Positive = 4
    batch_size: Positive = 32
    learning_rate: float = Field(1e-4, gt=0.0)
    weight_decay: float = 0.01
    warmup_fraction: float = Field(0.06, ge=0.0, lt=1.0)
    max_length: Length = 64
    seed: int = 13
    max_steps: Positive | None = None
    group_by_length: StrictBool = True


class EndpointConfig(Section):
    """A black-box teacher behind HTTP (``teacher.kind: endpoint``): any model server that speaks MLflow's scoring
    protocol (``POST {url}/invocations``, as ``mlflow models serve`` and ``distillery serve`` answer), returning
    per-label probabilities, its top k or only a label. Only its answers are used, each asked once (cached)."""

    url: str | None = None  # e.g. http://127.0.0.1:5001 (the /invocations path is added when missing)
    name: str = Field("endpoint-teacher", min_length=1)  # how the teacher is named in runs and the lineage
    # sent with every request as MLflow's `params`, e.g. {top_k: 77} to get every label's probability from a
    # distillery-served classifier (part of the teacher's identity: other params are another teacher)
    params: dict[str, Any] = Field(default_factory=dict)
    api_key_env: str | None = None  # the environment variable holding a bearer token (never the token itself)
    texts_per_request: Positive = 16
    concurrency: Positive = 4  # requests in flight at once
    requests_per_second: float | None = Field(None, gt=0.0)  # a rate limit across all of them
    timeout_s: float = Field(30.0, gt=0.0)  # per request
    retries: int = Field(4, ge=0)  # on 429, 5xx, timeouts and refused connections, with exponential backoff
    backoff_s: float = Field(0.5, ge=0.0)  # first wait; doubles each retry (a 429's Retry-After is honoured)
    max_failure_rate: Share = 0.05  # requests that still fail after retries: over this share the run stops
    # the budget, checked before the first request: a labelling that would exceed it asks nothing
    max_requests: int | None = Field(None, ge=0)
    max_cost: float | None = Field(None, ge=0.0)
    price_per_request: float = Field(0.0, ge=0.0)
    price_per_1k_texts: float = Field(0.0, ge=0.0)
    # over the budget: stop (ask nothing), or select: ask the train, validation and test texts and, of the generated
    # and transfer texts not answered yet, as many as the budget allows, chosen by `selection` (the rest go unlabelled)
    over_budget: Literal["stop", "select"] = "stop"
    selection: Literal["diverse", "random"] = "diverse"  # diverse: one text per cluster of their TF-IDF vectors
    hard_label_smoothing: Share = 0.1  # a label answered alone: 1 - this on it, the rest spread over the others
    recheck: int = Field(16, ge=0)  # cached texts re-asked each labelling: the agreement says if its answers drift


class LlmConfig(Section):
    """An LLM teacher (``teacher.kind: llm``) behind an OpenAI-compatible chat-completions endpoint (vLLM,
    llama.cpp's server, Ollama, TGI, ``transformers serve``, hosted APIs) at ``teacher.endpoint.url`` (its ``/v1``;
    ``/chat/completions`` is added), asked one text per request with the transport and budget of
    ``teacher.endpoint``. Its reply (free text, or ``{"label": ...}`` under ``structured_output: json_schema``) is
    parsed into the label set; the log-probabilities of the label's first token give soft labels when the server
    returns them, else the label is a hard one."""

    model: str = Field("default", min_length=1)  # the model name the server serves
    # null: no system message (a small model may follow the prompt alone better)
    system_prompt: str | None = "You are a text classifier. Reply with exactly one label from the list and nothing else."
    # {labels}: one per line (with its description), {choices}: the names inline ("a, b or c"), {examples}: the
    # few-shot examples, {text}: the text. A small model may need its own phrasing
    prompt: str = "Labels:\n{labels}\n\n{examples}Text: {text}\nLabel:"
    descriptions: dict[str, str] = Field(default_factory=dict)  # label -> what it means, shown beside it
    few_shot: int = Field(0, ge=0)  # examples from the training split (data.seed), spread over the labels
    max_tokens: Positive = 16  # for the label; structured output sends STRUCTURED_REPLY_TOKENS more for its JSON
    temperature: float = Field(0.0, ge=0.0)
    logprobs: StrictBool = True  # ask for the first token's top log-probabilities (soft labels where returned)
    top_logprobs: int = Field(5, ge=1, le=20)
    price_per_1k_tokens: float = Field(0.0, ge=0.0)  # for the budget: prompt tokens estimated as characters / 4
    # json_schema: the reply constrained to {"label": <a label>} through OpenAI's response_format (vLLM, llama.cpp's
    # llama-server, Ollama, SGLang and OpenAI's API honour it; soft labels then come from the label's first token) |
    # json_object: the same schema in the {"type": "json_object", "schema": ...} form (llama-cpp-python's server, which
    # refuses the other) | none: free text, parsed. A server that ignores the field (transformers serve) answers free
    # text, parsed as with none
    structured_output: Literal["none", "json_schema", "json_object"] = "none"

    @property
    def reply_tokens(self) -> int:
        """The reply's token limit as sent: ``max_tokens`` for the label, plus room for the JSON around it under
        structured output (a constrained server may spend a token per character of ``{"label": ""}``; cut short,
        the reply is no JSON and its row unanswered)."""
        return self.max_tokens + (STRUCTURED_REPLY_TOKENS if self.structured_output != "none" else 0)


STRUCTURED_REPLY_TOKENS = 16  # measured: llama-cpp-python's server spent 11 tokens on SmolLM2's {"label": ...} wrapper

# an ensemble member: a registered model as name@alias or name/version
ENSEMBLE_MEMBER = re.compile(r"^(?P<name>[^@/\s]+)(?:@(?P<alias>[^@/\s]+)|/(?P<version>\d+))$")


class EnsembleConfig(Section):
    """An ensemble teacher (``teacher.kind: ensemble``): registered teachers whose probabilities, each calibrated on
    validation, are averaged. Each member labels on its own (its outputs cached under its own version, so adding a
    member labels only that member); the harness measures the ensemble and every member."""

    name: str = Field("ensemble-teacher", min_length=1)  # how the ensemble is named in runs and the lineage
    members: list[str] = Field(default_factory=list)  # registered models as name@alias or name/version
    # one per member (normalised to sum to 1); null: chosen on validation, minimising the mixture's log-loss
    weights: list[float] | None = None
    calibrate: StrictBool = True  # each member's temperature fitted on validation before averaging


class TeacherConfig(TrainingSection):
    # registered: a classifier in the MLflow registry (fine-tuned here, or imported); ensemble: several registered
    # ones (teacher.ensemble); endpoint: a model behind HTTP speaking MLflow's scoring protocol; llm: a chat model
    # behind an OpenAI-compatible API (teacher.llm)
    kind: Literal["registered", "ensemble", "endpoint", "llm"] = "registered"
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    llm: LlmConfig = Field(default_factory=LlmConfig)
    base_model: str = "mpnet"
    # an existing fine-tuned classifier to import instead of fine-tuning base_model (a transformers folder or an
    # MLflow model URI); `distillery run` imports it when no teacher is registered yet
    source: str | None = None
    registered_name: str = "teacher-large"
    alias: str = Field("production", min_length=1)
    # a model folder whose config describes more parameters is refused before anything is allocated
    max_parameters: int = Field(2_000_000_000, gt=0)


class LabellingConfig(Section):
    batch_size: Positive = 64
    shards: Positive = 2
    cache_dir: str = ".distillery/teacher-outputs"
    reuse_rows: bool = True


class ValidationConfig(Section):
    min_predictions_per_class: int = Field(1, ge=0)
    prob_sum_tolerance: float = Field(1e-3, gt=0.0, lt=0.5)
    min_mean_confidence: Share = 0.2
    max_mean_confidence: Share = 1.0
    max_mean_entropy_fraction: float = Field(0.8, gt=0.0, le=1.0)
    min_teacher_accuracy: Share = 0.5
    min_teacher_macro_f1: Share = 0.45
    # a black-box teacher (teacher.kind: endpoint): the share of rows whose answer names a label of the data
    min_answered_share: Share = 0.95


STATIC_LEARNING_RATE = 2e-3  # a static student's table and head learn at model2vec's pace, not a transformer's


class ShapeRecipe(Section):
    """A frontier shape's own distillation recipe (instead of the one chosen for the student above)."""

    temperature: float = Field(gt=0.0)
    kd_weight: float = Field(ge=0.0)
    ce_weight: float = Field(ge=0.0)


# a static frontier shape's recipe: softer targets, more weight on the hard labels. Measured over 3 seeds: on
# BANKING77 (MPNet teacher) +2.26 +- 0.20 points over its hard-label baseline where the champion's recipe (T 4, kd
# 0.8) gave -0.48 +- 0.40; on HWU64 (a MiniLM teacher) +0.03 +- 0.23 against -0.10 +- 0.32 (benchmarks/README.md)
STATIC_RECIPE = ShapeRecipe(temperature=1.0, kd_weight=0.5, ce_weight=0.5)


class StudentConfig(Section):
    # static: a token-embedding table, mean-pooled, with a small head (models/static.py), its table made from
    # base_model's encoder ("teacher": the fine-tuned teacher's) as model2vec does, hidden_size wide; served as onnx-int8
    init: Literal["cut", "config", "pretrained", "static"] = "pretrained"
    base_model: str = "minilm"
    layers: Layers = (0, 5)
    num_layers: Positive = 2
    hidden_size: int = 256
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    # init=config: start from the teacher's weights by selection (leading slices, layers spread) instead of random
    select_weights: StrictBool = False
    pretrained_layers: Layers | None = None  # init=pretrained: keep only these layers of it (null: all)
    deploy: Literal["fp32", "int8", "onnx-int8"] = "onnx-int8"
    # keep only the word pieces the training texts (and transfer/oos rows) use, plus special tokens and the
    # `vocab_reserve` shortest pieces; unseen pieces read as [UNK] (WordPiece tokenizers). Off by default: it
    # halves a 6-layer MiniLM's file, buys no speed, and cost test accuracy on both data sets (benchmarks/README.md)
    prune_vocab: StrictBool = False
    vocab_reserve: int = Field(0, ge=0)
    # more student shapes, each distilled with the recipe chosen for this one and measured in the served form: the
    # accuracy / latency / size frontier; entries override keys above, e.g. {layers: [0]} or {init: config,
    # hidden_size: 192}
    # The one default that is not the default profile's: its frontier (pruned cuts of the pretrained MiniLM;
    # distillery.yaml) is made of shapes of that student, which mean nothing for another one
    frontier: tuple[dict[str, Any], ...] = ()
    # this shape's own learning rate instead of the distillation's (a search's pick included); null: the
    # distillation's, except a static student's (STATIC_LEARNING_RATE)
    learning_rate: float | None = Field(None, gt=0.0)
    # a frontier shape's teacher: teacher (the run's) | student (the run's distilled student, the teacher
    # assistant: its soft labels and features, labelled, cached and validated as any teacher's; a cut or
    # base_model: teacher then means the assistant's). The student itself is always taught by the teacher
    taught_by: Literal["teacher", "student"] = "teacher"
    # a frontier shape's own recipe {temperature, kd_weight, ce_weight} instead of the one chosen for the student
    # above; null: that one, except a static shape's (STATIC_RECIPE). The student's own recipe is distill.*
    recipe: ShapeRecipe | None = None

    @model_validator(mode="after")
    def _check_shapes(self) -> "StudentConfig":
        """The student's own shape (layers, width against heads) and each frontier entry's: known keys, a valid
        shape, a label no other student has."""
        problems = _shape_problems(self)
        labels = [self.label]
        for i, shape in enumerate(self.frontier):
            bad = set(shape) - (set(StudentConfig.model_fields) - {"deploy", "frontier"})
            if bad:
                problems.append(f"student.frontier[{i}]: unknown or fixed key(s) {sorted(bad)} (every student is "
                                f"served in student.deploy)")
                continue
            try:
                shaped = self.shaped(shape)
            except ValidationError as exc:
                problems.append(f"student.frontier[{i}]: {_describe(exc)}")
                continue
            if shaped.label in labels:
                problems.append(f"student.frontier[{i}]: shape {shaped.label} is already a student (an entry is the "
                                f"student with its keys changed: give it keys that make another shape, or set "
                                f"student.frontier: [] to train the student alone)")
            labels.append(shaped.label)
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self

    def shaped(self, shape: Mapping[str, Any]) -> "StudentConfig":
        """This student with a frontier entry's keys in place (no frontier of its own)."""
        return StudentConfig.model_validate({**self.model_dump(), **dict(shape), "frontier": ()})

    def frontier_shapes(self) -> dict[str, "StudentConfig"]:
        """The frontier students by their label (``cut0``: its configuration)."""
        shapes = (self.shaped(shape) for shape in self.frontier)
        return {shaped.label: shaped for shaped in shapes}

    @property
    def _base_name(self) -> str:
        """``base_model`` as a label part: its folder name, lower case, other characters as dashes."""
        return "".join(c if c.isalnum() else "-" for c in Path(self.base_model).name.lower())

    @property
    def label(self) -> str:
        """A short name of the shape: cut0-5 (kept teacher layers), h256x2 (a fresh model), minilm or minilm-cut0-2
        (pretrained, all or some layers); ``-pv`` when its vocabulary is pruned, ``-ta`` when the teacher assistant
        (the run's student) teaches it."""
        if self.init == "cut":
            name = "cut" + "-".join(str(i) for i in self.layers)
        elif self.init == "config":
            name = f"h{self.hidden_size}x{self.num_layers}" + ("-ws" if self.select_weights else "")
        elif self.init == "static":
            name = f"static{self.hidden_size}" + ("" if self.base_model == "minilm" else f"-{self._base_name}")
        else:
            name = self._base_name
            name += "-cut" + "-".join(str(i) for i in self.pretrained_layers) if self.pretrained_layers else ""
        return name + ("-pv" if self.prune_vocab else "") + ("-ta" if self.taught_by == "student" else "")


class SweepConfig(Section):
    temperature: tuple[Annotated[float, Field(gt=0.0)], ...] = ()
    kd_weight: tuple[Annotated[float, Field(ge=0.0)], ...] = ()
    feature_weight: tuple[Annotated[float, Field(ge=0.0)], ...] = ()  # e.g. [0.0, 0.5]: feature KD kept only when
                                                                      # it wins on validation


class SearchConfig(Section):
    """An Optuna search over the distillation recipe on the validation split (instead of the grid when trials > 0)."""

    trials: int = Field(0, ge=0)  # 0: no search (the sweep grid, or the configured recipe)
    timeout_s: float | None = None  # stop starting new trials after this many seconds
    parallel: Positive = 2  # trials trained at once, mapped over the task runner
    seed: int | None = None  # null: distill.seed
    startup_trials: int = Field(10, ge=1)  # TPE samples these first trials at random (Optuna's default)
    start_configured: StrictBool = True  # trial 0 is the configured recipe (clamped to the ranges below)
    temperature: tuple[float, float] = (1.0, 8.0)  # ranges searched (log scale for temperature and learning rate)
    kd_weight: tuple[float, float] = (0.3, 1.0)  # ce_weight = 1 - kd_weight
    learning_rate: tuple[float, float] = (5.0e-5, 5.0e-4)
    epochs: tuple[int, int] = (3, 10)
    feature_weight: tuple[float, float] | None = None  # searched too when set (else distill.feature_weight)
    # median pruning: a trial stops after an epoch whose validation macro-F1 is below the median of the finished
    # trials' at that epoch, once `prune_startup` trials have finished and after `prune_warmup` epochs
    prune: StrictBool = True
    prune_startup: Positive = 2
    prune_warmup: int = Field(1, ge=0)


class DistillConfig(TrainingSection):
    temperature: float = Field(4.0, gt=0.0)
    kd_weight: float = Field(0.8, ge=0.0)
    ce_weight: float = Field(0.2, ge=0.0)
    feature_weight: float = Field(0.0, ge=0.0)
    feature_loss: Literal["mse", "cosine"] = "mse"
    # what feature KD aligns: hidden = mapped hidden states token by token (the student reads with the teacher's
    # tokenizer) | pooled = mean-pooled last hidden states per text, through a learned projection (any tokenizer)
    # | auto = pooled for a pretrained student with its own tokenizer, else hidden
    feature_target: Literal["auto", "hidden", "pooled"] = "auto"
    layer_map: dict[int, int] | None = None
    learning_rate: float = Field(2e-4, gt=0.0)
    patience: Positive = 2
    baseline_init: Literal["base", "teacher"] = "base"
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)


class EvaluationConfig(Section):
    threads: Positive = 1
    warmup: int = Field(5, ge=0)
    repeats: Positive = 50
    throughput_batches: Positive = 5
    ece_bins: int = Field(15, ge=2)
    # fit a temperature per candidate on the validation split (temperature scaling); the registered student applies
    # its served form's, so its confidences are calibrated
    calibrate: StrictBool = True
    # abstention threshold on the calibrated confidence, chosen per candidate on validation: auto = when the data has
    # out-of-scope rows (data.oos_label / data.holdout_intents); the served model answers the out-of-scope label
    # below it
    abstain: Annotated[Literal["auto", "on", "off"], YamlSwitch] = "auto"
    abstain_target: Literal["max_accuracy_cost", "oos_recall", "max_inscope_rejection"] = "max_accuracy_cost"
    abstain_score: Literal["confidence", "energy"] = "energy"  # what the threshold is on (see README)
    abstain_value: Share = 0.01  # in-scope accuracy given up / out-of-scope recall reached / in-scope share rejected
    oos_label: str = "out_of_scope"  # what the served model answers when it abstains (data.oos_label when set)


class GateConfig(Section):
    accuracy_tolerance: Share = 0.01
    macro_f1_tolerance: Share = 0.01
    max_latency_ratio: float = Field(0.5, gt=0.0)
    max_class_f1_drop: Share = 0.25
    champion_tolerance: Share = 0.005
    # with out-of-scope data: the student's OOS recall and AUROC may fall at most this far below the FP32 teacher's
    oos_recall_tolerance: Share = 0.05
    oos_auroc_tolerance: Share = 0.02
    # best: judge the student chosen on validation | smallest: judge it and every frontier student, promote the
    # smallest (on disk) that passes
    policy: Literal["best", "smallest"] = "smallest"
    # the student trained without the teacher, judged like the others in its served form. fallback: promoted only when
    # no distilled student passes (never end with nothing when something passes) | compete: also when it passes and
    # beats the distilled student of its shape on validation accuracy | off: never judged
    baseline: Annotated[Literal["fallback", "compete", "off"], YamlSwitch] = "fallback"
    # manual: a student that passes is registered and waits, with its report, until someone approves it (Prefect UI:
    # resume the paused run; or `distillery promote --approve`); refused or not answered in approval_timeout_s, the
    # champion stays. The waiting run holds the student's run lock
    approval: Literal["auto", "manual"] = "auto"
    approval_timeout_s: int = Field(24 * 3600, gt=0)
    # texts production sent (a re-distil on drift): this share of them, chosen by text hash (a text stays on its side
    # across re-distillations), is labelled by the teacher but never trained on; with at least production_min_texts
    # there and a champion, the student's agreement with the teacher on them may fall at most
    # production_agreement_tolerance below the champion's on the same texts
    production_holdout: float = Field(0.2, ge=0.0, lt=1.0)
    production_min_texts: Positive = 30
    production_agreement_tolerance: Share = 0.0


class TrackingConfig(Section):
    uri: str | None = None
    artifact_location: str = "mlartifacts"
    experiment: str = "distillery"
    student_name: str = Field("student-large", min_length=1)
    champion_alias: str = Field("champion", min_length=1)
    retries: Positive = 3              # attempts at a registry call that could not reach the store
    retry_backoff_s: float = Field(1.0, ge=0.0)  # first wait between attempts; doubles each time


DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"  # runtime.device (models/devices.py resolves it)


class RuntimeConfig(Section):
    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = None
    dask_workers: Positive = 2
    workdir: str = ".distillery"
    lock: Literal["file", "prefect"] = "file"  # file: runs on this machine wait for each other; prefect: a global
                                       # concurrency limit on the Prefect server (workers on several machines)
    keep_runs: Positive = 3  # `distillery gc` keeps the files of this many latest runs (and the champion's)
    # where the teacher fine-tune, students' training, labelling and feature caching run: auto (a CUDA GPU when torch
    # sees one, else the CPU) | cpu | cuda | cuda:N | mps. Latency is always measured in each form's own runtime
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    # on CUDA: bf16 where supported, else fp16 with loss scaling (never on CPU); off by default: at these models' sizes
    # float32 was faster and as accurate on an H200 (benchmarks/gpu.py)
    mixed_precision: StrictBool = False
    deterministic: StrictBool = True  # on CUDA: deterministic algorithms (slower); the CPU always repeats exactly


class ServingConfig(Section):
    """Limits of `distillery serve` (answered 413, or 400 for a text that is not a string; never echoing the body)."""

    max_body_bytes: int = Field(2 * 1024 * 1024, gt=0)
    max_texts: int = Field(1000, gt=0)            # texts in one request
    max_text_chars: int = Field(10_000, gt=0)     # characters in one text (far beyond what max_length tokens read)
    # where `distillery serve` logs what it is asked (a folder, relative to the config, or an fsspec URI such as
    # s3://bucket/log): parquet files, written off the request path; null: no log (DISTILLERY_PREDICTION_LOG too)
    prediction_log: str | None = None
    prediction_log_texts: Literal["text", "digest"] = "text"  # digest: only each text's SHA-256, never the text


class MonitorThresholds(Section):
    """When a window of production traffic counts as drifted (``models.monitoring.judge_window``)."""

    text_p_value: float = Field(0.01, gt=0, le=1)   # the domain classifier's AUC under shuffled origins, and
    text_auc: float = Field(0.6, ge=0.5, le=1)      # its AUC: both crossed (a big window makes any gap significant)
    length_ks: float = Field(0.2, gt=0, le=1)       # KS statistic of word counts against the training texts
    unknown_share_increase: float = Field(0.02, gt=0)  # unknown word pieces, over the test split's share
    label_distance: float = Field(0.1, gt=0, le=1)  # Jensen-Shannon distance to the test split's, beyond chance
    confidence_drop: float = Field(0.1, gt=0)       # mean confidence below test's by this much
    abstention_increase: float = Field(0.1, gt=0)   # abstention rate above test's by this much
    agreement_drop: float = Field(0.05, gt=0)       # agreement with the teacher below the one at promotion


class MonitorConfig(Section):
    """``distillery monitor``: a window of the champion's prediction log against its training data and promotion."""

    log: str | None = None            # the prediction log (folder or fsspec URI); null: serving.prediction_log
    window_hours: float = Field(24.0, gt=0)  # the window: the last N hours (the flow's `end` parameter moves it)
    min_texts: int = Field(50, ge=10)  # a smaller window is reported, never judged (no event from half a window)
    teacher_sample: int = Field(200, ge=0)  # texts of the window the teacher labels for agreement (0: not measured)
    permutations: int = Field(99, ge=19)  # shuffles of the text-drift test (its p-value is at least 1/(N+1))
    max_texts: int = Field(1000, gt=10)  # per side in the text-drift test (seeded sample)
    seed: int = 0
    thresholds: MonitorThresholds = Field(default_factory=MonitorThresholds)
    production_max_texts: int = Field(5000, gt=0)  # logged texts kept in the snapshot's production transfer set
                                       # (the newest; a re-distil on drift adds them, deduplicated)


# keys added later, left out of the digest while they hold these values (student.taught_by always does: only a
# frontier entry may name another teacher)
LATER_DIGEST_DEFAULTS = {"student.taught_by": "teacher", "teacher.llm.structured_output": "none",
                         "student.recipe": None}


def _branch(tree: dict, key: str) -> tuple[dict, str]:
    """The dict holding dotted ``key``'s last part in ``tree`` (an empty one when a parent is missing), and that
    part."""
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.get(part, {})
    return tree, last


def without_later_defaults(tree: dict, section: str = "") -> dict:
    """``tree`` (the whole config's plain data, or one ``section`` of it) without the LATER_DIGEST_DEFAULTS keys
    that still hold their defaults: a digest or checkpoint key made before those keys existed still matches."""
    tree = json.loads(json.dumps(tree, default=str))
    prefix = f"{section}." if section else ""
    for key, default in LATER_DIGEST_DEFAULTS.items():
        if key.startswith(prefix):
            node, last = _branch(tree, key[len(prefix):])
            if last in node and node[last] == default:
                node.pop(last)
    return tree


# safety limits that never change what a run produces: outside the digest (changing them re-distils nothing)
OPERATIONAL = {"serving": None, "monitor": None, "gate": ("approval", "approval_timeout_s"),
               "runtime": ("device", "mixed_precision", "deterministic"),  # where it runs, recorded on each run
               "teacher": ("max_parameters", "endpoint.api_key_env", "endpoint.texts_per_request",
                           "endpoint.concurrency", "endpoint.requests_per_second",
                           "endpoint.timeout_s", "endpoint.retries", "endpoint.backoff_s",
                           "endpoint.max_failure_rate", "endpoint.max_requests", "endpoint.max_cost",
                           "endpoint.price_per_request", "endpoint.price_per_1k_texts",
                           "endpoint.recheck", "llm.price_per_1k_tokens")}


class Config(Section):
    """The whole pipeline configuration. ``root`` is the folder relative paths resolve against."""

    data: DataConfig = Field(default_factory=DataConfig)
    dvc: DvcConfig = Field(default_factory=DvcConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    labelling: LabellingConfig = Field(default_factory=LabellingConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    root: str = "."

    def for_student(self, shape: Mapping[str, Any]) -> "Config":
        """This configuration with ``student`` shaped by a frontier entry."""
        return self.model_copy(update={"student": self.student.shaped(shape)})

    def on_device(self, device: str) -> "Config":
        """This configuration training on ``device`` (``runtime.device``: operational, the digest stays)."""
        return self.model_copy(update={"runtime": self.runtime.model_copy(update={"device": device})})

    @property
    def feature_target(self) -> str:
        """What feature KD aligns for this student: ``hidden`` or ``pooled`` (``distill.feature_target`` resolved)."""
        target = self.distill.feature_target
        if target == "auto":
            return "pooled" if self.student.init == "pretrained" else "hidden"
        return target

    def path(self, value: str) -> Path:
        """Resolve a configured path against the configuration root (absolute paths stay as they are)."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (Path(self.root) / p).resolve()

    @property
    def workdir(self) -> Path:
        return self.path(self.runtime.workdir)

    @property
    def work(self) -> WorkFolder:
        """The work folder's catalog (distillery/paths.py): where each kind of thing is kept."""
        return WorkFolder(self.workdir, self.path(self.labelling.cache_dir))

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data (without ``root``), as written to YAML and logged to MLflow."""
        return json.loads(self.model_dump_json(exclude={"root"}))

    def digest(self) -> str:
        """A short, stable hash of everything that shapes a result (not where files live)."""
        shaping = self.to_dict()
        for section, keys in OPERATIONAL.items():
            if keys is None:
                shaping.pop(section, None)
            else:
                for key in keys:
                    node, last = _branch(shaping[section], key)
                    node.pop(last, None)
        shaping = without_later_defaults(shaping)  # digests made before these keys existed still match
        kind = self.teacher.kind
        if kind != "ensemble":  # (digests made before ensembles existed still match)
            shaping["teacher"].pop("ensemble", None)
        if kind in ("registered", "ensemble"):  # white boxes answer every row: the black-box keys shape nothing
            for key in ("kind", "endpoint", "llm") if kind == "registered" else ("endpoint", "llm"):
                shaping["teacher"].pop(key, None)
            shaping["validation"].pop("min_answered_share", None)
        blob = json.dumps(shaping, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, e.g. ``{"distill.temperature": 4.0, ...}``, for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def _describe(exc: ValidationError) -> str:
    """pydantic's errors as one message that names each key and says what is allowed."""
    unknown, other = [], []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        got = f"(got {err.get('input')!r})"
        if err["type"] == "extra_forbidden":
            unknown.append(key)
        elif err["type"] in _BOUNDS:
            bound, sign = _BOUNDS[err["type"]]
            other.append(f"{key} must be {sign} {err['ctx'][bound]} {got}")
        elif err["type"] == "value_error":  # a field's own rule (Share), or a section's (StudentConfig's shapes)
            text = err["msg"].removeprefix("Value error, ")
            whole = isinstance(err.get("input"), dict)
            if not key or text.startswith(f"{key}."):
                other.append(text)
            else:
                other.append(f"{key}: {text}" if whole else f"{key} {text} {got}")
        elif err["type"] == "literal_error":
            other.append(f"{key} must be {err['ctx']['expected']} {got}")
        elif err["type"] == "too_short":
            other.append(f"{key} must be set {got}")
        else:
            other.append(f"{key}: {err['msg']} {got}")
    lines = ([f"unknown configuration key(s): {', '.join(unknown)}"] if unknown else []) + other
    return "\n  - ".join(lines)


def _parse_scalar(text: str) -> Any:
    """Parse a CLI override value with YAML rules (``2`` -> int, ``[0, 2]`` -> list, ``null`` -> None)."""
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted-key overrides applied; string values are parsed as YAML."""
    out = json.loads(json.dumps(raw, default=list))
    for dotted, value in overrides.items():
        if isinstance(value, str):
            value = _parse_scalar(value)
        parts = dotted.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def parse_override_args(items: list[str]) -> dict[str, str]:
    """Turn ``["a.b=1", ...]`` from the CLI into a mapping, with a clear error for malformed items."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        out[key.strip()] = value
    return out


def validate_config(cfg: Config) -> Config:
    """The rules across fields (each field's own range or choice is on the field). Returns the config unchanged, or
    raises ConfigError naming the keys."""
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    snapshot = cfg.path(cfg.data.snapshot_dir)
    need(snapshot != Path(cfg.root) and Path(cfg.root) in snapshot.parents,
         f"data.snapshot_dir must be a folder inside the project ({cfg.root}): DVC versions it there, got {snapshot}")
    q = cfg.distill.search
    need(all(lo <= hi for lo, hi in (q.temperature, q.kd_weight, q.learning_rate, q.epochs)),
         "each distill.search range must be [low, high] with low <= high")
    need(q.temperature[0] > 0 and q.learning_rate[0] > 0 and q.epochs[0] >= 1
         and 0 <= q.kd_weight[0] <= q.kd_weight[1] <= 1,
         "distill.search ranges: temperature and learning_rate > 0, epochs >= 1, kd_weight within [0, 1]")
    fw = q.feature_weight
    need(fw is None or 0 <= fw[0] <= fw[1], "distill.search.feature_weight must be null or [low, high] with 0 <= low <= high")
    v = cfg.validation
    need(v.min_mean_confidence <= v.max_mean_confidence,
         "validation needs 0 <= min_mean_confidence <= max_mean_confidence <= 1")
    s = cfg.student
    need(s.init != "pretrained" or cfg.distill.feature_target != "hidden",
         "distill.feature_target: hidden aligns tokens, so it needs a student that reads with the teacher's tokenizer "
         "(init cut/config); a pretrained student takes pooled (or auto)")
    statics = [shape.label for shape in (s, *s.frontier_shapes().values()) if shape.init == "static"]
    need(not statics or s.deploy == "onnx-int8", f"static-embedding students ({', '.join(statics)}) are served as "
         f"their ONNX file: student.deploy must be onnx-int8, not {s.deploy}")
    need(s.taught_by == "teacher", "student.taught_by: the student is taught by the teacher; a student.frontier "
         "shape may be taught by it ({taught_by: student}: the teacher assistant)")
    need(s.recipe is None, "student.recipe: the student's recipe is distill.* (or its search's pick); a "
         "student.frontier shape may have its own ({recipe: {temperature: 1, kd_weight: 0.5, ce_weight: 0.5}})")
    k = cfg.distill
    need(k.kd_weight + k.ce_weight + k.feature_weight > 0, "distill loss weights must not all be 0")
    kind = cfg.teacher.kind
    if kind != "registered":  # a black box or an ensemble: no one teacher's weights or hidden states to start from
        what = "an ensemble of several models" if kind == "ensemble" else "a black box"
        if kind == "ensemble":
            problems.extend(_ensemble_problems(cfg.teacher.ensemble))
        else:
            need(bool(cfg.teacher.endpoint.url), f"teacher.kind: {kind} needs teacher.endpoint.url")
        shapes = [s, *s.frontier_shapes().values()]
        need(all(shape.init == "pretrained" or (shape.init == "static" and shape.base_model != "teacher")
                 for shape in shapes),
             f"teacher.kind: {kind} is {what}: every student (and student.frontier shape) must be "
             "student.init: pretrained or static from a base model (cut and config students, and static ones with "
             "base_model: teacher, start from the teacher's weights)")
        need(k.feature_weight == 0 and not any(k.sweep.feature_weight) and k.search.feature_weight is None,
             f"teacher.kind: {kind} is {what}: feature KD needs its hidden states (set distill.feature_weight: "
             "0, no distill.sweep.feature_weight or distill.search.feature_weight)")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


def _ensemble_problems(e: EnsembleConfig) -> list[str]:
    """What is wrong with ``teacher.ensemble``: its member references and weights."""
    problems = []
    if len(e.members) < 2:
        problems.append("teacher.kind: ensemble needs teacher.ensemble.members: at least two registered models, as "
                        "name@alias or name/version")
    problems += [f"ensemble member {m!r} is not a registered model as name@alias or name/version (e.g. "
                 "teacher-large@production, minilm-teacher/3)" for m in e.members if not ENSEMBLE_MEMBER.match(m.strip())]
    if len(set(e.members)) != len(e.members):
        problems.append("teacher.ensemble.members names a member twice")
    w = e.weights
    if w is not None and (len(w) != len(e.members) or min(w, default=0) < 0 or sum(w) <= 0):
        problems.append(f"teacher.ensemble.weights must be null (chosen on validation) or one non-negative weight per "
                        f"member ({len(e.members)}), not all 0")
    return problems


def _shape_problems(s: StudentConfig) -> list[str]:
    """What is wrong with one student shape: the layers it keeps, or its width against its heads."""
    problems = []
    if not s.layers or len(set(s.layers)) != len(s.layers):  # a cut keeps them; checked for every init
        problems.append("layers must keep at least one layer, as distinct non-negative layer indices")
    if s.init in ("config", "pretrained") and s.hidden_size % max(s.num_attention_heads, 1):
        problems.append("hidden_size must be divisible by num_attention_heads")
    kept = s.pretrained_layers
    if kept is not None and (not kept or len(set(kept)) != len(kept)):
        problems.append("pretrained_layers must be null or distinct non-negative layer indices")
    return problems


def find_config_file(path: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: the given path, else $DISTILLERY_CONFIG, else ./distillery.yaml."""
    candidate = Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME).expanduser()
    if not candidate.is_file():
        raise ConfigError(
            f"configuration file {candidate} not found: run from the project folder, pass --config FILE "
            f"or set {CONFIG_ENV}"
        )
    return candidate.resolve()


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load, override and validate the configuration. Relative paths resolve against the file's folder; for a
    profile (a file with ``extends: <base file>``), against the folder of the base at the root of the chain."""
    file = find_config_file(path)
    raw, root = _read_layered(file, [])
    return config_from_dict(raw, overrides, root=str(root))


def _read_layered(file: Path, seen: list[Path]) -> tuple[dict[str, Any], Path]:
    """A config file merged over the file it ``extends`` (section by section, key by key): (merged, root folder)."""
    if file in seen:
        raise ConfigError(f"config files extend each other in a loop: {' -> '.join(map(str, [*seen, file]))}")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} must hold a mapping of sections")
    base = raw.pop("extends", None)
    if base is None:
        return raw, file.parent
    base_file = (file.parent / str(base)).resolve()
    if not base_file.is_file():
        raise ConfigError(f"{file}: extends {base!r}, but {base_file} is not a file")
    merged, root = _read_layered(base_file, [*seen, file])
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = _deep_merge(merged[section], values)
        else:
            merged[section] = values
    return merged, root


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def config_from_dict(
    raw: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    root: str = ".",
) -> Config:
    """Build a validated Config from plain data (as read from YAML) plus dotted-key overrides."""
    merged = apply_overrides(dict(raw), overrides or {})
    merged["root"] = str(Path(root).resolve())
    try:
        cfg = Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration:\n  - {_describe(exc)}") from None
    return validate_config(cfg)
