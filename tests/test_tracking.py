"""MLflow bookkeeping that parallel Snakemake jobs depend on."""
import subprocess

import pytest
import sqlalchemy.orm
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.dbmodels.models import SqlDataset
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.repo import git_state


def _miss_first_dataset_lookup(monkeypatch):
    """Make the store's first "does this dataset exist?" query come back empty although the row exists:
    what a job sees when another job inserts the same dataset between its lookup and its insert."""
    original = sqlalchemy.orm.Query.all
    missed = []

    def all_(self):
        if not missed and self.column_descriptions[0]["entity"] is SqlDataset:
            missed.append(True)
            return []
        return original(self)

    monkeypatch.setattr(sqlalchemy.orm.Query, "all", all_)
    return missed


def test_log_dataset_survives_a_job_that_registered_it_first(tmp_path, mlflow_store, monkeypatch):
    mlflow = tracking.setup("test-dataset-race")
    with mlflow.start_run():  # the other job
        tracking.log_dataset(mlflow, tmp_path, "fashion-mnist", "d" * 32, "training")

    missed = _miss_first_dataset_lookup(monkeypatch)
    with mlflow.start_run() as run:
        tracking.log_dataset(mlflow, tmp_path, "fashion-mnist", "d" * 32, "training")
    assert missed, "the simulated race did not happen"
    inputs = MlflowClient(mlflow_store).get_run(run.info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("fashion-mnist", "d" * 32)]

    # without a second attempt the same race is the CI failure: a UNIQUE constraint error
    _miss_first_dataset_lookup(monkeypatch)
    with mlflow.start_run(), pytest.raises(MlflowException, match="UNIQUE constraint"):
        tracking.log_dataset(mlflow, tmp_path, "fashion-mnist", "d" * 32, "training", attempts=1)


def test_git_state_counts_code_not_the_reports_the_pipeline_writes(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "README.md").write_text("old report\n")
    (tmp_path / "train.py").write_text("code\n")
    git("add", ".")
    git("commit", "-qm", "init")
    assert git_state(tmp_path)["git_dirty"] == "false"
    (tmp_path / "reports" / "README.md").write_text("new report\n")
    assert git_state(tmp_path)["git_dirty"] == "false"
    (tmp_path / "train.py").write_text("changed code\n")
    assert git_state(tmp_path)["git_dirty"] == "true"
