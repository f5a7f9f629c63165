"""The loop after promotion, measured: the champion served over HTTP with its prediction log on, watched by the
monitor through in-distribution traffic and then a shift, re-distilled on the shifted window, and measured again.

    .venv/bin/python benchmarks/monitoring.py [--config distillery.yaml] [--name default] [--port 5091]
        [--calm-windows 10] [--window-texts 200] [--probe-texts 50] [--shift-texts 3000] [--pairs 400]
        [--monitor-texts 10000] [--out benchmarks/results] [--set KEY=VALUE ...]

Needs a promoted ``student@champion`` (``make run`` or ``make run-fast``). Stages, each written to
``benchmarks/results/monitoring-<name>.json`` as it finishes (a later invocation resumes after the last one):
  1. ``log_cost``: two ``distillery serve`` of the champion, one with the prediction log on; batch-1 requests of test
     texts sent to them in alternation, the median of the per-pair wall-time ratios
     (``served_path_with_log_over_without``; target <= 1.05).
  2. ``calm``: ``--calm-windows`` windows of ``--window-texts`` held-out test texts (never trained on) sent to the
     logged server, the monitor run on each window: ``false_alarms_in_distribution`` (target 0).
  3. ``detection``: the shift, windows of ``--probe-texts`` shifted texts until one alarms:
     ``detection_delay_texts`` (shifted texts sent up to the end of the first window that alarmed; the resolution is
     the window size). The shift is BANKING77 rewritten in another register (``texting``: lower case, no
     punctuation, chat abbreviations, vowels dropped from some long words, seeded per text): in-domain, labelled by
     the same intents, but written as no training text is.
  4. ``redistill``: ``--shift-texts`` shifted train texts in one window (an hour of production), the monitor (it
     must alarm and emit ``distillery.drift.detected``), then what the ``redistill-on-drift`` deployment runs on that
     event, in this process: ``pipeline_flow(command="distill", production=<the event's window>)``.
  5. ``after``: the champion before and after on the shifted test texts (every test text rewritten; none of them
     was logged or trained on) and on the clean test split, in their served forms:
     ``shifted_accuracy_after_over_before`` (target > 1; one seed: a difference within a few tenths of a point is
     not evidence) and ``clean_accuracy_after_over_before``; the teacher on both. When the gate kept the champion
     (the redistill stage's ``gate`` says why), ``promoted`` is false, the champion and the teacher are measured
     alone and both ratios are null.
  6. ``monitor_large``: ``--monitor-texts`` (10,000) train texts logged (requests of 32) and one monitor run over
     them, timed (``monitor_seconds_10000_texts``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import machine  # noqa: E402
from benchmarks.teachers import serve_teacher  # noqa: E402

STAGES = ("log_cost", "calm", "detection", "redistill", "after", "monitor_large")
# a chat register: what people type on a phone, not what the data set's annotators wrote
ABBREVIATIONS = {"you": "u", "your": "ur", "are": "r", "please": "pls", "to": "2", "for": "4", "why": "y",
                 "what": "wat", "thanks": "thx", "thank": "thx", "because": "cuz", "account": "acct",
                 "transfer": "xfer", "transferred": "xferd", "received": "recvd", "have": "hav", "know": "kno",
                 "the": "da", "and": "n", "with": "w", "been": "bn", "can": "cn", "is": "iz", "not": "nt",
                 "don't": "dont", "i'm": "im", "money": "$$", "just": "jus", "still": "stil", "card": "crd",
                 "payment": "pymt", "there": "ther", "this": "dis", "that": "dat", "yet": "yt", "how": "hw",
                 "do": "du", "does": "dz", "my": "mah", "me": "mi", "it": "it", "be": "b", "see": "c", "okay": "k"}


def texting(text: str) -> str:
    """``text`` in the chat register, the same every time (seeded by the text)."""
    rng = random.Random(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
    words = []
    for word in re.sub(r"[^\w'$ ]", " ", text.lower()).split():
        word = ABBREVIATIONS.get(word, word).replace("'", "")
        if len(word) > 4 and rng.random() < 0.3:  # vowels dropped after the first letter
            word = word[0] + re.sub("[aeiou]", "", word[1:])
        words.append(word)
    return " ".join(words)


def post(port: int, texts: list[str]) -> float:
    """One scoring request (MLflow's protocol); its wall time in seconds."""
    body = json.dumps({"inputs": texts}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                     {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as answer:
        answer.read()
    return time.perf_counter() - start


def send(port: int, texts: list[str], batch: int = 1, flush_s: float = 1.0) -> tuple[dt.datetime, dt.datetime]:
    """``texts`` sent in requests of ``batch``; the window [start, end) they were logged in (after a flush)."""
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    for i in range(0, len(texts), batch):
        post(port, texts[i:i + batch])
    time.sleep(3 * flush_s)  # the log writes every flush_s from its own thread
    return start, dt.datetime.now(dt.timezone.utc)


def monitor(config: str, overrides: dict, log: Path, window: tuple[dt.datetime, dt.datetime]):  # noqa: ANN201
    """The monitor flow on [start, end) of the log (MonitorResult), and its wall time."""
    from distillery.config import load_config
    from distillery.flows.monitor import monitor_flow

    start, end = window
    hours = (end - start).total_seconds() / 3600
    cfg = load_config(config, {**overrides, "monitor.log": str(log), "monitor.window_hours": hours})
    began = time.perf_counter()
    result = monitor_flow(cfg, end=end.isoformat())
    return result, time.perf_counter() - began


def accuracy(folder: Path, texts: list[str], truth: list[str]) -> float:
    """A classifier folder in its served form (its own settings): top-label accuracy against ``truth`` names."""
    from distillery.integrations.served_model import ServedClassifier

    predicted = ServedClassifier(folder).top_labels(texts)
    return float(sum(p == t for p, t in zip(predicted, truth)) / len(truth))


def registered(cfg, name: str, alias: str) -> tuple[str, Path] | None:  # noqa: ANN001 - Config
    """``name@alias``'s version and its classifier folder (downloaded once); None when the alias is not set."""
    from distillery.integrations import registry

    registry.configure_tracking(cfg)
    version = registry.Registry.from_config(cfg).alias_version(name, alias)
    return (str(version.version), registry.download_classifier(version, cfg.work.registry)) if version else None


def champion(cfg) -> tuple[str, Path]:  # noqa: ANN001 - Config
    found = registered(cfg, cfg.tracking.student_name, cfg.tracking.champion_alias)
    if found is None:
        raise SystemExit("no champion: run `make run` (or `make run-fast`) first")
    return found


def log_cost(args, texts: list[str], work: Path) -> dict:  # noqa: ANN001
    plain = serve_teacher(args.config, args.model, args.port + 1, work / "serve-plain.log",
                          {"DISTILLERY_PREDICTION_LOG": ""})
    try:
        for port in [args.port, args.port + 1] * 20:  # warm both
            post(port, texts[:1])
        ratios, with_log, without = [], [], []
        for i in range(args.pairs):
            text = [texts[i % len(texts)]]
            order = (args.port, args.port + 1) if i % 2 else (args.port + 1, args.port)
            times = {port: post(port, text) for port in order}
            with_log.append(times[args.port])
            without.append(times[args.port + 1])
            ratios.append(with_log[-1] / without[-1])
    finally:
        os.killpg(plain.pid, 15)
    return {"pairs": args.pairs, "served_path_with_log_over_without": statistics.median(ratios),
            "p50_ms_with_log": 1000 * statistics.median(with_log), "p50_ms_without": 1000 * statistics.median(without)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "distillery.yaml"))
    parser.add_argument("--name", default="default")
    parser.add_argument("--port", type=int, default=5091)
    parser.add_argument("--calm-windows", type=int, default=10)
    parser.add_argument("--window-texts", type=int, default=200)
    parser.add_argument("--probe-texts", type=int, default=50)
    parser.add_argument("--shift-texts", type=int, default=3000)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--monitor-texts", type=int, default=10_000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from distillery.config import load_config, parse_override_args
    from distillery.models.data import read_snapshot

    overrides = parse_override_args(args.set)
    cfg = load_config(args.config, overrides)
    out_file = Path(args.out) / f"monitoring-{args.name}.json"
    results = json.loads(out_file.read_text()) if out_file.is_file() else {"machine": machine(), "stages": {}}
    done = results["stages"]

    def save(stage: str, value: dict) -> None:
        done[stage] = value
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{stage}: {json.dumps(value)[:600]}", flush=True)

    splits, labels = read_snapshot(cfg.path("data"))
    test, train = splits["test"], splits["train"].sample(frac=1.0, random_state=13)
    calm_texts = test["text"].sample(frac=1.0, random_state=13).tolist()
    shifted_train = [texting(t) for t in train["text"]]
    if args.calm_windows * args.window_texts > len(calm_texts):
        raise SystemExit(f"{args.calm_windows} calm windows of {args.window_texts} texts need more than the "
                         f"{len(calm_texts)} test texts: fewer or smaller windows")

    def shifted(start: int, n: int) -> list[str]:  # the shifted train texts from ``start``, round again if needed
        return [shifted_train[(start + i) % len(shifted_train)] for i in range(n)]

    work = Path(tempfile.mkdtemp(prefix="monitoring-bench-"))
    log = work / "prediction-log"
    version, before_folder = champion(cfg)
    results.setdefault("champion_before", version)
    args.model = f"{cfg.tracking.student_name}@{cfg.tracking.champion_alias}"
    server = serve_teacher(args.config, args.model, args.port, work / "serve-logged.log",
                           {"DISTILLERY_PREDICTION_LOG": str(log), "DISTILLERY_PREDICTION_LOG_FLUSH_S": "1"})
    try:
        if "log_cost" not in done:
            save("log_cost", log_cost(args, calm_texts, work))
        if "calm" not in done:
            windows = []
            for w in range(args.calm_windows):
                batch = calm_texts[w * args.window_texts:(w + 1) * args.window_texts]
                result, seconds = monitor(args.config, overrides, log, send(args.port, batch))
                windows.append({"texts": len(batch), "drifted": result.drifted, "reasons": list(result.reasons),
                                "seconds": seconds, **{k: result.measured.get(k) for k in
                                                       ("text_auc", "text_p_value", "label_distance",
                                                        "teacher_agreement", "unknown_share")}})
            save("calm", {"windows": windows, "false_alarms_in_distribution": sum(w["drifted"] for w in windows)})
        if "detection" not in done:
            sent, probes = 0, []
            for w in range(20):
                batch = shifted(w * args.probe_texts, args.probe_texts)
                result, _ = monitor(args.config, overrides, log, send(args.port, batch))
                sent += len(batch)
                probes.append({"texts": len(batch), "drifted": result.drifted, "reasons": list(result.reasons)})
                if result.drifted:
                    break
            save("detection", {"probes": probes, "resolution_texts": args.probe_texts, "sent": sent,
                               "detection_delay_texts": sent if probes[-1]["drifted"] else None})
        if "redistill" not in done:
            from distillery.flows.pipeline import pipeline_flow

            batch = shifted(done["detection"]["sent"], args.shift_texts)  # from the texts the probes did not send
            result, seconds = monitor(args.config, overrides, log, send(args.port, batch))
            if not result.drifted:
                raise SystemExit(f"the shifted hour raised no alarm: {result.measured}")
            began = time.perf_counter()
            run = pipeline_flow(args.config, overrides, command="distill", production=result.window)
            save("redistill", {"texts": len(batch), "monitor_seconds": seconds, "reasons": list(result.reasons),
                               "event_id": str(result.event_id), "window": result.window,
                               "distill_seconds": time.perf_counter() - began, "passed": run.decision.passed,
                               "version": run.decision.version, "gate": list(run.decision.reasons)})
        if "after" not in done:
            new_version, after_folder = champion(cfg)
            redistilled = done["redistill"]  # promoted: its version is the champion now
            promoted = bool(redistilled["passed"]) and new_version == str(redistilled["version"])
            if not promoted:  # the gate kept the champion: a result too (its reasons are in the redistill stage)
                print(f"the champion did not change: the re-distilled student was not promoted; the champion and "
                      f"the teacher measured alone ({redistilled['gate']})", flush=True)
            shifted_test, truth = [texting(t) for t in test["text"]], [labels[i] for i in test["label_id"]]
            measured = {"champion_after": new_version if promoted else None, "promoted": promoted}
            teacher = registered(cfg, cfg.teacher.registered_name, cfg.teacher.alias)
            teacher_folder = teacher[1] if teacher is not None else None
            for who, folder in (("before", before_folder), ("after", after_folder if promoted else None),
                                ("teacher", teacher_folder)):
                if folder is not None:
                    measured[who] = {"shifted": accuracy(folder, shifted_test, truth),
                                     "clean": accuracy(folder, test["text"].tolist(), truth)}
            for split in ("shifted", "clean"):
                measured[f"{split}_accuracy_after_over_before"] = (
                    measured["after"][split] / measured["before"][split] if promoted else None)
            save("after", measured)
        if "monitor_large" not in done:
            server_after = serve_teacher(args.config, args.model, args.port + 2, work / "serve-after.log",
                                         {"DISTILLERY_PREDICTION_LOG": str(work / "log-large"),
                                          "DISTILLERY_PREDICTION_LOG_FLUSH_S": "1"})
            try:
                texts = [train["text"].iloc[i % len(train)] for i in range(args.monitor_texts)]
                result, seconds = monitor(args.config, overrides, work / "log-large", send(args.port + 2, texts, 32))
            finally:
                os.killpg(server_after.pid, 15)
            save("monitor_large", {"texts": len(texts), "monitor_seconds": seconds,
                                 "judged_texts": result.measured.get("texts"), "drifted": result.drifted})
    finally:
        os.killpg(server.pid, 15)
    ratios = {"false_alarms_in_distribution": done["calm"]["false_alarms_in_distribution"],
              "detection_delay_texts": done["detection"]["detection_delay_texts"],
              "shifted_accuracy_after_over_before": done["after"]["shifted_accuracy_after_over_before"],
              "clean_accuracy_after_over_before": done["after"]["clean_accuracy_after_over_before"],
              "served_path_with_log_over_without": done["log_cost"]["served_path_with_log_over_without"],
              f"monitor_seconds_{done['monitor_large']['texts']}_texts": done["monitor_large"]["monitor_seconds"]}
    results["ratios"] = ratios
    out_file.write_text(json.dumps(results, indent=1) + "\n")
    for key, value in ratios.items():
        print(f"{key:40s} {value}")
    print(f"written {out_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
