"""Test fixtures built from code: a small synthetic intent data set and project folders around it."""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterable

import pandas as pd
import yaml

# Rows of the fault table (tests/test_faults.py, tests/test_integrity.py, tests/test_webhook.py): case, outcome,
# nothing lost, nothing wrong said. Printed after the run.
FAULT_ROWS: list[tuple[str, str, str, str]] = []


def fault_row(case: str, outcome: str, nothing_lost: bool, nothing_wrong_said: bool | None = None) -> None:
    """Record a row of the fault table and fail the test when something was lost or something wrong was said
    (``None``: the case says nothing itself, e.g. a process killed with SIGKILL)."""
    said = "n/a (killed)" if nothing_wrong_said is None else ("yes" if nothing_wrong_said else "NO")
    FAULT_ROWS.append((case, outcome, "yes" if nothing_lost else "NO", said))
    assert nothing_lost and nothing_wrong_said is not False, f"{case}: {outcome}"

LABELS = ["card_arrival", "exchange_rate", "pin_blocked", "top_up"]
_KEYWORDS = {
    "card_arrival": ["card", "delivery", "arrive", "post"],
    "exchange_rate": ["exchange", "rate", "currency", "euro"],
    "pin_blocked": ["pin", "blocked", "locked", "code"],
    "top_up": ["top", "balance", "add", "money"],
}
_OPENERS = ["please help", "i need to know", "can you tell me", "quick question", "hello", "urgent"]
_TAILS = ["today", "now", "for my account", "again", "this week", "asap", "thanks", "on the app"]


def make_texts(label: str) -> list[str]:
    """Distinct texts for one label: its keywords in several templates (learnable by a tiny model)."""
    words = _KEYWORDS[label]
    out = []
    for opener, (a, b), tail in itertools.product(_OPENERS, itertools.permutations(words, 2), _TAILS):
        out.append(f"{opener} {a} {b} {tail}")
    return out


def make_frames(train_per_label: int = 40, test_per_label: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    train, test = [], []
    for label in LABELS:
        texts = make_texts(label)[:: 7][: train_per_label + test_per_label]
        train += [(t, label) for t in texts[:train_per_label]]
        test += [(t, label) for t in texts[train_per_label:]]
    return (pd.DataFrame(train, columns=["text", "category"]), pd.DataFrame(test, columns=["text", "category"]))


def write_source(folder: Path, train: pd.DataFrame | None = None, test: pd.DataFrame | None = None,
                 labels: list[str] | None = None) -> Path:
    """A source folder like ../shared/data/banking77 (train.csv, test.csv, categories.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    default_train, default_test = make_frames()
    (train if train is not None else default_train).to_csv(folder / "train.csv", index=False)
    (test if test is not None else default_test).to_csv(folder / "test.csv", index=False)
    (folder / "categories.json").write_text(json.dumps(labels or LABELS))
    return folder


def write_config(root: Path, **sections: dict) -> Path:
    """A distillery.yaml in ``root`` for a fast run on tiny models; ``sections`` update the defaults."""
    config = {
        # the code's defaults are the default profile (an MPNet teacher, pretrained MiniLM students, a generated
        # transfer set, served as ONNX Runtime INT8): these tiny runs cut a 1-layer student from a tiny teacher, keep
        # its vocabulary, serve it as torch INT8 and register under the names the tests use
        "data": {"source": "source", "validation_fraction": 0.2, "augment": {"multiple": 0}},
        # the 4-class fixture has 8 batches an epoch and texts of 5 lengths: length-grouped batches leave the tiny
        # random-init teacher stuck at 50% on some seeds, so these tiny runs use plain shuffled batches
        "teacher": {"base_model": "tiny-teacher", "registered_name": "teacher", "epochs": 8, "batch_size": 16, "learning_rate": 3e-3,
                    "max_length": 16, "group_by_length": False},
        "labelling": {"batch_size": 32, "shards": 2},
        "validation": {"min_teacher_accuracy": 0.3, "min_teacher_macro_f1": 0.2, "min_mean_confidence": 0.05},
        "student": {"init": "cut", "layers": [0], "deploy": "int8", "prune_vocab": False, "frontier": []},
        "distill": {"epochs": 6, "batch_size": 16, "learning_rate": 3e-3, "max_length": 16, "temperature": 2.0,
                    "group_by_length": False},
        "evaluation": {"repeats": 3, "warmup": 1, "throughput_batches": 1},
        # tiny models take well under a millisecond: their latency says nothing, so only quality gates them here
        "gate": {"max_latency_ratio": 100.0, "accuracy_tolerance": 0.03, "macro_f1_tolerance": 0.03, "policy": "best"},
        "tracking": {"uri": f"sqlite:///{Path(root) / 'mlflow.db'}", "student_name": "student"},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = Path(root) / "distillery.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_command(config_path: Path | str, command: str = "distill", overrides: dict | None = None,
                teacher_version: str | None = None, force: bool = False,
                teacher_source: str | None = None):  # noqa: ANN201 - distillery.records.RunResult
    """One pipeline command through the one entry the CLI and the deployments use."""
    from distillery.flows.pipeline import pipeline_flow

    return pipeline_flow(str(config_path), overrides, command=command, teacher_version=teacher_version, force=force,
                         teacher_source=teacher_source)


def wait_http(url: str, seconds: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Until ``url`` answers; fails after ``seconds``, or at once when ``proc`` (the server) has exited."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.5)
    detail = Path(log).read_text()[-3000:] if log is not None and Path(log).is_file() else ""
    raise AssertionError(f"{url} did not come up in {seconds} s\n{detail}")


def free_port() -> int:
    """A localhost TCP port nothing listens on (closed again when returned)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_model(folder: Path, texts: Iterable[str], labels: list[str], vocab_words: int = 100,
                     hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """A tiny random-init BERT classifier with a WordPiece vocabulary drawn from ``texts``, saved as safetensors."""
    from collections import Counter

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from distillery.models.modeling import SPECIAL_TOKENS, save_classifier
    from distillery.models.randomness import seeded

    counts = Counter(w for t in texts for w in str(t).lower().replace("?", " ").replace(".", " ").split())
    words = [w for w, _ in counts.most_common(vocab_words) if w not in SPECIAL_TOKENS]
    letters = sorted({c for w in words for c in w})
    vocab = SPECIAL_TOKENS + words + [c for c in letters if c not in words] + [f"##{c}" for c in letters]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=2,
        intermediate_size=hidden_size * 2, max_position_embeddings=128, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )
    with seeded(seed):
        model = BertForSequenceClassification(config)
    return save_classifier(model, tokenizer, folder)
