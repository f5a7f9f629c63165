"""Prefect tasks for teacher outputs: label shards, cache them by (teacher, data, rows), validate with GX."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.config import Config
from distillery.faults import fault_point
from distillery.integrations import registry
from distillery.integrations.expectations import ValidationFailed, validate_teacher_outputs
from distillery.records import SnapshotRef, TeacherOutputs, TeacherRef, ValidationSummary
from distillery.models.augment import NearCopies, Recipe, content_hash, make_transfer_set
from distillery.models.data import (PRODUCTION_HOLDOUT, held_out_rows, in_production_holdout, read_out_of_scope,
                                    read_production, read_snapshot, read_transfer_set, row_id)
from distillery.models.labelling import (
    DIGESTS_FILE,
    FEATURES_FILE,
    META_FILE,
    OUTPUTS_FILE,
    OUTPUTS_FORMAT,
    ReusedLogits,
    merge_logits,
    read_outputs,
    reusable_logits,
    teacher_logits,
    teacher_pooled,
    validation_tables,
    write_outputs,
)
from distillery.models.modeling import ModelError, load_classifier, load_tokenizer
from distillery.models.devices import model_device, resolve_device
from distillery.integrations.endpoint import (AnswerCache, BudgetExceeded, ChatClient, EndpointClient, EndpointError,
                                              ask_texts)
from distillery.models.answers import (RequestPlan, SoftLabels, affordable_texts, choose_texts, few_shot_examples,
                                       plan_requests, render_messages, soft_labels)
from distillery.models.labelling import text_digests
from distillery.models.ensemble import Combination, EnsembleError, combine, fit_combination



def labelling_inputs(snapshot: SnapshotRef, transfer_set: Path | None, recipe: Recipe | None = None,
                     near_copy_words: int = 0, production_holdout: float = 0.0) -> tuple[pd.DataFrame, list[str]]:
    """Rows to label: the snapshot's train and validation splits, its out-of-scope train rows (split ``oos``,
    label -1: the teacher's soft labels on them carry the "no intent" signal), augmented variants of the train texts
    (split ``augmented``, label -1, when ``recipe`` makes any), the optional transfer set (label -1), then the
    snapshot's production texts (split ``production``, label -1; the ``production_holdout`` share of them, by text
    hash, split ``production_holdout``: the gate's, never trained on). No validation or test text, nor a near copy of
    one, is ever a transfer or production row."""
    splits, labels = read_snapshot(Path(snapshot.path))
    parts = [splits[s].assign(split=s)[["id", "text", "split", "label_id"]] for s in ("train", "validation")]
    _, oos = read_out_of_scope(Path(snapshot.path))
    if len(oos.get("oos_train", ())):
        parts.append(oos["oos_train"].assign(split="oos", label_id=-1)[["id", "text", "split", "label_id"]])
    held_out = held_out_rows(Path(snapshot.path))
    if recipe is not None and recipe.multiple > 0:
        made = make_transfer_set(splits["train"]["text"].tolist(), held_out["text"].tolist(), recipe)
        made = made[~made["id"].isin(set(pd.concat(parts)["id"]))]
        parts.append(made.assign(split="augmented", label_id=-1)[["id", "text", "split", "label_id"]])
    close = NearCopies(held_out["text"].tolist(), near_copy_words) if near_copy_words else None

    def unseen(extra: pd.DataFrame) -> pd.DataFrame:
        """Rows of ``extra`` not labelled already, never a held-out text (nor a near copy: see models.augment)."""
        extra = extra[~extra["id"].isin(set(pd.concat(parts)["id"]) | set(held_out["id"]))]
        return extra[[not close.near(t) for t in extra["text"]]] if close is not None else extra

    if transfer_set is not None:
        extra = unseen(read_transfer_set(transfer_set))
        parts.append(extra.assign(split="transfer", label_id=-1)[["id", "text", "split", "label_id"]])
    production = read_production(Path(snapshot.path))
    if len(production):  # texts the champion was asked in production (a re-distil on drift added them)
        production = unseen(production)
        split = np.where(in_production_holdout(production["id"], production_holdout), PRODUCTION_HOLDOUT, "production")
        parts.append(production.assign(split=split, label_id=-1)[["id", "text", "split", "label_id"]])
    return pd.concat(parts, ignore_index=True), labels


def check_teacher_labels(teacher: TeacherRef, labels: list[str]) -> None:
    """The teacher must answer exactly the snapshot's labels, in its order; a ModelError that says what differs.
    (A black box's answers are checked one by one: one naming another label is not a soft label.)"""
    from transformers import AutoConfig

    if teacher.black_box:
        return
    config = AutoConfig.from_pretrained(teacher.folder, local_files_only=True)
    names = [str(config.id2label[i]) for i in range(config.num_labels)]
    if names == list(labels):
        return
    missing, extra = sorted(set(labels) - set(names)), sorted(set(names) - set(labels))
    detail = (f"missing {missing[:5]}, extra {extra[:5]}" if missing or extra else "the same labels in another order")
    raise ModelError(f"teacher {teacher.name} v{teacher.version} answers {len(names)} labels, the data snapshot has "
                     f"{len(labels)} ({detail}). The data's label set changed (a new source, data.oos_label or "
                     f"data.holdout_intents): fine-tune or import a teacher for it (`distillery teacher`, `distillery "
                     f"teacher import`), in a project folder of its own to keep this one's teacher")


def augment_recipe(cfg: Config) -> Recipe | None:
    """The augmentation recipe of ``data.augment`` (None when it makes nothing)."""
    a = cfg.data.augment
    if a.multiple <= 0:
        return None
    return Recipe(multiple=a.multiple, methods=tuple(a.methods), p_mask=a.p_mask, p_drop=a.p_drop, p_swap=a.p_swap,
                  p_vocab=a.p_vocab, seed=cfg.data.seed if a.seed is None else a.seed,
                  near_copy_words=a.near_copy_words)


def rows_to_label(cfg: Config, snapshot: SnapshotRef) -> tuple[pd.DataFrame, list[str]]:
    """What the teacher labels for this configuration (see ``labelling_inputs``)."""
    return labelling_inputs(snapshot, transfer_path(cfg), augment_recipe(cfg), cfg.data.augment.near_copy_words,
                            cfg.gate.production_holdout)


def transfer_path(cfg: Config) -> Path | None:
    return cfg.path(cfg.data.transfer_set) if cfg.data.transfer_set else None


def cache_key(teacher: TeacherRef, snapshot: SnapshotRef, inputs: pd.DataFrame, max_length: int) -> str:
    """Keyed by teacher version (and its run), data snapshot, the exact rows, what shapes the logits and the
    outputs' format (an entry of an older format is relabelled from its logits, by text digest: no teacher call)."""
    rows = hashlib.sha256("\n".join(inputs["id"] + ":" + inputs["split"]).encode()).hexdigest()
    blob = json.dumps({"teacher": [teacher.name, teacher.version, teacher.run_id], "data": snapshot.md5,
                       "rows": rows, "max_length": max_length, "format": OUTPUTS_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@task(name="lookup-teacher-outputs", cache_policy=NO_CACHE)
def lookup_cache(cache_dir: Path, key: str) -> str | None:
    """Path of cached outputs for ``key`` when a complete entry exists (it survives process restarts)."""
    folder = Path(cache_dir) / key
    if (folder / OUTPUTS_FILE).is_file() and (folder / META_FILE).is_file():
        return str(folder / OUTPUTS_FILE)
    return None


@task(name="reuse-teacher-outputs", cache_policy=NO_CACHE)
def reuse_outputs(cfg: Config, teacher: TeacherRef, labels: list[str], inputs: pd.DataFrame) -> ReusedLogits:
    """Logits this teacher version already gave for some of these texts, from complete cache entries of other row
    sets (``labelling.reuse_rows``; see ``models.labelling.reusable_logits``): a changed transfer set or a new data
    version then labels only its new texts."""
    cache = cfg.work.teacher_outputs if cfg.labelling.reuse_rows else None
    identity = {"name": teacher.name, "version": teacher.version, "run_id": teacher.run_id}
    return reusable_logits(cache, inputs["text"].tolist(), identity, cfg.teacher.max_length, labels)


@task(name="label-shard", cache_policy=NO_CACHE, retries=1)
def label_shard(teacher_folder: str, texts: list[str], max_length: int, batch_size: int, shard: int,
                device: str) -> np.ndarray:
    """Teacher logits for one shard of texts (runs anywhere the task runner puts it, e.g. a Dask worker, on that
    machine's ``device``: ``runtime.device`` resolved there)."""
    import torch

    tokenizer = load_tokenizer(Path(teacher_folder))
    model = load_classifier(Path(teacher_folder)).eval().to(resolve_device(device))
    with torch.inference_mode():
        logits = teacher_logits(model, tokenizer, texts, max_length, batch_size, desc=f"label shard {shard}")
    fault_point("label.shard")
    return logits


@task(name="store-teacher-outputs", cache_policy=NO_CACHE)
def store_outputs(cfg: Config, key: str, inputs: pd.DataFrame, shard_logits: list[np.ndarray], labels: list[str],
                  meta: dict, run_id: str, reused: ReusedLogits | None = None,
                  answered: np.ndarray | None = None) -> str:
    """Write the outputs parquet + meta (+ the texts' digests, for reuse) atomically into the cache and log them to
    the MLflow run. ``shard_logits`` answer the rows ``reused`` lacks (all rows without it), in row order;
    ``answered`` marks the rows a black-box teacher answered (all, when None)."""
    blocks = shard_logits if reused is None else [merge_logits(reused.digests, shard_logits, reused.found,
                                                                len(labels))]
    final = cfg.work.teacher_outputs / key
    partial = final.with_name(key + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_outputs(partial / OUTPUTS_FILE, inputs, blocks, labels, answered)
    if reused is not None:
        np.savez(partial / DIGESTS_FILE, digests=reused.digests)
    labelled = sum(len(b) for b in shard_logits)
    meta = {**meta, "labelled_rows": labelled, "reused_rows": len(inputs) - labelled,
            "reused_from": list(reused.sources) if reused is not None else []}
    (partial / META_FILE).write_text(json.dumps({**meta, "key": key, "run_id": run_id, "rows": len(inputs),
                                                 "labels": labels}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)  # readers only ever see complete entries
    with registry.open_run(cfg, run_id):
        registry.log_folder(final, "teacher_outputs")
    return str(final / OUTPUTS_FILE)


@task(name="validate-teacher-outputs", cache_policy=NO_CACHE)
def validate_outputs(cfg: Config, outputs_path: str, expected_rows: int, run_id: str, teacher: TeacherRef,
                     snapshot: SnapshotRef) -> ValidationSummary:
    """Run the GX suites; log Data Docs and the summary to MLflow either way; raise ValidationFailed on failure."""
    logger = get_run_logger()
    outputs = read_outputs(outputs_path, probs=True)  # the suites check what is stored
    labels = json.loads((Path(outputs_path).parent / META_FILE).read_text())["labels"]
    rows, classes = validation_tables(outputs, labels)
    docs = cfg.work.data_docs / run_id
    report = validate_teacher_outputs(rows, classes, labels, expected_rows, cfg.validation, docs,
                                      run_name=f"{teacher.name} v{teacher.version} on data snapshot {snapshot.md5}")
    with registry.open_run(cfg, run_id):
        registry.log_folder(docs, "data_docs")
        registry.log_json(report.summary(), "validation/teacher_outputs.json")
        registry.log_metrics({f"gx.{k}": v for k, v in report.statistics.items()} |
                           {"gx.evaluated": report.evaluated, "gx.failed": len(report.failed)})
        registry.set_tags({"gx.success": str(report.success).lower(), "gx.failed": len(report.failed)})
    if not report.success:
        registry.finish_run(run_id, "FAILED")
        raise ValidationFailed(report)
    logger.info("teacher outputs passed %d expectations (Data Docs: %s)", report.evaluated, report.docs_index)
    return ValidationSummary(success=report.success, evaluated=report.evaluated, failed=tuple(report.failed),
                             statistics=dict(report.statistics))


def ensemble_key(teacher: TeacherRef, members: list[TeacherOutputs]) -> str:
    """An ensemble's outputs are keyed by its version (the members' versions and how they are combined) and its
    members' outputs (each keyed by its teacher and the rows)."""
    blob = json.dumps({"ensemble": teacher.version, "members": [m.key for m in members], "format": OUTPUTS_FORMAT},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@task(name="combine-ensemble", cache_policy=NO_CACHE)
def combine_members(cfg: Config, teacher: TeacherRef, inputs: pd.DataFrame, members: list[TeacherOutputs],
                    run_id: str) -> tuple[np.ndarray, Combination]:
    """The ensemble's logits on ``inputs``: each member's (read from its validated outputs) calibrated and weighted
    on the validation rows (``models.ensemble.fit_combination``), then averaged; what each member and the ensemble
    score on validation goes to the labelling run."""
    frames = [read_outputs(m.path) for m in members]
    for member, outputs in zip(teacher.members, frames):
        if outputs.frame["id"].tolist() != inputs["id"].tolist():
            raise EnsembleError(f"member {member.name} v{member.version}'s outputs hold other rows than the ensemble "
                                "labels: relabel it (its cache entry is stale)")
    logits = [outputs.logits for outputs in frames]
    val = (inputs["split"] == "validation").to_numpy()
    gold = inputs.loc[val, "label_id"].to_numpy()
    e = cfg.teacher.ensemble
    combination = fit_combination([z[val] for z in logits], gold, e.weights, e.calibrate)
    combined = combine(logits, combination)
    scores = {f"ensemble.m{i}.{k}": v for i, (z, t, w) in enumerate(
        zip(logits, combination.temperatures, combination.weights), start=1)
        for k, v in (("val_accuracy", float((z[val].argmax(1) == gold).mean())), ("temperature", t), ("weight", w))}
    scores["ensemble.val_accuracy"] = float((combined[val].argmax(1) == gold).mean())
    with registry.open_run(cfg, run_id):
        registry.log_metrics(scores)
    get_run_logger().info("ensemble %s: validation accuracy %.4f (members %s), weights %s%s", teacher.name,
                          scores["ensemble.val_accuracy"],
                          ", ".join(f"{scores[f'ensemble.m{i}.val_accuracy']:.4f}" for i in range(1, len(logits) + 1)),
                          ", ".join(f"{w:.3f}" for w in combination.weights),
                          " (chosen on validation)" if combination.chosen_on_validation else "")
    return combined, combination


def augment_tags(cfg: Config, inputs: pd.DataFrame) -> dict[str, str]:
    """The generated transfer set's recipe and content hash (empty when none is made), for the lineage; ``inputs``
    are the rows the teacher labelled (``rows_to_label``)."""
    recipe = augment_recipe(cfg)
    if recipe is None:
        return {}
    made = inputs[inputs["split"] == "augmented"]
    return {"transfer.recipe": json.dumps(dataclasses.asdict(recipe), sort_keys=True),
            "transfer.recipe_hash": recipe.digest(), "transfer.content_hash": content_hash(made),
            "transfer.rows": str(len(made))}


@task(name="log-labelling", cache_policy=NO_CACHE)
def log_labelling(cfg: Config, run_id: str, teacher: TeacherRef, snapshot: SnapshotRef, key: str, cache_hit: bool,
                  seconds: float, outputs_path: str, inputs: pd.DataFrame) -> None:
    meta = json.loads((Path(outputs_path).parent / META_FILE).read_text())
    with registry.open_run(cfg, run_id):
        registry.log_params({**teacher.to_tags(), **snapshot.to_tags(), "labelling.cache_key": key,
                             "labelling.shards": cfg.labelling.shards, **augment_tags(cfg, inputs)})
        registry.set_tags({"teacher_outputs.cache_hit": str(cache_hit).lower(),
                         "teacher_outputs.source_run": meta["run_id"], "teacher_outputs.path": outputs_path})
        registry.log_metrics({"labelling_seconds": seconds})
        if not cache_hit and "reused_rows" in meta:  # this run's own labelling: how much of it was reused
            registry.log_metrics({"labelling_labelled_rows": meta["labelled_rows"],
                                "labelling_reused_rows": meta["reused_rows"]})


def teacher_features(cfg: Config, teacher: TeacherRef, outputs: TeacherOutputs, ids: list[str],
                     texts: list[str], model=None) -> np.ndarray:
    """The teacher's sentence features (rows, hidden) for ``ids`` (with their ``texts``), in that order: computed
    once per outputs entry and cached beside its soft labels (``pooled-features.npz``, written atomically), so
    search trials and re-runs read them. Rows the cache lacks (another set of rows) are computed afresh, with
    ``model`` when the caller has the teacher loaded already."""
    import torch

    path = Path(outputs.path).parent / FEATURES_FILE
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            index = {str(i): n for n, i in enumerate(cached["ids"])}
            if all(i in index for i in ids):
                return cached["features"][[index[i] for i in ids]]
    folder = Path(teacher.folder)
    model, tokenizer = (model if model is not None else load_classifier(folder)).eval(), load_tokenizer(folder)
    home = model_device(model)
    with torch.inference_mode():
        features = teacher_pooled(model.to(resolve_device(cfg.runtime.device)), tokenizer, list(texts),
                                  cfg.teacher.max_length, cfg.labelling.batch_size)
    model.to(home)  # the caller's model stays where it was
    if not np.isfinite(features).all():
        raise ModelError(f"teacher {teacher.name} v{teacher.version} gives non-finite hidden states on "
                         f"{int((~np.isfinite(features).all(axis=1)).sum())} of {len(ids)} texts: feature KD cannot "
                         "use it (set distill.feature_weight: 0, or fix the teacher)")
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
    np.savez(tmp, ids=np.asarray(ids, dtype=str), features=features)
    os.replace(tmp, path)  # concurrent trials may both compute; readers only ever see a whole file
    return features


def endpoint_texts(snapshot: SnapshotRef, inputs: pd.DataFrame) -> list[str]:
    """Every text a black-box teacher is asked for a run: the rows to label, then the test split and the
    out-of-scope validation and test rows (the harness measures the teacher on them), each distinct text once."""
    splits, _ = read_snapshot(Path(snapshot.path))
    _, oos = read_out_of_scope(Path(snapshot.path))
    held = [splits["test"]["text"], *[oos[k]["text"] for k in ("oos_validation", "oos_test") if k in oos]]
    return list(dict.fromkeys([*inputs["text"].tolist(), *pd.concat(held).tolist()]))


@dataclasses.dataclass(frozen=True)
class Pricing:
    """How a black-box teacher is asked and charged: texts per request, price per request, and per 1,000 texts (an
    LLM's token price folded in: its prompt estimated at 4 characters a token, plus ``reply_tokens`` of reply)."""

    texts_per_request: int
    per_request: float
    per_1k_texts: float


def llm_prompt(cfg: Config, snapshot: SnapshotRef) -> tuple[list[str], list[tuple[str, str]]]:
    """An LLM teacher's label list and few-shot examples (from the training split, with ``data.seed``)."""
    splits, labels = read_snapshot(Path(snapshot.path))
    train = splits["train"]
    return labels, few_shot_examples(train["text"].tolist(), labels, train["label_id"].tolist(),
                                     cfg.teacher.llm.few_shot, cfg.data.seed)


def pricing(cfg: Config, snapshot: SnapshotRef, texts: list[str]) -> Pricing:
    e = cfg.teacher.endpoint
    if cfg.teacher.kind != "llm":
        return Pricing(e.texts_per_request, e.price_per_request, e.price_per_1k_texts)
    llm = cfg.teacher.llm
    labels, examples = llm_prompt(cfg, snapshot)
    overhead = sum(len(m["content"]) for m in render_messages("", labels, llm.system_prompt, llm.prompt,
                                                                 llm.descriptions, examples))
    mean_chars = float(np.mean([len(t) for t in texts])) if texts else 0.0
    tokens = (overhead + mean_chars) / 4 + llm.reply_tokens
    return Pricing(1, e.price_per_request, e.price_per_1k_texts + llm.price_per_1k_tokens * tokens)


def endpoint_plan(cfg: Config, teacher: TeacherRef, snapshot: SnapshotRef, texts: list[str]) -> RequestPlan:
    """What asking ``texts`` costs now: those not cached, in requests, plus the re-check of cached answers."""
    price = pricing(cfg, snapshot, texts)
    cache = answer_cache(cfg, teacher)
    cached = len(cache.lookup(text_digests(texts).tolist()))
    plan = plan_requests(len(texts), cached, price.texts_per_request, price.per_request, price.per_1k_texts)
    recheck = min(cfg.teacher.endpoint.recheck, cached)
    extra = plan_requests(recheck, 0, price.texts_per_request, price.per_request, price.per_1k_texts)
    return dataclasses.replace(plan, requests=plan.requests + extra.requests, cost=plan.cost + extra.cost)


def answer_cache(cfg: Config, teacher: TeacherRef) -> AnswerCache:
    """The cache of a black-box teacher's answers (``teacher.identity`` keys its rows)."""
    return AnswerCache(cfg.work.teacher_answers, json.loads(teacher.identity))


def cached_soft_labels(cfg: Config, cache: AnswerCache, texts: list[str], labels: list[str]) -> tuple[SoftLabels, dict]:
    """The cached answers for ``texts`` as soft labels over ``labels`` (a text never answered: a uniform row marked
    unanswered), and the cached entries found by text digest."""
    digests = text_digests(texts).tolist()
    found = cache.lookup(digests)
    answers = [found[d].answer if d in found else None for d in digests]
    return soft_labels(answers, labels, cfg.teacher.endpoint.hard_label_smoothing), found


def make_client(cfg: Config, snapshot: SnapshotRef) -> EndpointClient:
    """The client of the configured black-box teacher."""
    if cfg.teacher.kind == "llm":
        return ChatClient(cfg.teacher.endpoint, cfg.teacher.llm, *llm_prompt(cfg, snapshot))
    return EndpointClient(cfg.teacher.endpoint)


@task(name="ask-endpoint-teacher", cache_policy=NO_CACHE)
def ask_endpoint(cfg: Config, teacher: TeacherRef, snapshot: SnapshotRef, texts: list[str], run_id: str) -> dict:
    """Ask the endpoint teacher every text it has not answered yet (within the budget, checked before the first
    request), then re-ask a seeded sample of earlier answers and record how often it still agrees (a server whose
    answers change between runs); log the counts to the run. Returns them."""
    logger = get_run_logger()
    e = cfg.teacher.endpoint
    plan = endpoint_plan(cfg, teacher, snapshot, texts)
    if why := plan.over_budget(e.max_requests, e.max_cost):
        raise BudgetExceeded(f"endpoint teacher {teacher.name}: {plan.describe()}; {why}. Nothing was asked: raise "
                             f"the budget, or label fewer texts (data.augment.multiple, data.transfer_set)")
    cache = answer_cache(cfg, teacher)
    digests = text_digests(texts).tolist()
    earlier = cache.lookup(digests)
    missing = [t for t, d in zip(texts, digests) if d not in earlier]
    report, agreement = None, (float("nan"), 0, 0)
    if missing or (e.recheck and earlier):  # a run answered from the cache alone needs no server (nor its token)
        client = make_client(cfg, snapshot)
        try:
            logger.info("endpoint teacher %s: %s", client.shown, plan.describe())
            report = ask_texts(client, cache, missing) if missing else None
            agreement = recheck_answers(client, texts, digests, earlier, e.recheck, cfg.data.seed)
        finally:
            client.close()
    counts = {"endpoint.requests": (report.requests if report else 0) + agreement[2],
              "endpoint.failed_requests": report.failed if report else 0,
              "endpoint.asked_texts": len(missing), "endpoint.cached_texts": len(earlier),
              "endpoint.estimated_cost": plan.cost}
    if report is not None and report.latencies_ms:
        counts["endpoint.request_p50_ms"] = float(np.median(report.latencies_ms))
    if agreement[1]:
        counts |= {"endpoint.recheck_agreement": agreement[0], "endpoint.rechecked_texts": agreement[1]}
        logger.info("endpoint teacher re-asked %d earlier texts: %.1f%% answered the same label", agreement[1],
                    100 * agreement[0])
    with registry.open_run(cfg, run_id):
        registry.log_metrics(counts)
    return counts


def recheck_answers(client: EndpointClient, texts: list[str], digests: list[str], earlier: dict, sample: int,
                    seed: int) -> tuple[float, int, int]:
    """Re-ask up to ``sample`` texts answered in earlier runs (a seeded choice) and compare the top labels:
    (agreement, texts re-asked, requests). The cache keeps the first answers: students learn from what was paid for."""
    if not sample or not earlier:
        return float("nan"), 0, 0
    known = [(t, d) for t, d in zip(texts, digests) if d in earlier]
    chosen = np.random.default_rng(seed).choice(len(known), size=min(sample, len(known)), replace=False)
    picked = [known[int(i)] for i in sorted(chosen)]
    same, compared, requests = 0, 0, 0
    for start in range(0, len(picked), client.texts_per_request):
        batch = picked[start:start + client.texts_per_request]
        requests += 1
        try:
            answers, _ = client.ask([t for t, _ in batch])
        except EndpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - a re-check that fails only measures less; the labelling stands
            get_run_logger().warning("endpoint re-check request failed (%s): %d texts not compared", exc, len(batch))
            continue
        compared += len(batch)
        same += sum(a.top == earlier[d].answer.top for a, (_, d) in zip(answers, batch))
    return (same / compared if compared else float("nan")), compared, requests


@task(name="endpoint-soft-labels", cache_policy=NO_CACHE)
def endpoint_soft_labels(cfg: Config, teacher: TeacherRef, texts: list[str], labels: list[str]) -> SoftLabels:
    """The cached answers for ``texts`` as soft labels over ``labels`` (a text never answered: a uniform row marked
    unanswered)."""
    return cached_soft_labels(cfg, answer_cache(cfg, teacher), texts, labels)[0]


@dataclasses.dataclass(frozen=True)
class EndpointAnswers:
    """A black-box teacher's cached answers on held-out splits: log-probabilities per split, and the latency (ms)
    and size (texts) of the requests that answered the test split."""

    logits: dict[str, np.ndarray]
    request_ms: np.ndarray
    request_texts: np.ndarray


def endpoint_measurements(cfg: Config, teacher: TeacherRef, frames: dict[str, pd.DataFrame],
                          labels: list[str]) -> EndpointAnswers:
    """What the harness measures a black-box teacher on: its cached answers for each split of ``frames`` (the
    label flow asked them, within the budget; nothing is asked here)."""
    cache, logits = answer_cache(cfg, teacher), {}
    for split, frame in frames.items():
        texts = frame["text"].tolist()
        soft, found = cached_soft_labels(cfg, cache, texts, labels)
        logits[split] = soft.logits
        if split == "test":  # each answered test text carries its request's latency and size
            timed = [found[d] for d in text_digests(texts).tolist() if d in found]
    return EndpointAnswers(logits=logits, request_ms=np.asarray([c.request_ms for c in timed], dtype=float),
                           request_texts=np.asarray([c.request_texts for c in timed], dtype=float))


def labelling_dry_run(cfg: Config, snapshot: SnapshotRef) -> dict:
    """What labelling this configuration would ask, without asking: rows to label and, for an endpoint teacher, the
    texts it has not answered yet, the requests and the estimated cost against the budget (``distillery label
    --dry-run``)."""
    inputs, labels = rows_to_label(cfg, snapshot)
    out = {"snapshot": snapshot.md5, "rows": len(inputs), "labels": len(labels), "teacher": cfg.teacher.kind}
    if cfg.teacher.kind in ("registered", "ensemble"):
        return out | {"note": f"a {cfg.teacher.kind} teacher labels on this machine: no requests, no cost"}
    from distillery.tasks.teacher import endpoint_teacher

    teacher = endpoint_teacher(cfg, snapshot)
    e = cfg.teacher.endpoint
    inputs, note = budget_choice(cfg, teacher, snapshot, inputs)
    out["rows"] = len(inputs)
    plan = endpoint_plan(cfg, teacher, snapshot, endpoint_texts(snapshot, inputs))
    return out | {"endpoint": teacher.identity, "texts": plan.texts, "cached": plan.cached, "to_ask": plan.to_ask,
                  "requests": plan.requests, "estimated_cost": round(plan.cost, 6),
                  "max_requests": e.max_requests, "max_cost": e.max_cost,
                  "over_budget": plan.over_budget(e.max_requests, e.max_cost), "selection": note}


# rows an endpoint teacher may leave unasked when the budget is short
OPTIONAL_SPLITS = ("augmented", "transfer", "production")  # the gate's production hold-out is asked


def budget_choice(cfg: Config, teacher: TeacherRef, snapshot: SnapshotRef,
                  inputs: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The rows an endpoint teacher labels, and what was left out, in words (None: nothing): all rows when they fit
    the budget (or with ``over_budget: stop``, which stops before asking); else every train, validation and test
    text, and of the generated and transfer texts not answered yet as many as the budget allows, chosen by
    ``teacher.endpoint.selection``."""
    e = cfg.teacher.endpoint
    texts = endpoint_texts(snapshot, inputs)
    plan = endpoint_plan(cfg, teacher, snapshot, texts)
    if e.over_budget == "stop" or plan.over_budget(e.max_requests, e.max_cost) is None:
        return inputs, None
    price = pricing(cfg, snapshot, texts)
    cached = set(answer_cache(cfg, teacher).lookup(text_digests(texts)))
    new = ~np.isin(text_digests(inputs["text"].tolist()), list(cached))
    optional = inputs["split"].isin(OPTIONAL_SPLITS).to_numpy() & new
    candidates = list(dict.fromkeys(inputs.loc[optional, "text"]))
    required = len(texts) - len(candidates) - plan.cached
    k = affordable_texts(required, len(candidates), min(e.recheck, plan.cached), price.texts_per_request,
                         price.per_request, price.per_1k_texts, e.max_requests, e.max_cost)
    if k < 0:  # the texts every run needs do not fit: ask_endpoint stops with the plan
        return inputs, None
    keep = {candidates[i] for i in choose_texts(candidates, k, e.selection, cfg.data.seed)}
    chosen = inputs[~optional | inputs["text"].isin(keep).to_numpy()].reset_index(drop=True)
    return chosen, (f"over budget ({plan.describe()}): asking {k} of the {len(candidates)} generated and transfer "
                    f"texts not answered yet, chosen {e.selection}; {len(inputs) - len(chosen)} rows left unlabelled")


@task(name="select-within-budget", cache_policy=NO_CACHE)
def select_within_budget(cfg: Config, teacher: TeacherRef, snapshot: SnapshotRef, inputs: pd.DataFrame) -> pd.DataFrame:
    """``budget_choice``'s rows, with what it left out in the log."""
    chosen, note = budget_choice(cfg, teacher, snapshot, inputs)
    if note:
        get_run_logger().info("endpoint teacher %s", note)
    return chosen


def ensemble_combination(cfg: Config, teacher: TeacherRef) -> Combination:
    """How an ensemble teacher combined its members when it labelled (from its outputs entry's meta): the same
    temperatures and weights apply to any later text."""
    for meta_path in sorted(Path(cfg.work.teacher_outputs).glob(f"*/{META_FILE}")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "ensemble" in meta and str(meta.get("teacher", {}).get("version")) == str(teacher.version):
            return Combination.from_dict(meta["ensemble"])
    raise EnsembleError(f"ensemble teacher {teacher.name} (v{teacher.version}) has not labelled here yet: its "
                        "members' weights and temperatures are chosen when it labels (`distillery label`)")


def label_texts(cfg: Config, snapshot: SnapshotRef, teacher: TeacherRef, texts: list[str], run_id: str) -> np.ndarray:
    """The teacher's logits on ``texts`` that are not in the snapshot (production texts), through the labelling path
    of distillation: a black box asks only what its answer cache lacks, within its budget; a registered teacher reuses
    its earlier outputs by text digest and labels the rest, kept as one more outputs entry (split ``production``);
    an ensemble combines its members' logits as it did when it labelled. Row order is ``texts``' order."""
    _, labels = read_snapshot(Path(snapshot.path))
    if teacher.kind == "ensemble":
        combination = ensemble_combination(cfg, teacher)
        return combine([label_texts(cfg, snapshot, m, texts, run_id) for m in teacher.members], combination)
    if teacher.black_box:
        ask_endpoint(cfg, teacher, snapshot, texts, run_id)
        return endpoint_soft_labels(cfg, teacher, texts, labels).logits
    check_teacher_labels(teacher, labels)
    unique = list(dict.fromkeys(texts))
    inputs = pd.DataFrame({"id": [row_id(t) for t in unique], "text": unique,
                           "split": "production", "label_id": -1})
    key = cache_key(teacher, snapshot, inputs, cfg.teacher.max_length)
    path = lookup_cache(cfg.work.teacher_outputs, key)
    if path is None:
        reused = reuse_outputs(cfg, teacher, labels, inputs)
        missing = list(reused.missing_texts)
        fresh = ([label_shard(teacher.folder, missing, cfg.teacher.max_length, cfg.labelling.batch_size, 0,
                              cfg.runtime.device)] if missing else [])
        meta = {"teacher": teacher.__dict__, "snapshot_md5": snapshot.md5, "shards": 1 if missing else 0,
                "max_length": cfg.teacher.max_length, "production": True}
        path = store_outputs(cfg, key, inputs, fresh, labels, meta, run_id, reused)
    outputs = read_outputs(path)
    row_of = {t: n for n, t in enumerate(outputs.frame["text"].tolist())}
    return outputs.logits[[row_of[t] for t in texts]]
