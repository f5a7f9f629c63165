"""DVC and git: the one home of data versioning and code revisions.

DVC runs through its own CLI (``python -m dvc``) so that any remote it supports (a local folder, S3, GCS, SSH...)
is configuration only. Every failure ends in a VersioningError that says what to do.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


class VersioningError(RuntimeError):
    """A DVC or git operation failed; the message says which and what to do."""


def _env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1"}


def run_dvc(repo: Path, *args: str) -> str:
    """Run ``dvc ARGS`` in ``repo``; return stdout or raise VersioningError with DVC's own message."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise VersioningError(f"`dvc {' '.join(args)}` failed in {repo}: {' '.join(detail[-3:])}")
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
        run_dvc(repo, "init", "-q", *([] if is_git_repo(repo) else ["--no-scm"]))
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
    try:
        meta = yaml.safe_load(dvc_file.read_text())
        return str(meta["outs"][0]["md5"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        raise VersioningError(f"{dvc_file} is not a valid .dvc file (no outs[0].md5)") from None


def track_and_push(repo: Path, folder: Path, remote_name: str) -> str:
    """``dvc add`` the folder, push it to the remote, and return the snapshot md5."""
    repo, folder = Path(repo), Path(folder)
    rel = os.path.relpath(folder, repo)
    run_dvc(repo, "add", "-q", rel)
    run_dvc(repo, "push", "-q", "-r", remote_name, f"{rel}.dvc")
    return snapshot_md5(repo / f"{rel}.dvc")


def dvc_file_for(repo: Path, folder: Path) -> Path:
    return Path(repo) / f"{os.path.relpath(folder, repo)}.dvc"


def md5_of_tree(folder: Path) -> str:
    """A quick content hash of a folder's files (names and bytes), to tell whether a rewrite changed anything."""
    digest = hashlib.md5()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def verify_snapshot_fetchable(repo: Path, dvc_file_text: str, remote_name: str) -> str:
    """Fetch the snapshot described by ``dvc_file_text`` from the remote into a scratch checkout; return its md5.

    Raises VersioningError when the remote lacks it or the fetched content hashes differently.
    """
    meta = yaml.safe_load(dvc_file_text)
    expected = str(meta["outs"][0]["md5"])
    out_path = meta["outs"][0]["path"]
    with tempfile.TemporaryDirectory(prefix="distillery-verify-") as tmp:
        scratch = Path(tmp)
        run_dvc(scratch, "init", "-q", "--no-scm")
        # The remote settings (absolute paths or URLs) come from the project's own DVC config.
        for name in ("config", "config.local"):
            if (Path(repo) / ".dvc" / name).is_file():
                shutil.copy(Path(repo) / ".dvc" / name, scratch / ".dvc" / name)
        run_dvc(scratch, "config", "core.no_scm", "true")  # the copied config may come from a git-backed repo
        (scratch / f"{out_path}.dvc").write_text(dvc_file_text)
        run_dvc(scratch, "pull", "-q", "-r", remote_name, f"{out_path}.dvc")
        run_dvc(scratch, "add", "-q", out_path)
        got = snapshot_md5(scratch / f"{out_path}.dvc")
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
