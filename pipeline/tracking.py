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
import socket
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


# A tracking server that does not answer: `setup` asks it first (5 s), so a stage fails within seconds, naming it;
# later, a refused connection fails after MLflow's retries (3 tries, 1 + 2 s apart, plus up to 1 s of jitter each),
# and a server that accepts but hangs after at most 3 x 30 s (its defaults: 8 tries of 120 s, silently). 30 s, not
# less: artifact uploads (ONNX models, report files) to a busy server take seconds. A run that fails so keeps its
# files: its checkpoint resumes it once the server is back (docs/faults.md).
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server does not answer."""


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingUnavailable, naming the server, when an http(s) tracking URI does not answer its /health."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error  # deferred: only a tracking server needs it
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:  # it answered (a proxy's 401 or 404 included): MLflow's own calls will say more
        return
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingUnavailable(f"MLflow tracking server {uri} does not answer ({reason}): start it (`make "
                                  f"mlflow-server`) or unset MLFLOW_TRACKING_URI to log to the local store; a run "
                                  f"stopped by this resumes from its checkpoint") from None


def setup(experiment: str):
    """Point MLflow at the project's store and experiment (created if missing, tagged as model training);
    returns the mlflow module. A tracking server that does not answer is an error within seconds."""
    warnings.filterwarnings("ignore", module="mlflow")
    for key, value in HTTP_RETRIES.items():
        os.environ.setdefault(key, value)
    import mlflow  # deferred (~2 s): only the stages that log import it

    uri = tracking_uri()
    check_server(uri)
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


# ------------------------------------------------------------------------------------- run status
# A run's MLflow status is the truth: FINISHED only after its last file is written, FAILED (tag `error`) on an
# exception, KILLED on SIGINT/SIGTERM (pipeline.__main__ raises those as KeyboardInterrupt), and a run whose
# process vanished (SIGKILL, out of memory, a lost node) is closed FAILED by the next invocation that owns it.
VANISHED = "process vanished (killed without a chance to record it: SIGKILL, out of memory or a lost node)"


def owner_tags() -> dict[str, str]:
    """Which process a run belongs to, so that a later invocation can tell a live run from an orphan."""
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


def status_of(error: BaseException | None) -> str:
    return "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def close_run(mlflow, run_id: str, error: BaseException | None = None) -> None:
    """End `run_id` as FINISHED, FAILED or KILLED (status_of), the error as its `error` tag; the process's active
    run is popped too, so the next run of a multi-run job starts clean. While recording an error, a store that
    fails too (a server gone) is a warning: the error being recorded is the one to raise."""
    try:
        client = mlflow.MlflowClient()
        if error is not None:
            client.set_tag(run_id, "error", (f"{type(error).__name__}: {error}".strip().rstrip(":"))[:5000])
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status=status_of(error))
        else:
            client.set_terminated(run_id, status=status_of(error))
    except Exception as e:
        if error is None:
            raise
        print(f"warning: MLflow run {run_id} could not be marked {status_of(error)} ({type(e).__name__}: "
              f"{str(e)[:200]}); the next invocation closes it", flush=True)
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status_of(error))  # pop it from this process's stack at least


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def close_vanished(mlflow, experiment: str, run_name: str, run_dir: str | None = None) -> list[str]:
    """Close, FAILED with VANISHED, the RUNNING runs of `experiment` named `run_name` whose process is gone: on
    this host a pid that no longer runs; with `run_dir` (a training run whose folder's lock the caller holds, so no
    live process writes it), every such run of that folder, wherever it ran. Returns their ids."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    quoted = run_name.replace("'", "\\'")
    runs = client.search_runs([exp.experiment_id],
                              f"attributes.run_name = '{quoted}' and attributes.status = 'RUNNING'")
    closed = []
    for r in runs:
        tags = r.data.tags
        if r.info.run_id == os.environ.get(PARENT_ENV):
            continue
        owned = run_dir is not None and tags.get("run_dir") == run_dir
        if owned or (tags.get("host") == socket.gethostname() and not _alive(tags.get("pid", ""))):
            client.set_tag(r.info.run_id, "error", VANISHED)
            client.set_terminated(r.info.run_id, status="FAILED")
            closed.append(r.info.run_id)
    if closed:
        print(f"{run_name}: closed {len(closed)} MLflow run(s) left RUNNING by a vanished process (now FAILED): "
              f"{', '.join(closed)}", flush=True)
    return closed


@contextlib.contextmanager
def stage_run(profile: str, stage: str, name: str, tags: dict | None = None):
    """An MLflow run for one stage invocation, nested under the pipeline invocation's parent run; FINISHED only
    when the stage's block ends, FAILED or KILLED otherwise (close_run). An earlier invocation of the same stage
    whose process vanished is closed first."""
    mlflow = setup(experiment_name(profile))
    run_name = f"{stage}:{name}"
    close_vanished(mlflow, experiment_name(profile), run_name)
    all_tags = {"stage": stage, "profile": profile, **git_state(), **parent_tags(profile), **owner_tags(),
                **(tags or {})}
    run = mlflow.start_run(run_name=run_name, tags=all_tags)
    try:
        yield mlflow, run
    except BaseException as e:
        close_run(mlflow, run.info.run_id, e)
        raise
    close_run(mlflow, run.info.run_id)


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
