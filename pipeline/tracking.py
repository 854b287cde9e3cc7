"""MLflow for every run: where the store is, one experiment per profile, nested stage runs.

The default store is SQLite at the repository root, resolved to an absolute path so that DVC's
temporary copies and every Snakemake job write to the same database; MLFLOW_TRACKING_URI overrides it
(a tracking server when the study outgrows one machine). A pipeline invocation's parent run id reaches
each stage through PIPELINE_PARENT_RUN_ID, and each stage's run is nested under it.
"""
from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PARENT_ENV = "PIPELINE_PARENT_RUN_ID"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def setup(experiment: str):
    """Point MLflow at the project's store and experiment (created if missing); returns the mlflow module."""
    warnings.filterwarnings("ignore", module="mlflow")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    return mlflow


def git_state() -> dict[str, str]:
    """Commit and dirty flag of the working tree (MLflow tags the commit but not a dirty tree)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
        return {"git_commit": commit, "git_dirty": str(dirty).lower()}
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)
    return out


def parent_tags() -> dict[str, str]:
    parent = os.environ.get(PARENT_ENV)
    return {"mlflow.parentRunId": parent} if parent else {}
