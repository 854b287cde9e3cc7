"""Training under torchrun (issue 15): two CPU processes (gloo) train the run one process trains, at the same
global batch, with a logit teacher and module imitation's hooks on every rank; a SIGKILL'd DDP run resumes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

from pipeline.config import config_from_dict
from pipeline.train import train

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
# Two processes sum their halves of each batch's gradient in another order than one process, and each half's
# convolutions round differently: the histories agree to float32 rounding grown over 30 steps (measured: at most
# 2e-4 relative, on the smallest term, the soft-distillation loss of ~0.004; 1e-5 on the others).
# The loss terms: the same reordering of float sums, compounded over the steps (measured on two machines: worst
# 2e-4 and 1.4e-3, on the smallest term, soft KD ~0.004); a DDP replica that did not average its gradients, or saw
# other images, is off by percents.
LOSS_RTOL = 5e-3
# Accuracies are counts: the all-reduce sums the two ranks' gradients in another order than one process does, so the
# weights differ in the last bits and an image whose top two logits nearly tie can change class (measured: one of
# the 250 training images in an epoch, 0.4 points). At most two images' worth of the smaller split (200 test images).
ACC_ABS = 1.0

pytestmark = pytest.mark.slow


def _torchrun(config: Path, out: Path) -> list[str]:
    return [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "pipeline", "--", "train", "--config", str(config),
            "--out", str(out), "--threads", "2", "--no-progress", "--experiment", "test-ddp"]


def _process_tree(pid: int) -> list[int]:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [p for c in children for p in _process_tree(int(c))]


def _history(run: Path) -> list[dict]:
    return json.loads((run / "history.json").read_text())


@pytest.fixture(scope="module")
def runs(small_fashion_mnist, tmp_path_factory):
    """A KD + module-imitation student trained by one process and by two (torchrun), from the same teacher."""
    root = tmp_path_factory.mktemp("ddp")
    teacher = root / "teacher"
    train(tiny_config(small_fashion_mnist, name="teacher", seed=5), teacher, experiment="test-ddp", progress=False)
    config = tiny_config(small_fashion_mnist, name="student", model="riformer_nano", optim__epochs=3,
                         kd__type="soft", kd__teacher=str(teacher / "model.pt"), mi__teacher=str(teacher / "model.pt"),
                         mi__lambda_in=1.0, mi__lambda_out=1.0, mi__lambda_rel=1.0).to_dict()
    config_path = root / "student.yaml"
    config_path.write_text(yaml.safe_dump(config))
    single = root / "single"
    train(config_from_dict(config), single, experiment="test-ddp", progress=False)
    ddp = root / "ddp"
    out = subprocess.run(_torchrun(config_path, ddp), cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return {"config": config_path, "single": single, "ddp": ddp, "log": out.stdout}


def test_two_processes_train_what_one_process_trains(runs):
    single, ddp = _history(runs["single"]), _history(runs["ddp"])
    assert len(ddp) == len(single) == 3
    terms = [[k for k in row if k.startswith(("train/", "test/")) and k != "train/images_per_s"] for row in single]
    assert {"train/kd_soft", "train/mi_in", "train/mi_out", "train/mi_rel"} <= set(terms[0])  # both teachers, per rank
    worst = 0.0
    for epoch, (a, b) in enumerate(zip(single, ddp, strict=True)):
        assert set(b) == set(a)
        for k in terms[epoch]:
            if k.endswith(("top1", "top5")):  # counts of images: one image near a tie may flip (see ACC_ABS)
                assert b[k] == pytest.approx(a[k], abs=ACC_ABS), f"epoch {epoch + 1} {k}: {a[k]} vs {b[k]}"
                continue
            assert b[k] == pytest.approx(a[k], rel=LOSS_RTOL), f"epoch {epoch + 1} {k}: {a[k]} vs {b[k]}"
            worst = max(worst, abs(b[k] - a[k]) / abs(a[k])) if a[k] else worst
    print(f"DDP (2 processes) vs 1 process: worst relative difference of an epoch's loss or test metric {worst:.2e}")
    # rank 0 alone wrote the files and logged one line per epoch
    metrics = json.loads((runs["ddp"] / "metrics.json").read_text())
    assert metrics["test_top1"] == pytest.approx(json.loads((runs["single"] / "metrics.json").read_text())["test_top1"],
                                                 abs=1.0)
    assert runs["log"].count("[student] epoch 1/3") == 1
    weights = torch.load(runs["ddp"] / "model.pt", weights_only=True)["state_dict"]
    assert not any(k.startswith("module.") for k in weights)  # the model's own keys, not the DDP wrapper's


def test_a_sigkilled_ddp_run_resumes_to_the_uninterrupted_result(runs, tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(runs["config"], killed), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the run ended before it could be killed"
    tree = _process_tree(proc.pid)
    assert len(tree) >= 3  # torchrun and its two workers (which torchrun starts in sessions of their own)
    for pid in tree:  # all at once, like a lost node
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0
    out = subprocess.run(_torchrun(runs["config"], killed), cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming after epoch 1 of 3" in out.stdout
    assert [r["train/loss"] for r in _history(killed)] == [r["train/loss"] for r in _history(runs["ddp"])]
    assert (json.loads((killed / "metrics.json").read_text())["test_top1"]
            == json.loads((runs["ddp"] / "metrics.json").read_text())["test_top1"])


def test_train_nproc_makes_both_drivers_launch_torchrun(tmp_path):
    """`train.nproc: 2` in a profile: Snakemake's training jobs run under torchrun (one trained here, a teacher of
    the smoke profile, with the MLflow run tagged with its two processes) and dvc.yaml's stages say the same."""
    from test_pipeline import make_workspace, set_params, sh

    ws = make_workspace(tmp_path / "ws")
    set_params(ws, "params/smoke.yaml", lambda d: d["train"].update(nproc=2, threads=2))
    plan = sh(ws, "snakemake", "-n", "-p", "--cores", "2", "--config", "profile=smoke")
    launches = [line for line in plan.splitlines() if " train --profile smoke " in line]
    torchrun = "Shell command: torchrun --standalone --nproc_per_node 2 -m pipeline -- train "
    assert launches and all(line.startswith(torchrun) for line in launches)
    set_params(ws, "params.yaml", lambda d: d.update(profile="smoke"))
    sh(ws, "python", "-m", "pipeline", "dvc-yaml", "--profile", "smoke")
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    assert stages["train-teacher"]["do"]["cmd"][-1].startswith("torchrun --standalone --nproc_per_node 2 -m pipeline")
    assert all(s["cmd"][-1].startswith("torchrun") for k, s in stages.items() if k.startswith("train-students"))

    sh(ws, "snakemake", "--cores", "2", "results/smoke/runs/deit/model.pt", "--config", "profile=smoke")
    log = (ws / "logs/smoke/train/deit.log").read_text()
    assert log.count("[deit] epoch 1/1") == 1  # rank 0 alone prints
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{ws}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("riformer-smoke").experiment_id],
                             "tags.variant = 'deit'")[0]
    assert run.data.tags["processes"] == "2" and run.info.status == "FINISHED"
