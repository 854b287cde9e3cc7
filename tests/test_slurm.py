"""The workflow through a real Slurm: a one-node cluster on this machine (scripts/slurm-localhost.sh, which installs
Slurm from Debian when it is missing), the Slurm workflow profile (workflow/profiles/slurm) and a small study. Every
job goes through Slurm (sacct lists it, by rule, COMPLETED) and the results equal those of a local run."""
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from test_pipeline import REPO, make_workspace, set_params, sh

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "slurm-localhost.sh"
TEACHER, STUDENT = "gfnet", "affine-label-nokd"  # the student reads no teacher: both train at once (2 CPUs)
# Training is deterministic on CPU for a given thread count: both drivers give the whole-machine rules (threads:
# 1024) the same number of threads, which the localhost node has.
THREADS = min(2, len(os.sched_getaffinity(0)))  # at most the node's CPUs (nproc)
TARGETS = ["evaluate_teachers", "evaluate_students_seed0_level0_1", "benchmark"]  # and the jobs they read


@pytest.fixture(scope="module")
def slurm():
    """The localhost cluster, started for this module (and stopped after it) unless it was already running."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("the localhost Slurm cluster needs root and apt-get (scripts/slurm-localhost.sh installs it)")
    was_running = subprocess.run([SCRIPT, "status"], capture_output=True).returncode == 0
    started = time.monotonic()
    proc = subprocess.run([SCRIPT, "start"], capture_output=True, text=True)
    assert proc.returncode == 0, f"scripts/slurm-localhost.sh failed:\n{proc.stdout}\n{proc.stderr}"
    print(f"\nlocalhost Slurm up in {time.monotonic() - started:.1f} s")
    yield
    if not was_running:
        subprocess.run([SCRIPT, "stop"], capture_output=True)


def small_study(ws: Path) -> None:
    """The smoke profile on one teacher and one affine student: prepare_data, train_teacher, one student job, the
    two evaluate jobs (the teacher's; the student's, re-parameterized) and the benchmark (of the architectures of
    table T6, trimmed to these two)."""
    def trim(d):
        t6 = d["tables"]["T6"]
        d["teachers"] = {TEACHER: d["teachers"][TEACHER]}
        d["variants"] = {STUDENT: d["variants"][STUDENT]}
        d["tables"] = {"T6": {**t6, "reference": "gfnet_h_b", "rows": [
            r if r["row"] == "gfnet_h_b" else {**r, "run": STUDENT}
            for r in t6["rows"] if r["row"] in ("gfnet_h_b", "riformer_s12")]}}
        d["guidelines"] = []
    set_params(ws, "params/study.yaml", trim)
    set_params(ws, "params/smoke.yaml", lambda d: d.update(runs={}))  # its override names a run cut here


def results(ws: Path) -> dict:
    out = {}
    for run in (TEACHER, STUDENT):
        evaluated = json.loads((ws / f"results/smoke/eval/{run}.json").read_text())
        out[run] = {"train top1": json.loads((ws / f"results/smoke/runs/{run}/metrics.json").read_text())["test_top1"],
                    **{k: evaluated[k] for k in ("test_top1", "test_top5", "test_loss")},
                    "predictions": np.load(ws / f"results/smoke/eval/{run}.predictions.npz")["pred"].tolist()}
    return out


def test_small_study_through_slurm_equals_a_local_run(slurm, tmp_path, monkeypatch):
    started = time.time()
    ws, local = make_workspace(tmp_path / "slurm"), make_workspace(tmp_path / "local")
    for w in (ws, local):
        small_study(w)
    # the local run, meanwhile (its jobs and the Slurm jobs share the CPUs; the results do not depend on that)
    env = {**os.environ, "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{local}/mlflow.db"}
    with open(tmp_path / "local.log", "w") as log:
        local_run = subprocess.Popen(["snakemake", *TARGETS, "--cores", str(THREADS), "--config", "profile=smoke"],
                                     cwd=local, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # NODE_CPUS: the profile's max-threads. Status checks (sacct) 2 s after the start and after each finished
        # job, not 10 s and 20 s (the plugin adds 10 s to the wait after each check that finds none finished).
        monkeypatch.setenv("NODE_CPUS", str(THREADS))
        out = sh(ws, "snakemake", *TARGETS, "--workflow-profile", "workflow/profiles/slurm", "--retries", "0",
                 "--seconds-between-status-checks", "2", "--slurm-init-seconds-before-status-checks", "2",
                 "--config", "profile=smoke")
    finally:
        local_run.wait()
    assert local_run.returncode == 0, (tmp_path / "local.log").read_text()[-4000:]
    print(f"Slurm and local runs: {time.time() - started:.0f} s")

    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    fields = ["JobName", "Comment", "State", "ReqCPUS", "WorkDir"]
    acct = subprocess.run(["sacct", "-X", "-a", "--parsable2", "--noheader", "-o", ",".join(fields), "-S",
                           time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started - 60))],
                          capture_output=True, text=True, check=True).stdout
    ours = [j for j in (dict(zip(fields, line.split("|"), strict=True)) for line in acct.splitlines())
            if j["WorkDir"] == str(ws)]
    jobs = {re.match(r"rule_(.+?)(?:_wildcards_.*)?$", j["Comment"]).group(1): j for j in ours}
    # every job of the DAG ran as one Slurm job (once) of this Snakemake run (the job name), and completed
    assert len(ours) == len(jobs) and sorted(jobs) == sorted(
        ["prepare_data", "train_teacher", "train_students_seed0_level0_1", *TARGETS]), acct
    assert {(j["JobName"], j["State"]) for j in jobs.values()} == {(run_id, "COMPLETED")}, acct
    assert jobs["train_teacher"]["Comment"] == f"rule_train_teacher_wildcards_{TEACHER}"
    # threads: 1024 asked for the node's CPUs (max-threads), a training job's 1 thread for one CPU
    assert jobs["benchmark"]["ReqCPUS"] == str(THREADS), acct
    assert jobs["train_teacher"]["ReqCPUS"] == jobs["evaluate_students_seed0_level0_1"]["ReqCPUS"] == "1", acct
    assert results(ws) == results(local)
