"""DVC and git: the one home of data versioning and code revisions.

DVC runs through its own CLI (``python -m dvc``) so that any remote it supports (a local folder, S3, GCS, SSH...)
is configuration only. Every failure ends in a VersioningError that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import yaml
from distillery.errors import DistilleryError
from distillery.models.data import PRODUCTION_FILE, PreparedData, write_snapshot


class VersioningError(DistilleryError, RuntimeError):
    """A DVC or git operation failed; the message says which and what to do."""


def _env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1"}


_DVC_NOISE = ("Having any troubles?", "Hit us up at", "https://dvc.org/support", "discord.com", "support@dvc.org")


def dvc_reason(output: str) -> str:
    """DVC's own explanation of a failure, without its support banner (which is not what a user should read)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    lines = [line for line in lines if not any(noise in line for noise in _DVC_NOISE) and set(line) - set("-+|")]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR")]
    return "; ".join(errors or lines[-3:]) or "no reason given"


def run_dvc(repo: Path, *args: str) -> str:
    """Run ``dvc ARGS`` in ``repo``; return stdout or raise VersioningError with DVC's own reason.

    Never with ``-q``: DVC's quiet flag hides its error lines too, and the output is captured here anyway."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise VersioningError(f"`dvc {' '.join(args)}` failed in {repo}: {dvc_reason(proc.stderr + proc.stdout)}")
    return proc.stdout


def is_git_repo(path: Path) -> bool:
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True)
    return proc.returncode == 0 and Path(proc.stdout.strip()).resolve() == Path(path).resolve()


def ensure_dvc_repo(repo: Path, remote_name: str, remote_url: str) -> None:
    """``dvc init`` when needed (``--no-scm`` outside git) and make ``remote_name`` the default remote.

    The remote goes into ``.dvc/config.local`` so a machine's storage choice never changes tracked files.
    Local-folder remotes are created if missing.
    """
    repo = Path(repo)
    if not (repo / ".dvc").is_dir():
        run_dvc(repo, "init", *([] if is_git_repo(repo) else ["--no-scm"]))
    if "://" not in remote_url:
        url_path = Path(remote_url).expanduser()
        url_path = url_path if url_path.is_absolute() else (repo / url_path).resolve()
        url_path.mkdir(parents=True, exist_ok=True)
        remote_url = str(url_path)
    run_dvc(repo, "remote", "add", "--local", "--force", "--default", remote_name, remote_url)


def snapshot_md5(dvc_file: Path) -> str:
    """The content hash of a DVC-tracked folder: ``outs[0].md5`` of its .dvc file (a ``.dir`` hash)."""
    dvc_file = Path(dvc_file)
    if not dvc_file.is_file():
        raise VersioningError(f"{dvc_file} not found: run `distillery ingest` to create the data snapshot")
    md5 = parse_snapshot_md5(dvc_file.read_text())
    if md5 is None:
        raise VersioningError(f"{dvc_file} is not a valid .dvc file (no outs[0].md5)")
    return md5


def parse_snapshot_md5(text: str) -> str | None:
    """``outs[0].md5`` of a .dvc file's text; None when it is not one."""
    try:
        return str(yaml.safe_load(text)["outs"][0]["md5"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        return None


def publish_snapshot(repo: Path, staged: Path, folder: Path, remote_name: str) -> str:
    """Make ``staged`` the tracked snapshot ``folder``: ``dvc add`` it and push it, all or nothing.

    The old folder and its .dvc file are kept aside until the push has succeeded; on any failure (remote unreachable,
    disk full, DVC error) both are put back, so ``data/`` and ``data.dvc`` never name a snapshot that no remote holds.
    Returns the new snapshot md5.
    """
    repo, staged, folder = Path(repo), Path(staged), Path(folder)
    rel = os.path.relpath(folder, repo)
    dvc_file = repo / f"{rel}.dvc"
    old_text = dvc_file.read_text() if dvc_file.is_file() else None
    aside = folder.with_name(folder.name + ".previous")
    shutil.rmtree(aside, ignore_errors=True)
    if folder.exists():
        folder.rename(aside)
    try:
        shutil.move(str(staged), str(folder))
        run_dvc(repo, "add", rel)
        run_dvc(repo, "push", "-r", remote_name, f"{rel}.dvc")
        md5 = snapshot_md5(dvc_file)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        if aside.exists():
            aside.rename(folder)
        if old_text is None:
            dvc_file.unlink(missing_ok=True)
        else:
            dvc_file.write_text(old_text)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return md5


def publish_with(repo: Path, folder: Path, remote_name: str, write: Callable[[Path], None]) -> str:
    """A new snapshot: a copy of ``folder`` changed by ``write(staged_folder)``, then ``publish_snapshot`` (all or
    nothing). Returns the new md5."""
    with tempfile.TemporaryDirectory(dir=Path(folder).parent, prefix=".staging-") as tmp:
        staged = Path(tmp) / "snapshot"
        shutil.copytree(folder, staged)
        write(staged)
        return publish_snapshot(repo, staged, folder, remote_name)


def push_snapshot(repo: Path, folder: Path, remote_name: str) -> str:
    """``dvc add`` + ``dvc push`` the folder as it is (re-publishing an unchanged snapshot); returns its md5."""
    rel = os.path.relpath(folder, repo)
    run_dvc(repo, "add", rel)
    run_dvc(repo, "push", "-r", remote_name, f"{rel}.dvc")
    return snapshot_md5(Path(repo) / f"{rel}.dvc")


def dir_md5(folder: Path, exclude: tuple[str, ...] = ()) -> str:
    """DVC's content hash of a folder (``<md5>.dir``), computed from the bytes on disk (``exclude``: top-level file
    names left out, as if the folder did not hold them).

    DVC 3 hashes each file's bytes with md5, lists ``{"md5", "relpath"}`` sorted by path and hashes that list's JSON
    (``json.dumps(..., sort_keys=True)``); this gives the value ``dvc add`` writes into the .dvc file.
    """
    folder = Path(folder)
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in exclude):
        digest = hashlib.md5()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        entries.append({"md5": digest.hexdigest(), "relpath": path.relative_to(folder).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def freeze_snapshot(folder: Path, dvc_file: Path, frozen_root: Path) -> tuple[str, Path]:
    """Copy the tracked snapshot into ``frozen_root/<md5>`` and check the copy hashes to the md5 ``dvc_file`` records.

    What a run reads is that copy, so a rewrite of ``folder`` during the run (an ingest, an editor) cannot change the
    bytes behind the md5 it records. Raises VersioningError when ``folder`` does not match ``dvc_file``.
    """
    expected = snapshot_md5(dvc_file)
    if not Path(folder).is_dir():
        raise VersioningError(f"{folder} is missing: run `distillery ingest`, or `dvc pull {dvc_file.name}`")

    def diverged(got: str) -> VersioningError:
        return VersioningError(
            f"{folder} does not hold the snapshot {dvc_file.name} records: its files hash to {got}, {dvc_file.name} "
            f"says {expected}. Run `distillery ingest` to version what is there, or `dvc checkout {dvc_file.name}` "
            f"to restore the recorded snapshot."
        )

    here = dir_md5(folder)
    if here != expected:  # edited, or rewritten without `dvc add`: the user meant something, say so
        raise diverged(here)
    target = Path(frozen_root) / expected.removesuffix(".dir")
    if target.is_dir() and dir_md5(target) == expected:
        return expected, target
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(folder, partial)
    got = dir_md5(partial)  # the copy itself is what runs read: check it, not only its source
    if got != expected:
        shutil.rmtree(partial, ignore_errors=True)
        raise diverged(got)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return expected, target


def dvc_file_for(repo: Path, folder: Path) -> Path:
    return Path(repo) / f"{os.path.relpath(folder, repo)}.dvc"


def tree_sha256(folder: Path, exclude: tuple[str, ...] = ()) -> str:
    """A hash of every file of a folder (relative names and bytes), ``exclude`` named files left out: the identity of
    a model folder (an imported teacher's provenance, the bytes the evaluation measured and the registry serves)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in exclude):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def verify_snapshot_fetchable(repo: Path, dvc_file_text: str, remote_name: str,
                              production: dict[str, str] | None = None) -> str:
    """Fetch the snapshot described by ``dvc_file_text`` from the remote into a fresh scratch checkout (its own empty
    cache) and hash the fetched bytes with ``dir_md5``, the function the ingest checks snapshots with; return the md5.

    Never DVC's own bookkeeping: ``dvc add`` after a pull reuses the hashes DVC recorded for the objects, so a byte
    flipped in the remote would pass. Raises VersioningError when the remote lacks it or the bytes hash differently.
    """
    meta = yaml.safe_load(dvc_file_text)
    expected = str(meta["outs"][0]["md5"])
    out_path = meta["outs"][0]["path"]
    with tempfile.TemporaryDirectory(prefix="distillery-verify-") as tmp:
        scratch = Path(tmp)
        run_dvc(scratch, "init", "--no-scm")
        # The remote settings (absolute paths or URLs) come from the project's own DVC config.
        for name in ("config", "config.local"):
            if (Path(repo) / ".dvc" / name).is_file():
                shutil.copy(Path(repo) / ".dvc" / name, scratch / ".dvc" / name)
        run_dvc(scratch, "config", "core.no_scm", "true")  # the copied config may come from a git-backed repo
        # its own empty cache, whatever the copied config names: the bytes must come from the remote
        run_dvc(scratch, "config", "--local", "cache.dir", str(scratch / ".dvc" / "cache"))
        (scratch / f"{out_path}.dvc").write_text(dvc_file_text)
        run_dvc(scratch, "pull", "-r", remote_name, f"{out_path}.dvc")
        fetched = scratch / out_path
        if not fetched.is_dir():
            raise VersioningError(f"`dvc pull` of {expected} from remote {remote_name!r} gave no {out_path}/ folder")
        got = dir_md5(fetched)
        if got == expected and production:  # the production texts claimed, and the snapshot they were added to
            text = fetched / PRODUCTION_FILE
            sha = hashlib.sha256(text.read_bytes()).hexdigest() if text.is_file() else "none"
            base = dir_md5(fetched, exclude=(PRODUCTION_FILE,))
            if (sha, base) != (production["sha256"], production["base"]):
                raise VersioningError(f"the fetched snapshot's production texts hash to {sha} on {base}; the lineage "
                                      f"says {production['sha256']} on {production['base']}")
    if got != expected:
        raise VersioningError(f"snapshot fetched from the remote hashes to {got}, expected {expected}")
    return got


def git_revision(path: Path) -> str:
    """``<sha>`` of HEAD, with ``-dirty`` when tracked files have uncommitted changes; ``unknown`` outside git."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                           capture_output=True, text=True)
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def version_snapshot(repo: Path, folder: Path, prepared: PreparedData, remote_name: str,
                     remote_url: str) -> tuple[str, bool]:
    """Write ``prepared`` as the snapshot in ``folder``, track it with DVC and push it, all or nothing: (md5, whether
    it changed). An unchanged snapshot whose ``folder`` is in place is only pushed (the remote must hold it); one
    that is missing (a fresh clone) is put back without counting as a change."""
    ensure_dvc_repo(repo, remote_name, remote_url)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".staging-") as tmp:
        staged = Path(tmp) / "snapshot"
        write_snapshot({**prepared.splits, **prepared.oos}, prepared.labels, prepared.report, staged, prepared.scope)
        if (folder / PRODUCTION_FILE).is_file():  # texts production sent stay part of the data across re-ingests
            shutil.copy2(folder / PRODUCTION_FILE, staged / PRODUCTION_FILE)
        dvc_file = dvc_file_for(repo, folder)
        staged_md5 = dir_md5(staged)
        changed = (snapshot_md5(dvc_file) if dvc_file.is_file() else None) != staged_md5
        if not changed and folder.is_dir() and dir_md5(folder) == staged_md5:
            return push_snapshot(repo, folder, remote_name), changed
        return publish_snapshot(repo, staged, folder, remote_name), changed
