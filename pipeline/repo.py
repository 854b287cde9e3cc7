"""Where the repository is, and the state of its working tree (recorded with every MLflow run)."""
from __future__ import annotations

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
