"""The ablation DAG end to end (issues 4, 11): a fresh clone plans the whole study; the smoke profile through
Snakemake, then DVC on the same results; a changed teacher or dataset retrains exactly what depends on it; the
paper profile and a user's own profile planned by both drivers, and one batch of each paper stage kind."""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.study import load_study

REPO = Path(__file__).resolve().parent.parent
COPY = ["pipeline", "params", "workflow", "reports", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore",
        "pyproject.toml"]
BIN = str(Path(sys.executable).parent)

pytestmark = pytest.mark.slow


def make_workspace(root: Path) -> Path:
    """A copy of the project (code, params, workflow, DVC config) in its own git repository and MLflow store."""
    for item in COPY:
        src, dst = REPO / item, root / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    (root / ".gitignore").write_text("results/\nlogs/\nmlflow.db\nmlflow.db.lock\n.snakemake/\n")
    env = _env(root)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=root, check=True, env=env)
    return root


def _env(root: Path) -> dict:
    """The workspace's own SQLite store, or the MLflow server of a test that asked for one (`mlflow_server`)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
            "MLFLOW_TRACKING_URI": uri if uri.startswith("http") else f"sqlite:///{root}/mlflow.db"}


def sh(root: Path, *cmd: str) -> str:
    proc = subprocess.run(list(cmd), cwd=root, env=_env(root), capture_output=True, text=True)
    if proc.returncode != 0:
        logs = "".join(f"\n--- {p}\n{p.read_text()[-3000:]}" for p in sorted((root / "logs").rglob("*.log"))[-3:]) \
            if (root / "logs").exists() else ""
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}{logs}")
    return proc.stdout + proc.stderr


def planned_jobs(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake dry run."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", output, re.M) if m.group(1) != "total"}


def student_jobs(jobs: dict[str, int]) -> dict[str, int]:
    """The planned student training jobs (rules train_<job> of study.train_batches), by rule name."""
    return {k: v for k, v in jobs.items() if k.startswith("train_") and k != "train_teacher"}


def job_of(study, run: str) -> str:
    return next(b for b, runs in study.train_batches.items() if run in runs)


def job_rule(study, run: str) -> str:
    return "train_" + re.sub(r"\W", "_", job_of(study, run))


def set_params(root: Path, rel: str, update) -> None:
    path = root / rel
    data = yaml.safe_load(path.read_text()) or {}
    update(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_fresh_clone_plans_every_training_job(tmp_path):
    """The committed files only (reports/default included, no results/): the main job trains the whole study,
    it does not take the committed report for a result."""
    ws = make_workspace(tmp_path / "ws")
    assert (ws / "reports/default/README.md").is_file() and not (ws / "results").exists()
    study = load_study("default", check_data=False)
    jobs = planned_jobs(sh(ws, "snakemake", "-n", "--cores", "2"))
    assert len(study.train_batches) < len(study.student_runs)  # the default profile batches its runs
    assert student_jobs(jobs) == {job_rule(study, runs[0]): 1 for runs in study.train_batches.values()}
    assert jobs["train_teacher"] == len(study.teacher_runs)
    # each training job's runs are evaluated by a job of their own (the teachers by one), as soon as they exist
    assert {k: v for k, v in jobs.items() if k.startswith("evaluate_")} == {
        "evaluate_teachers": 1, **{"evaluate_" + job_rule(study, runs[0])[len("train_"):]: 1
                                   for runs in study.train_batches.values()}}
    assert jobs["prepare_data"] == jobs["benchmark"] == jobs["report"] == 1


def test_committed_dvc_yaml_is_up_to_date():
    out = subprocess.run([sys.executable, "-m", "pipeline", "dvc-yaml", "--check"], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_smoke_dag_through_snakemake_then_dvc(tmp_path, mlflow_server):
    """The parallel jobs log to an MLflow server on PostgreSQL over HTTP (make mlflow-server): every run arrives."""
    ws = make_workspace(tmp_path / "ws")
    from pipeline.study import load_study
    study = load_study("smoke", check_data=False)

    sh(ws, "snakemake", "--cores", "2", "--config", "profile=smoke")
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("riformer-smoke")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("role") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    # none lost: one run per training run and per stage job, each FINISHED and nested under the one parent
    expected = {"train": len(study.runs), "prepare-data": 1, "evaluate": 1 + len(study.train_batches), "benchmark": 1,
                "export": 1, "latency-breakdown": 1, "report": 1}
    stages = [r.data.tags.get("stage") for r in runs if r.info.run_id != parent]
    assert {s: stages.count(s) for s in expected} == expected and len(stages) == sum(expected.values()), stages
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent
               for r in runs if r.info.run_id != parent)
    finished = {r.data.tags["variant"]: r for r in runs
                if r.data.tags.get("stage") == "train" and r.info.status == "FINISHED"}
    for table, spec in study.tables.items():
        for row in spec["rows"]:
            if row.get("run"):
                run = finished.get(row["run"])
                assert run is not None, f"{table}/{row['row']}: no finished MLflow run for {row['run']}"
                assert "final/test_top1" in run.data.metrics and "deploy/test_top1" in run.data.metrics
                assert table in run.data.tags["table"].split(",") or row["run"] in study.teachers
                assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["seed"] == "0"
    # the parent run carries every table cell with its interval
    cells = client.get_run(parent).data.metrics
    assert {"T1/pooling-ce/top1/mean", "T1/identity-ce/top1/delta_low", "T8/riformer_s12/throughput/delta_high"} \
        <= set(cells)
    # one dataset row, logged by prepare-data and shared by every training run (parallel jobs do not race on it)
    prepared = [r for r in runs if r.data.tags.get("stage") == "prepare-data"]
    digests = {i.dataset.digest for r in prepared + list(finished.values()) for i in r.inputs.dataset_inputs}
    assert len(digests) == 1 and all(r.inputs.dataset_inputs for r in prepared + list(finished.values()))
    stages = {r.data.tags.get("stage") for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert {"prepare-data", "train", "evaluate", "benchmark", "export", "latency-breakdown", "report"} <= stages
    # every student's deploy model as ONNX, agreeing with torch in ONNX Runtime; the best one registered with an
    # alias, and it loads from MLflow by that alias and computes the logits the deploy checkpoint does
    export = json.loads((ws / study.export_summary_path(0)).read_text())
    assert set(export["runs"]) == set(study.export_runs) and "adavit" not in export["runs"]
    assert all(0 <= r["max_abs_logit_diff"] <= 1e-4 and r["num_images"] == 200 for r in export["runs"].values())
    registered = client.get_model_version_by_alias("riformer-smoke-deploy", "best")
    assert registered.version == str(export["registered"]["version"])
    best = export["registered"]["run"]
    top1 = {r: json.loads((ws / study.eval_path(r)).read_text())["test_top1"] for r in study.export_runs}
    assert top1[best] == max(top1.values())  # one seed: the best variant is the best run
    mlflow.set_tracking_uri(mlflow_server)
    pyfunc = mlflow.pyfunc.load_model("models:/riformer-smoke-deploy@best")
    assert tuple(pyfunc.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 32, 32)
    from pipeline.io import load_checkpoint, model_from_checkpoint
    images = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        expected_logits = model_from_checkpoint(load_checkpoint(ws / study.deployed_model(best))).eval()(images)
    logits = pyfunc.predict(images.numpy())["logits"]
    assert np.abs(logits - expected_logits.numpy()).max() <= 1e-4
    readme = (ws / "results/smoke/report/README.md").read_text()  # the committed reports/ are not written
    assert "### T4" in readme and "guideline" in readme.lower() and "200 (every accuracy" in readme
    assert len(np.load(ws / study.predictions_path("pooling-ce"))["pred"]) == 200

    # a second run with nothing changed does nothing
    assert "Nothing to be done" in sh(ws, "snakemake", "-n", "--cores", "2", "--config", "profile=smoke")
    # changing one variant's parameter reruns that variant and what depends on it, nothing else
    set_params(ws, "params/study.yaml", lambda d: d["variants"]["identity-label-hard"]["kd"].update(tau=2.0))
    out = sh(ws, "snakemake", "-n", "--cores", "2", "--config", "profile=smoke")
    jobs = planned_jobs(out)
    job = job_rule(study, "identity-label-hard")
    expected = {job: 1, "evaluate_" + job[len("train_"):]: 1, "benchmark": 1, "export_seed0": 1, "report": 1, "all": 1}
    assert jobs == expected, out[-3000:]
    subprocess.run(["git", "checkout", "params/study.yaml"], cwd=ws, check=True)
    # a changed teacher reruns it and exactly its students (and the ones that read them)
    students = [r for r in study.student_runs if "gfnet" in study.references(r)]
    set_params(ws, "params/smoke.yaml", lambda d: d["runs"].update(gfnet={"optim": {"lr": 1.0e-3}}))
    jobs = planned_jobs(sh(ws, "snakemake", "-n", "--cores", "2", "--config", "profile=smoke"))
    assert jobs["train_teacher"] == 1 and "prepare_data" not in jobs
    assert student_jobs(jobs) == {job_rule(study, r): 1 for r in students}
    subprocess.run(["git", "checkout", "params/smoke.yaml"], cwd=ws, check=True)
    before = {r: json.loads((ws / study.eval_path(r)).read_text())["test_top1"] for r in study.runs}

    # DVC on the same workspace and results (dvc.yaml listing the smoke profile's runs): it reruns its stages (no
    # lock file yet); training resumes from each finished checkpoint instead of training again, and the results
    # are the same, not mixed.
    set_params(ws, "params.yaml", lambda d: d.update(profile="smoke"))
    sh(ws, "python", "-m", "pipeline", "dvc-yaml", "--profile", "smoke")
    out = sh(ws, "dvc", "repro")
    assert out.count("resuming after epoch 1 of 1") == len(study.runs)  # nothing trained twice
    after = {r: json.loads((ws / study.eval_path(r)).read_text())["test_top1"] for r in study.runs}
    assert after == before
    assert "up to date" in sh(ws, "dvc", "repro")
    assert "test_top1" in sh(ws, "dvc", "metrics", "show")
    set_params(ws, "params/study.yaml", lambda d: d["variants"]["identity-label-hard"]["kd"].update(tau=2.0))
    changed = sh(ws, "dvc", "status")
    stage = f"train-{job_of(study, 'identity-label-hard')}"
    assert f"{stage}:" in changed and "train-teacher@gfnet" not in changed
    assert not [b for b in study.train_batches if f"train-{b}:" in changed and f"train-{b}" != stage]
    subprocess.run(["git", "checkout", "params/study.yaml"], cwd=ws, check=True)

    # Retrained for real: the changed teacher's student starts over (it does not resume its finished checkpoint)
    set_params(ws, "params/smoke.yaml", lambda d: d["runs"].update(gfnet={"optim": {"lr": 1.0e-3}}))
    sh(ws, "snakemake", "--cores", "2", str(study.model_path("affine-label-soft")), "--config", "profile=smoke")
    log = run_lines(ws, study, "affine-label-soft")
    assert "not resuming" in log and "kd.teacher file" in log and "resuming after" not in log
    # the runs of its job that read no changed input resume their finished checkpoint (trained once, not twice)
    job = study.train_batches[job_of(study, "affine-label-soft")]
    unchanged = [r for r in job if "gfnet" not in study.references(r)]
    assert unchanged  # affine-pbig-nolabel-soft, affine-lightvit-nolabel-soft, adavit
    for run in unchanged:
        assert "resuming after epoch 1 of 1" in run_lines(ws, study, run), run
    # and a changed dataset retrains every run, here one of them
    set_params(ws, "params/smoke.yaml", lambda d: d["data"].update(train_subset=320))
    jobs = planned_jobs(sh(ws, "snakemake", "-n", "--cores", "2", "--config", "profile=smoke"))
    assert jobs["prepare_data"] == 1 and sum(student_jobs(jobs).values()) == len(study.train_batches)
    sh(ws, "snakemake", "--cores", "2", str(study.model_path("pooling-ce")), "--config", "profile=smoke")
    log = run_lines(ws, study, "pooling-ce")
    assert "not resuming" in log and "prepared data" in log and "resuming after" not in log


def run_lines(ws: Path, study, run: str) -> str:
    """What a run printed in its training job's log."""
    log = (ws / f"logs/{study.profile}/train/{job_of(study, run)}.log").read_text()
    return "".join(line for line in log.splitlines(True) if line.startswith(f"[{run}]"))


