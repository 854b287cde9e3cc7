"""MLflow for every run: where the store is, one experiment per profile, nested stage runs.

The default store is SQLite at the repository root, resolved to an absolute path so that DVC's
temporary copies and every Snakemake job write to the same database; MLFLOW_TRACKING_URI overrides it
(a tracking server when the study outgrows one machine). A pipeline invocation's parent run id reaches
each stage through PIPELINE_PARENT_RUN_ID, and each stage's run is nested under it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
import warnings
from pathlib import Path

from pipeline.repo import git_state, project_root

PARENT_ENV = "PIPELINE_PARENT_RUN_ID"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


# The study's experiments are model training, not GenAI: MLflow reads this tag to choose an experiment's view.
# MLflow 3.17's UI follows its global "GenAI | Model training" switch instead (URL parameter `workflowType`,
# else the browser's last choice, at first GenAI: an empty traces dashboard), so every link the pipeline
# gives also carries `workflowType=machine_learning` (ui_url), which opens the runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI = "http://localhost:5000"  # `make ui`


def ui_url(experiment_id: str | None = None, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment (its runs) or of one run, in the UI's model-training view."""
    page = "" if experiment_id is None else f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{UI}/#/{page}?workflowType=machine_learning"


def setup(experiment: str):
    """Point MLflow at the project's store and experiment (created if missing, tagged as model training);
    returns the mlflow module."""
    warnings.filterwarnings("ignore", module="mlflow")
    import mlflow  # deferred (~2 s): only the stages that log import it

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with _creation_lock(uri):
        exp = mlflow.set_experiment(experiment)
    for key, value in EXPERIMENT_KIND.items():
        if exp.tags.get(key) != value:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
    return mlflow


@contextlib.contextmanager
def _creation_lock(uri: str):
    """Processes that open a new SQLite store at once race on its schema migration and on creating the experiment
    (queued DVC experiments start together): for a SQLite store the first one creates them under a file lock,
    the others then find them. A server (http://) does this itself."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with open(uri.removeprefix("sqlite:///") + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    """Log many metrics to a run that need not be active (MLflow takes at most 1000 per batch)."""
    import mlflow  # deferred (~2 s): see setup
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        mlflow.MlflowClient().log_batch(run_id, metrics=items[i:i + 1000])


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)
    return out


def experiment_name(profile: str) -> str:
    return f"riformer-{profile}"


def _parent_file(profile: str) -> Path:
    return Path("results") / profile / ".mlflow_parent"


def start_session(profile: str, driver: str) -> str:
    """Create the profile's experiment (once, before parallel jobs start: SQLite does not like racing
    creators) and the parent run of this pipeline invocation; stages nest their runs under it."""
    mlflow = setup(experiment_name(profile))
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name(profile))
    run = client.create_run(experiment.experiment_id, run_name=f"{driver} {profile}",
                            tags={"role": "pipeline", "driver": driver, "profile": profile, **git_state()})
    path = _parent_file(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run.info.run_id + "\n")
    os.environ[PARENT_ENV] = run.info.run_id
    return run.info.run_id


def end_session(profile: str, status: str = "FINISHED") -> None:
    run_id = parent_run_id(profile)
    if run_id:
        mlflow = setup(experiment_name(profile))
        mlflow.MlflowClient().set_terminated(run_id, status=status)
    _parent_file(profile).unlink(missing_ok=True)


def parent_run_id(profile: str | None = None) -> str | None:
    """This invocation's parent run: from the environment, else from the session file of `profile`."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    if profile and _parent_file(profile).is_file():
        return _parent_file(profile).read_text().strip() or None
    return None


def parent_tags(profile: str | None = None) -> dict[str, str]:
    """The tags that place a stage's run in its invocation: the parent run, and in a queued DVC experiment (which
    runs in a temporary copy of the repository, without the session's parent) the experiment's name."""
    parent = parent_run_id(profile)
    tags = {"mlflow.parentRunId": parent} if parent else {}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    return tags


@contextlib.contextmanager
def stage_run(profile: str, stage: str, name: str, tags: dict | None = None):
    """An MLflow run for one stage invocation, nested under the pipeline invocation's parent run."""
    mlflow = setup(experiment_name(profile))
    all_tags = {"stage": stage, "profile": profile, **git_state(), **parent_tags(profile), **(tags or {})}
    with mlflow.start_run(run_name=f"{stage}:{name}", tags=all_tags) as run:
        yield mlflow, run


def log_dataset(mlflow, path: str | Path, name: str, digest: str, context: str, attempts: int = 4) -> None:
    """Log a prepared dataset as an input of the active run.

    MLflow's SQL store looks the dataset up by (experiment, name, digest) and inserts it when missing, in
    two statements. Two jobs starting at once (Snakemake with --cores 2) can both miss it, and the
    second insert then fails its UNIQUE constraint. Retrying is safe: the next attempt finds the row the
    other job wrote and only adds this run's input link.
    """
    # deferred (~2 s): see setup
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.exceptions import MlflowException

    dataset = MetaDataset(resolve_dataset_source(str(Path(path).resolve())), name=name, digest=digest)
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as e:
            message = str(e).lower()  # SQLite/PostgreSQL: "unique constraint", MySQL: "duplicate entry"
            if not ("unique constraint" in message or "duplicate" in message) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def run(args) -> None:
    if args.action == "start":
        print(start_session(args.profile, args.driver))
    elif args.action == "end":
        end_session(args.profile, args.status)
    else:
        mlflow = setup(experiment_name(args.profile))
        experiment = mlflow.get_experiment_by_name(experiment_name(args.profile))
        print(f"MLflow UI of the {args.profile} study: {ui_url(experiment.experiment_id)}")


def add_arguments(p) -> None:
    p.add_argument("action", choices=["start", "end", "url"], help="url: print the UI page of the study's runs")
    p.add_argument("--profile", default="default")
    p.add_argument("--driver", default="dvc", help="recorded as a tag of the parent run")
    p.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
