"""How much of a generated transfer set is a near copy of a validation or test text, per data set (data only, seconds).

    .venv/bin/python benchmarks/near_copies.py [--data ../shared/data/banking77 ../shared/data/hwu64] [--words 1]

For each data source: the snapshot's splits as an ingest makes them (``distillery.yaml``'s data settings), the
transfer set the default recipe makes (``data.augment``, multiple 1) without the near-copy filter, and how many of its
variants are within ``--words`` word edits of a validation or a test text, by method; also how many train texts
themselves are (the data's own near duplicates, the same for the distilled and the baseline student). A near copy
gives the distilled student alone the teacher's answer on a held-out text, so its validation and test scores are
optimistic against the baseline's. Writes ``benchmarks/results/near-copies.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def count(source: Path, words: int) -> dict:
    from distillery.config import load_config
    from distillery.models.augment import NearCopies, make_transfer_set
    from distillery.models.data import check_data, read_source, split_snapshot
    from distillery.tasks.labelling import augment_recipe

    cfg = load_config(str(ROOT / "distillery.yaml"), {"data.augment.multiple": 1.0})
    d = cfg.data
    raw = read_source(source, d.text_column, d.label_column, d.split_column, d.test_fraction, d.seed)
    cleaned, _ = check_data(raw, d.max_drop_fraction)
    splits = split_snapshot(cleaned, raw.labels, d.validation_fraction, d.seed)
    held_out = splits["validation"]["text"].tolist() + splits["test"]["text"].tolist()
    recipe = dataclasses.replace(augment_recipe(cfg), near_copy_words=0)
    made = make_transfer_set(splits["train"]["text"].tolist(), held_out, recipe)
    out = {"variants": len(made), "train_texts": len(splits["train"])}
    for split in ("validation", "test"):
        close = NearCopies(splits[split]["text"].tolist(), words)
        near = made[[close.near(t) for t in made["text"]]]
        out[f"variants_near_{split}"] = len(near)
        out[f"variants_near_{split}_share"] = len(near) / max(len(made), 1)
        out[f"variants_near_{split}_by_method"] = {k: int(v) for k, v in near.groupby("method").size().items()}
    close = NearCopies(held_out, words)
    own = sum(close.near(t) for t in splits["train"]["text"])
    out["train_texts_near_held_out"], out["train_texts_near_held_out_share"] = own, own / len(splits["train"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=[str(ROOT.parent / "shared" / "data" / n)
                                                      for n in ("banking77", "hwu64")])
    parser.add_argument("--words", type=int, default=1)
    args = parser.parse_args(argv)
    results = {"words": args.words}
    for source in args.data:
        name = Path(source).name
        results[name] = row = count(Path(source), args.words)
        print(f"{name}: {row['variants']} variants; within {args.words} word(s) of a validation text "
              f"{row['variants_near_validation']} ({row['variants_near_validation_share']:.1%}), of a test text "
              f"{row['variants_near_test']} ({row['variants_near_test_share']:.1%}); train texts near a held-out text "
              f"{row['train_texts_near_held_out']} of {row['train_texts']} ({row['train_texts_near_held_out_share']:.1%})")
        print(f"  by method, near validation: {row['variants_near_validation_by_method']}; near test: "
              f"{row['variants_near_test_by_method']}")
    path = ROOT / "benchmarks" / "results" / "near-copies.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
