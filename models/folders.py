"""What can be refused about a model folder before a byte of it is loaded (no torch, no transformers: the
registry and the admin commands check folders without paying for either)."""

from __future__ import annotations

import json
from pathlib import Path

from distillery.errors import DistilleryError


class ModelError(DistilleryError, ValueError):
    """A model cannot be found, built or loaded; the message says what to do."""


MAX_PARAMETERS = 2_000_000_000  # 8 GB in float32: a third of these machines' memory
# hard caps on single config fields: far beyond any encoder a classifier uses, far below a memory bomb
FIELD_LIMITS = {"vocab_size": 5_000_000, "hidden_size": 32_768, "num_hidden_layers": 512,
                "intermediate_size": 131_072, "max_position_embeddings": 1_048_576, "num_attention_heads": 1_024}
CODE_KEYS = ("auto_map", "custom_pipelines")


def _has_code_reference(value: object) -> bool:
    if isinstance(value, dict):
        return any(k in CODE_KEYS or _has_code_reference(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_code_reference(v) for v in value)
    return False


def refuse_custom_code(folder: Path) -> None:
    """ModelError when anything in the folder asks for code to run: Python files, or ``auto_map`` (custom classes)
    in any JSON file, the tokenizer's config included; a tokenizer file that is not JSON is refused too."""
    folder = Path(folder)
    code = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py"))
    for path in sorted(folder.rglob("*.json")):
        try:
            if _has_code_reference(json.loads(path.read_text())):
                code.append(f"{path.relative_to(folder).as_posix()} (auto_map)")
        except (json.JSONDecodeError, UnicodeDecodeError):
            if path.name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
                raise ModelError(f"{path} is not JSON") from None
    if code:
        raise ModelError(f"{folder} needs custom code ({', '.join(code[:4])}): distillery never runs code that comes "
                         f"with a model")


def read_config(folder: Path) -> dict:
    """A model folder's config.json as a dict; ModelError when it is missing or not a JSON object."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder} holds no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} is a JSON {type(config).__name__}, not an object")
    return config


def safetensors_parameters(folder: Path) -> int:
    """How many numbers the folder's safetensors files hold, from their headers alone (nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} holds no .safetensors weights")
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as weights:
                for key in weights.keys():
                    shape = weights.get_slice(key).get_shape()
                    count = 1
                    for size in shape:
                        count *= int(size)
                    total += count
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a corrupt file
            raise ModelError(f"{path.name} in {folder} is not a readable safetensors file "
                             f"({str(exc).splitlines()[0][:120] or type(exc).__name__})") from None
    return total


def estimated_parameters(config: dict) -> int | None:
    """A BERT-like encoder's parameter count from its config (embeddings + layers); None when the config does not
    say enough to tell."""
    hidden, vocab = config.get("hidden_size"), config.get("vocab_size")
    layers, inner = config.get("num_hidden_layers"), config.get("intermediate_size") or 4 * (hidden or 0)
    if not all(isinstance(v, int) for v in (hidden, vocab, layers, inner)):
        return None
    positions = config.get("max_position_embeddings") if isinstance(config.get("max_position_embeddings"), int) else 0
    return (vocab + positions) * hidden + layers * (4 * hidden * hidden + 2 * hidden * inner)


def check_classifier_folder(folder: Path, max_parameters: int = MAX_PARAMETERS) -> dict:
    """Everything that can be refused about a model folder before a byte of it is loaded, each in one line: a config
    that is not JSON, custom code anywhere (``auto_map`` in any JSON file, Python files), sizes beyond any encoder, a
    config that describes a model larger than ``max_parameters`` or far larger than its weights (transformers would
    allocate the config's model first), and weights that are not readable safetensors. Returns the config."""
    folder = Path(folder)
    config = read_config(folder)
    refuse_custom_code(folder)
    bad = [f"{k}={config[k]!r}" for k, limit in FIELD_LIMITS.items()
           if k in config and (not isinstance(config[k], int) or isinstance(config[k], bool) or not 0 < config[k] <= limit)]
    if bad:
        raise ModelError(f"{folder}/config.json: {', '.join(bad)} out of range (limits {FIELD_LIMITS})")
    stored = safetensors_parameters(folder)
    described = estimated_parameters(config)
    if described is not None and described > max_parameters:
        raise ModelError(f"{folder}/config.json describes a model of about {described:,} parameters, over the limit of "
                         f"{max_parameters:,} (teacher.max_parameters)")
    if described is not None and described > 1.5 * stored + 10_000_000:
        raise ModelError(f"{folder}/config.json describes a model of about {described:,} parameters but its weights "
                         f"hold {stored:,}: the config does not belong to these weights")
    return config
