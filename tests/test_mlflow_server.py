"""The MLflow tracking server of `make mlflow-server` (PostgreSQL, artifacts through the server): parallel
pipeline jobs logging to it over HTTP lose nothing. (The smoke DAG test, tests/test_pipeline.py, runs the whole
study's jobs against such a server too.)"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow_server import server_artifacts, server_client

from pipeline.tracking import PARENT_ENV

PROFILE = "smoke"

# One pipeline job: what a stage does through pipeline.tracking (a run nested under the invocation's parent, the
# shared dataset input, params, a metric history, artifacts), started at the same moment as every other job.
JOB = """
import sys, time
from pathlib import Path
from pipeline import tracking

job, steps, folder = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
tracking.setup(tracking.experiment_name("smoke"))  # mlflow imported: the slow part, before the start line
(folder / f"ready-{job}").touch()
while not (folder / "go").exists():
    time.sleep(0.01)
with tracking.stage_run("smoke", "train", f"job-{job}", tags={"job": str(job)}) as (mlflow, run):
    tracking.log_dataset(mlflow, folder, "fashion-mnist", "d" * 32, "training")
    mlflow.log_params({"job": job, "steps": steps})
    for step in range(1, steps + 1):
        mlflow.log_metrics({"train/loss": job + 1 / step, "lr": step / 1000}, step=step)
    mlflow.log_dict({"job": job, "steps": steps}, "metrics.json")
    note = Path(f"note-{job}.txt")
    note.write_text(f"job {job}\\n")
    mlflow.log_artifact(str(note), "notes")
"""


def pipeline_cmd(*args, cwd, env=None):
    out = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_parallel_jobs_lose_no_run_on_the_server(mlflow_server, tmp_path):
    jobs, steps = 12, 20
    # The session as a Snakemake invocation opens it; its parent run id reaches the jobs through the environment.
    env = {k: v for k, v in os.environ.items() if k != PARENT_ENV}
    parent = pipeline_cmd("session", "start", "--profile", PROFILE, "--driver", "snakemake", cwd=tmp_path,
                          env=env).strip()
    env[PARENT_ENV] = parent
    procs = [subprocess.Popen([sys.executable, "-c", JOB, str(i), str(steps), str(tmp_path)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(jobs)]
    deadline = time.time() + 300
    while not all((tmp_path / f"ready-{i}").exists() for i in range(jobs)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.poll() for p in procs]
        time.sleep(0.05)
    (tmp_path / "go").touch()  # every job logs at once
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    pipeline_cmd("session", "end", "--profile", PROFILE, cwd=tmp_path, env=env)

    client = server_client(mlflow_server)
    exp = client.get_experiment_by_name("riformer-smoke")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert len(runs) == jobs + 1
    [parent_run] = [r for r in runs if r.info.run_id == parent]
    assert parent_run.info.status == "FINISHED" and parent_run.data.tags["role"] == "pipeline"
    children = {int(r.data.tags["job"]): r for r in runs if r.info.run_id != parent}
    assert sorted(children) == list(range(jobs))
    artifacts = server_artifacts(mlflow_server)
    for job, run in children.items():
        assert run.info.status == "FINISHED", job
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["stage"] == "train"
        assert run.data.params == {"job": str(job), "steps": str(steps)}
        loss = client.get_metric_history(run.info.run_id, "train/loss")
        assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == \
            [(s, job + 1 / s) for s in range(1, steps + 1)]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "lr")) == list(range(1, steps + 1))
        assert [(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs] == [("fashion-mnist", "d" * 32)]
        # the artifacts went through the server (mlflow-artifacts:/) into its artifact store
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"metrics.json", "notes"}
        local = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / f"dl-{job}")))
        assert json.loads(local.read_text()) == {"job": job, "steps": steps}
        stored = artifacts / exp.experiment_id / run.info.run_id / "artifacts"
        assert (stored / "notes" / f"note-{job}.txt").read_text() == f"job {job}\n"
