"""Where the repository is, and the state of its working tree (recorded with every MLflow run)."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def project_root() -> Path:
    """The repository the results belong to; a queued `dvc exp run` works in <root>/.dvc/tmp/exps/<copy>."""
    parts = REPO_ROOT.parts
    if ".dvc" in parts:
        return Path(*parts[: parts.index(".dvc")])
    return REPO_ROOT


def git_state(root: Path = REPO_ROOT) -> dict[str, str]:
    """Commit and dirty flag of the working tree (MLflow tags the commit but not a dirty tree).

    `reports/` is left out of the dirty check: the pipeline writes it (it is committed for reading), so
    counting it would flag every report as written from a dirty tree, by its own output."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)reports"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
        return {"git_commit": commit, "git_dirty": str(dirty).lower()}
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


_DRIVER_LOCKS: list = []  # held open for the life of the process


def hold_driver_lock(driver: str, root: Path | None = None) -> None:
    """One driver at a time on a checkout's results: take DVC's own repository lock (.dvc/tmp/lock, an flock)
    shared, for the life of this process. A `dvc repro` started meanwhile then fails at once, before it deletes any
    output ("Unable to acquire lock"); started while `dvc repro` holds it, this raises a clear error. Several
    Snakemake invocations (other profiles) may share it; Snakemake's own lock keeps two off the same outputs."""
    root = root or REPO_ROOT
    if not (root / ".dvc").is_dir():
        return
    path = root / ".dvc" / "tmp" / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")  # noqa: SIM115 (held until the process ends)
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        busy = _dvc_stage_running(root)  # DVC lets go of its lock while a stage's command runs
    except BlockingIOError:
        busy = str(path)
    if busy:
        f.close()
        raise SystemExit(f"{driver}: `dvc repro` (or another DVC command) is running in {root} ({busy}). Two drivers "
                         f"at once delete each other's outputs; wait for it to end, or stop it.")
    _DRIVER_LOCKS.append(f)


def _dvc_stage_running(root: Path) -> str | None:
    """The command of a DVC stage running now, from DVC's stage lock file (.dvc/tmp/rwlock: pid and cmd of each
    stage that reads or writes), if its process is alive."""
    try:
        locks = json.loads((root / ".dvc" / "tmp" / "rwlock").read_text())
    except (OSError, ValueError):
        return None
    holders = list(locks.get("write", {}).values()) + [i for v in locks.get("read", {}).values() for i in v]
    for info in holders:
        try:
            os.kill(int(info["pid"]), 0)
        except (ProcessLookupError, KeyError, ValueError, TypeError):
            continue
        except PermissionError:
            pass
        return f"pid {info['pid']}: {info.get('cmd', '')}"[:300]
    return None