# The README's "Run it on your own image folder" profile, at test size.
USER_PROFILE = """\
description: my own image folder
data: {{source: imagefolder, root: {root}}}
models: {{}}
train:
  data: {{img_size: 32, batch_size: 2, eval_batch_size: 2}}
  optim: {{epochs: 1, warmup_epochs: 0}}
teacher_train: {{}}
mi_lambdas: {{}}
readings: {{}}
runs: {{pooling-width-cut: {{model_kwargs: {{dims: [14, 28, 56, 112]}}}}}}
seeds: [0]
evaluate: {{}}
latency: {{}}
report: {{}}
"""


def _tiny_imagefolder(root: Path) -> Path:
    for split in ("train", "val"):
        for c, color in (("n01", (200, 30, 30)), ("n02", (30, 30, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (256, 256), color).save(root / split / c / f"{i}.JPEG")
    return root


def test_paper_profile_plans_and_runs_one_batch_of_each_stage_kind(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    data = _tiny_imagefolder(tmp_path / "imagenet")
    # a user's own profile: any params/<name>.yaml runs through both drivers without editing the workflow
    (ws / "params/mine.yaml").write_text(USER_PROFILE.format(root=data))
    mine = load_study("mine", params=ws / "params")
    jobs = planned_jobs(sh(ws, "snakemake", "-n", "--cores", "2", "--config", "profile=mine"))
    assert sum(student_jobs(jobs).values()) == len(mine.student_runs) and jobs["report"] == 1  # a job per run
    set_params(ws, "params.yaml", lambda d: d.update(profile="mine"))
    # the committed dvc.yaml lists the default profile's jobs: DVC stops at the first command of a stage
    with pytest.raises(AssertionError, match="dvc.yaml lists the jobs of profile default, not mine: run python -m "
                                             "pipeline dvc-yaml --profile mine first"):
        sh(ws, "dvc", "repro", "prepare-data")
    assert not (ws / "results/mine/data").exists()
    sh(ws, "python", "-m", "pipeline", "dvc-yaml", "--profile", "mine")  # its seeds differ from default's
    plan = sh(ws, "dvc", "repro", "--dry", "--force")
    assert plan.count("Running stage 'train-") == len(mine.runs) and "--profile mine" in plan

    jobs = planned_jobs(sh(ws, "snakemake", "-n", "--cores", "16", "--config", "profile=paper", f"data_root={data}"))
    study = load_study("paper", check_data=False)
    assert sum(student_jobs(jobs).values()) == len(study.student_runs) == len(study.train_batches)
    assert jobs["train_teacher"] == len(study.teacher_runs) and jobs["report"] == 1
    # a job without a GPU fails at once (not 8 CPU processes for days); no deterministic kernels on GPUs
    configs = [study.run_config(r) for r in study.runs]
    assert all(c.device == "cuda" and not c.deterministic for c in configs)
    assert study.settings["data"]["check_images"] == "full"  # a truncated JPEG found before training, not in it
    set_params(ws, "params.yaml", lambda d: d.update(profile="paper"))
    set_params(ws, "params/paper.yaml", lambda d: d["data"].update(root=str(data)))
    sh(ws, "python", "-m", "pipeline", "dvc-yaml", "--profile", "paper")
    # DVC's --dry needs --force while upstream outputs do not exist yet (treeverse/dvc#9021)
    plan = sh(ws, "dvc", "repro", "--dry", "--force")
    assert plan.count("Running stage 'train-") == len(study.runs)
    assert "python -m pipeline report --profile paper" in plan
    # one seed; every training job is 8 processes under torchrun on the job's 8 GPUs
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    assert study.settings["seeds"] == [0] and not any("seed1" in name for name in stages)
    train_cmds = [s["cmd"][-1] for k, s in stages.items() if k.startswith("train-") and k != "train-teacher"]
    train_cmds.append(stages["train-teacher"]["do"]["cmd"][-1])
    assert len(train_cmds) == len(study.train_batches) + 1
    assert all(c.startswith("python -m pipeline.gpus --gpus 8 --share 1 -- torchrun --standalone --nproc_per_node 8 "
                            "-m pipeline -- train --profile ${profile}") for c in train_cmds), train_cmds[0]

    def one_batch(d):
        d["train"].update(threads=2, device="cpu")
        d["train"]["data"].update(batch_size=2, eval_batch_size=2, train_limit=2, test_limit=2, workers=0)
        d["train"]["optim"].update(epochs=1, warmup_epochs=0)
        d["evaluate"] = {"batch_size": 2, "benchmark": {"batch_size": 1, "warmup": 0, "repeats": 1, "iters": 1,
                                                        "threads": 2, "device": "cpu"}}
        d["latency"] = {"batch_size": 1, "img_size": 224, "warmup": 0, "repeats": 1, "iters": 1, "threads": 2,
                        "device": "cpu"}
    set_params(ws, "params/paper.yaml", one_batch)
    py = ["python", "-m", "pipeline"]
    sh(ws, *py, "prepare-data", "--profile", "paper")
    # logit teacher, imitation teacher, final student, LightViT-T (T6 row, T5 teacher), DeiT-S and AdaViT-S
    for run in ("gfnet", "pooling-ce", "affine-mi-partial", "lightvit", "deit", "adavit"):
        sh(ws, *py, "train", "--profile", "paper", "--run", run, "--no-progress")
    sh(ws, *py, "reparameterize", "--profile", "paper", "--run", "affine-mi-partial", "--num-images", "2")
    for run in ("affine-mi-partial", "lightvit", "adavit"):
        sh(ws, *py, "evaluate", "--profile", "paper", "--run", run)
    sh(ws, *py, "latency-breakdown", "--profile", "paper")
    with pytest.raises(AssertionError, match="evaluation is incomplete"):  # not reported by default
        sh(ws, *py, "report", "--profile", "paper")
    sh(ws, *py, "report", "--profile", "paper", "--allow-missing")
    evaluated = json.loads((ws / "results/paper/eval/affine-mi-partial.json").read_text())
    # deploy RIFormer-S12 at 2 classes: PoolFormer-S12's count less the first layer scale of each block (folded
    # into the merged norm: 2*64 + 2*128 + 6*320 + 2*512 = 3,328)
    assert evaluated["model"] == "riformer_s12"
    assert evaluated["params"] == 11_915_176 - 1000 * 513 + 2 * 513 - 3_328
    lightvit = json.loads((ws / "results/paper/eval/lightvit.json").read_text())
    assert lightvit["model"] == "lightvit_tiny" and lightvit["params"] == 9_377_698 - 1000 * 1281 + 2 * 1281
    adavit = json.loads((ws / "results/paper/eval/adavit.json").read_text())
    assert adavit["model"] == "ada_deit_small" and adavit["fast_path"]["max_abs_logit_diff"] < 1e-3
    assert adavit["macs"] < adavit["macs_masked_path"]  # expected MACs of its decisions, not the dense count
    assert len(json.loads((ws / "results/paper/eval/adavit.decisions.json").read_text())["patch"][0]) == 12
    summary = json.loads((ws / "results/paper/report/summary.json").read_text())
    assert "T2/identity-label-hard/top1" in summary["missing"]  # runs that did not run show as missing


def test_gpu_profile_plans_for_one_gpu_and_runs_one_batch_on_cpu(tmp_path):
    """The gpu profile: every training and evaluation job shares the GPU (8 jobs at once) through the GPU wrapper, the
    measurements take it whole; one batch of a teacher, the imitation teacher and a distilled, imitating student
    trains on the CPU with the profile's other settings."""
    ws = make_workspace(tmp_path / "ws")
    study = load_study("gpu", params=ws / "params", check_data=False)
    plan = sh(ws, "snakemake", "-n", "-p", "--cores", "16", "--config", "profile=gpu")
    jobs = planned_jobs(plan)
    assert sum(student_jobs(jobs).values()) == len(study.train_batches) and jobs["train_teacher"] == 10  # ViG too
    commands = [line.removeprefix("Shell command: ") for line in plan.splitlines() if line.startswith("Shell command")]
    train = [c for c in commands if " -m pipeline train --profile gpu " in c]
    assert len(train) == len(study.train_batches) + len(study.teacher_runs)
    assert all(c.startswith("python -m pipeline.gpus --gpus 1 --share 8 -- python -m pipeline train") for c in train)
    for stage, share in (("evaluate", 8), ("benchmark", 1), ("latency-breakdown", 1)):  # measurements: a GPU alone
        launched = [c for c in commands if f" -m pipeline {stage} --profile gpu" in c]
        assert launched and all(c.startswith(f"python -m pipeline.gpus --gpus 1 --share {share} -- ") for c in launched)
    assert study.settings["data"]["train_subset"] is None and study.settings["seeds"] == [0, 1, 2]

    def one_batch(d):
        d["train"].update(device="cpu", threads=2)
        d["train"]["data"].update(batch_size=4, eval_batch_size=4, train_limit=4, test_limit=4)
        d["train"]["optim"].update(epochs=1, warmup_epochs=0)
        for run in d["runs"].values():
            run.pop("optim", None)
        d["teacher_train"] = {}
    set_params(ws, "params/gpu.yaml", one_batch)
    py = ["python", "-m", "pipeline"]
    sh(ws, *py, "prepare-data", "--profile", "gpu")
    sh(ws, *py, "train", "--profile", "gpu", "--run", "gfnet", "pooling-ce", "--no-progress")
    sh(ws, *py, "train", "--profile", "gpu", "--run", "affine-mi-partial", "--no-progress")
    metrics = json.loads((ws / "results/gpu/runs/affine-mi-partial/metrics.json").read_text())
    assert metrics["model"] == "riformer_nano" and metrics["epochs"] == 1
    assert json.loads((ws / "results/gpu/data/meta.json").read_text())["counts"] == {"train": 60_000, "test": 10_000}


def test_queued_dvc_experiments_run_two_at_a_time_into_one_mlflow_store(tmp_path):
    """`dvc exp run --queue` + `dvc queue start -j 2`: two experiments of the smoke profile (a teacher at two batch
    sizes), each in DVC's temporary copy of the repository, at the same time, logging to the workspace's store."""
    ws = make_workspace(tmp_path / "ws")
    set_params(ws, "params.yaml", lambda d: d.update(profile="smoke"))
    # 12 epochs: training long enough (seconds) that the two workers' start-up skew cannot keep them apart (at
    # smoke's one epoch, a fast machine finished the first before the second began)
    set_params(ws, "params/smoke.yaml", lambda d: d["teacher_train"].update(optim={"epochs": 12}))
    sh(ws, "python", "-m", "pipeline", "dvc-yaml", "--profile", "smoke")
    sh(ws, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "smoke")
    sizes = {"deit-b25": 25, "deit-b50": 50}
    for name, size in sizes.items():
        sh(ws, "dvc", "exp", "run", "--queue", "train-teacher@deit", "-n", name,
           "-S", f"params/smoke.yaml:train.data.batch_size={size}")
    # `dvc queue start` detaches its workers with its stdout: read through a pipe, its output could wait for the
    # last worker to exit, and a worker has been seen to linger idle after both experiments succeeded; a file
    # cannot. The lingering workers are stopped at the end.
    with open(ws / "queue-start.log", "w") as log:
        subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=ws, env=_env(ws), stdout=log,
                       stderr=subprocess.STDOUT, check=True)
    try:
        deadline = time.time() + 600
        while re.search(r"\b(Queued|Running)\b", status := sh(ws, "dvc", "queue", "status")) and \
                time.time() < deadline:
            time.sleep(2)
    finally:
        for pid_file in (ws / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.pid"):
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
    assert all(re.search(rf"{name}\s+.*Success", status) for name in sizes), status

    client = MlflowClient(f"sqlite:///{ws}/mlflow.db")
    exp = client.get_experiment_by_name("riformer-smoke")
    runs = {r.data.tags.get("dvc_experiment"): r
            for r in client.search_runs([exp.experiment_id], "tags.stage = 'train'")}
    assert set(runs) == set(sizes)
    for name, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.params["data.batch_size"] == str(sizes[name])
        assert "final/test_top1" in run.data.metrics
    a, b = runs.values()
    spans = [(r.info.start_time, r.info.end_time) for r in (a, b)]
    assert a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time, spans  # at the same time
    # each experiment's metrics come back through DVC's cache (results/ is not in git)
    shown = json.loads(sh(ws, "dvc", "exp", "show", "--no-pager", "--json"))
    metrics = {rev["name"]: rev["data"]["metrics"]["results/smoke/runs/deit/metrics.json"]["data"]
               for commit in shown for exp in commit.get("experiments") or [] for rev in exp["revs"]}
    assert {name: m["test_top1"] for name, m in metrics.items()} == {
        name: run.data.metrics["final/test_top1"] for name, run in runs.items()}
