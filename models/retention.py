"""What `distillery gc` may delete from the work folder: a pure plan over what is there and what is in use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Entry:
    """One deletable thing in the work folder: a checkpoint, a student or teacher folder, a cache entry..."""

    kind: str      # e.g. "checkpoints", "students", "teachers", "registry", "teacher-outputs", "data-docs", "snapshots"
    name: str      # folder name inside its kind
    mtime: float   # last modification (seconds since the epoch)
    size: int = 0  # bytes


def plan_retention(entries: Iterable[Entry], in_use: set[tuple[str, str]], keep_latest: int,
                   partial_suffix: str = ".partial") -> tuple[list[Entry], list[Entry]]:
    """Split entries into (keep, delete).

    Kept: everything ``in_use`` (what the champion, the current teacher and snapshot need) and, per kind, the
    ``keep_latest`` most recently modified entries (what the latest runs need to resume or re-run from cache).
    Deleted: the rest, and always leftovers of interrupted writes (names containing ``partial_suffix``).
    """
    keep: list[Entry] = []
    delete: list[Entry] = []
    by_kind: dict[str, list[Entry]] = {}
    for entry in entries:
        if partial_suffix in entry.name:
            delete.append(entry)
        elif (entry.kind, entry.name) in in_use:
            keep.append(entry)
        else:
            by_kind.setdefault(entry.kind, []).append(entry)
    for group in by_kind.values():
        group.sort(key=lambda e: e.mtime, reverse=True)
        keep += group[:keep_latest]
        delete += group[keep_latest:]
    return keep, delete
