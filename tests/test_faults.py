"""Faults and damaged inputs, one at a time (docs/faults.md): nothing silently wrong, no MLflow run left RUNNING,
every failure named. Each test injects its fault for real where it is cheap (damaged bytes, signals, a lock held by
another process) and through a stubbed write where it is not (a full disk)."""
import argparse
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config
from mlflow.tracking import MlflowClient
from PIL import Image
from test_data import make_imagefolder

import pipeline.train
from pipeline import io as pio
from pipeline import repo, tracking
from pipeline.data import DataError, build_loader, load_prepared
from pipeline.prepare import prepare
from pipeline.repo import hold_driver_lock
from pipeline.study import StudyError, load_study
from pipeline.train import _read_logits, _tensor_sha256, train

REPO = Path(__file__).resolve().parent.parent


def _copy_prepared(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ------------------------------------------------------------------------------------------- damaged inputs
def test_damaged_prepared_data_is_an_error_not_data(small_fashion_mnist, tmp_path):
    data = _copy_prepared(small_fashion_mnist, tmp_path / "data")
    raw = bytearray((data / "train.pt").read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 2000):  # inside the pixels: torch still loads the file
        raw[i] ^= 0xFF
    (data / "train.pt").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="does not match its recorded hash .* damaged since it was prepared"):
        build_loader(load_prepared(data), "train", 50, 32, train=True)
    with pytest.raises(DataError, match="does not match its recorded hash"):  # training reads it the same way
        train(tiny_config(data, name="damaged"), tmp_path / "run", experiment="test-faults", progress=False)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_changed_image_folder_index_is_an_error(tmp_path):
    prepare("imagefolder", tmp_path / "out", root=str(make_imagefolder(tmp_path / "imgs")))
    index = tmp_path / "out" / "index.json"
    index.write_text(index.read_text().replace('"train/cat/1.jpg", 0', '"train/cat/1.jpg", 1'))
    with pytest.raises(DataError, match="index.json: does not match its recorded hash"):
        build_loader(load_prepared(tmp_path / "out"), "train", 2, 32, train=True)


def test_a_16_bit_image_is_refused_naming_the_file(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    ramp = np.linspace(0, 65535, 40 * 36).astype(np.uint16).reshape(36, 40)
    Image.fromarray(ramp).save(root / "train" / "cat" / "9.png")
    assert Image.open(root / "train" / "cat" / "9.png").mode.startswith("I")
    with pytest.raises(DataError, match=r"train/cat/9.png: image mode I.*would clip"):
        prepare("imagefolder", tmp_path / "out", root=str(root))
    # a folder prepared without the check still refuses it when the image is decoded
    prepare("imagefolder", tmp_path / "out", root=str(root), check_images=False)
    loader = build_loader(load_prepared(tmp_path / "out"), "train", 7, 32, train=False, decoded_cache_mb=0)
    with pytest.raises(DataError, match=r"9.png: image mode I"):
        list(loader)


def test_damaged_cached_teacher_outputs_are_recomputed(tmp_path, capsys):
    key = {"teacher": "t", "seed": 0}
    logits = torch.randn(4, 2, 10)
    path = tmp_path / "cache.pt"
    torch.save({"key": key, "logits": logits, "sha256": _tensor_sha256(logits)}, path)
    assert torch.equal(_read_logits(path, key, (4, 2), "run"), logits)
    damaged = logits.clone()
    damaged.view(-1)[17] = torch.nextafter(damaged.view(-1)[17], torch.tensor(float("inf")))  # one low bit
    torch.save({"key": key, "logits": damaged, "sha256": _tensor_sha256(logits)}, path)
    assert _read_logits(path, key, (4, 2), "run") is None
    out = capsys.readouterr().out
    assert "cached teacher outputs" in out and "do not match the sha256 stored with them; recomputing" in out
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert _read_logits(path, key, (4, 2), "run") is None


def test_a_damaged_teacher_checkpoint_is_named(small_fashion_mnist, tmp_path):
    teacher = tmp_path / "teacher"
    train(tiny_config(small_fashion_mnist, name="teacher"), teacher, experiment="test-faults", progress=False)
    raw = bytearray((teacher / "model.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (teacher / "model.pt").write_bytes(bytes(raw))
    student = tiny_config(small_fashion_mnist, name="student", model="riformer_nano", kd__type="soft",
                          kd__teacher=str(teacher / "model.pt"))
    with pytest.raises(ValueError, match="do not match the sha256 its training recorded"):
        train(student, tmp_path / "student", experiment="test-faults", progress=False)


# --------------------------------------------------------------------------------------------- run status
def _runs(mlflow_store, experiment):
    client = MlflowClient(mlflow_store)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_a_failure_after_the_last_epoch_is_failed_and_the_next_run_is_clean(small_fashion_mnist, tmp_path,
                                                                            mlflow_store, monkeypatch):
    real = pio.save_checkpoint

    def disk_full_for_model_pt(path, obj):
        if Path(path).name == "model.pt":
            with pio.atomic_path(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, obj)

    monkeypatch.setattr(pipeline.train, "save_checkpoint", disk_full_for_model_pt)
    with pytest.raises(pio.WriteError) as e:
        train(tiny_config(small_fashion_mnist, name="full-disk"), tmp_path / "a", experiment="test-status",
              progress=False)
    assert str(e.value).splitlines()[0] == f"[Errno 28] cannot write {tmp_path / 'a' / 'model.pt'}: No space " \
                                           f"left on device"
    assert (tmp_path / "a" / "checkpoint.pt").is_file() and not (tmp_path / "a" / "metrics.json").exists()
    monkeypatch.setattr(pipeline.train, "save_checkpoint", real)
    # the next run of the same process (a multi-run job) trains and finishes as if alone
    metrics = train(tiny_config(small_fashion_mnist, name="next"), tmp_path / "b", experiment="test-status",
                    progress=False)
    status = {r.info.run_name: (r.info.status, r.data.tags.get("error", "")) for r in _runs(mlflow_store,
                                                                                            "test-status")}
    assert status["full-disk"][0] == "FAILED" and "No space left on device" in status["full-disk"][1]
    assert status["next"] == ("FINISHED", "") and metrics["test_top1"] > 0


def test_a_write_error_names_the_path_and_the_cause(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(pio.WriteError, match=f"cannot write {tmp_path / 'file' / 'out.json'}: "):
        pio.write_json(tmp_path / "file" / "out.json", {})  # a file where a folder should be
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(pio.WriteError, match=f"cannot write {tmp_path / 'r.json'}: Read-only file system"):
        pio.write_json(tmp_path / "r.json", {})
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]  # no temporary file left behind


def _config_file(data, tmp_path, name, epochs=3):
    cfg = tiny_config(data, name=name, optim__epochs=epochs, data__batch_size=25).to_dict()
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(config_path, out, experiment):
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--config", str(config_path), "--out",
                             str(out), "--no-progress", "--experiment", experiment], cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped"


def test_sigterm_records_killed_and_the_rerun_resumes_the_same_mlflow_run(small_fashion_mnist, tmp_path,
                                                                         mlflow_store):
    config = _config_file(small_fashion_mnist, tmp_path, "preempted")
    proc = _start(config, tmp_path / "run", "test-sigterm")
    _wait_for(tmp_path / "run" / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGTERM)  # a plain kill, Slurm's preemption
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped (SIGTERM)" in out and "the same command resumes it" in out
    (run,) = _runs(mlflow_store, "test-sigterm")
    assert run.info.status == "KILLED" and "Terminated" in run.data.tags["error"]
    again = _start(config, tmp_path / "run", "test-sigterm")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "resuming after epoch" in out, out
    (run,) = _runs(mlflow_store, "test-sigterm")  # the same MLflow run, now finished
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert run.data.tags["resumed"].startswith("after KILLED")


def test_sigkill_leaves_running_and_the_next_invocation_closes_it(small_fashion_mnist, tmp_path, mlflow_store):
    config = tiny_config(small_fashion_mnist, name="vanished", optim__epochs=2, data__batch_size=5).to_dict()
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    proc = _start(tmp_path / "cfg.yaml", tmp_path / "run", "test-sigkill")
    client = MlflowClient(mlflow_store)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # killed once its MLflow run exists
        exp = client.get_experiment_by_name("test-sigkill")
        if exp and client.search_runs([exp.experiment_id]):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (orphan,) = _runs(mlflow_store, "test-sigkill")
    assert orphan.info.status == "RUNNING"
    resumable = (tmp_path / "run" / "checkpoint.pt").exists()  # killed after its first epoch (a slow machine)
    again = _start(tmp_path / "cfg.yaml", tmp_path / "run", "test-sigkill")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "left RUNNING by a vanished process" in out, out
    runs = {r.info.run_id: r for r in _runs(mlflow_store, "test-sigkill")}
    if resumable:  # the same MLflow run, closed, then reopened by the resumed run
        assert runs[orphan.info.run_id].info.status == "FINISHED"
        assert runs[orphan.info.run_id].data.tags["resumed"] == f"after FAILED ({tracking.VANISHED})"
    else:  # closed FAILED; the rerun is a new MLflow run
        assert runs[orphan.info.run_id].info.status == "FAILED"
        assert runs[orphan.info.run_id].data.tags["error"] == tracking.VANISHED
        assert sorted(r.info.status for r in runs.values()) == ["FAILED", "FINISHED"]


def test_a_vanished_stage_run_is_closed_by_the_next_one(tmp_path, monkeypatch, mlflow_store):
    monkeypatch.chdir(tmp_path)
    mlflow = tracking.setup(tracking.experiment_name("faults"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(tracking.experiment_name("faults"))
    orphan = client.create_run(exp.experiment_id, run_name="evaluate:all",
                               tags={"host": socket.gethostname(), "pid": str(dead.pid)})
    alive = client.create_run(exp.experiment_id, run_name="evaluate:all",  # another live process's run
                              tags={"host": socket.gethostname(), "pid": str(os.getpid())})
    with pytest.raises(KeyboardInterrupt), tracking.stage_run("faults", "evaluate", "all") as (_, run):
        raise KeyboardInterrupt
    assert client.get_run(orphan.info.run_id).info.status == "FAILED"
    assert client.get_run(orphan.info.run_id).data.tags["error"] == tracking.VANISHED
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    client.set_terminated(alive.info.run_id)


# ------------------------------------------------------------------------------------ half-written results
def test_report_refuses_an_incomplete_evaluation_and_is_all_or_nothing(tmp_path, monkeypatch):
    from test_report import fake_results, paper_like

    import pipeline.report
    from pipeline.publish import publish

    monkeypatch.chdir(tmp_path)
    study = load_study("smoke", check_data=False)
    fake_results(study, paper_like())  # one run (identity-label-hard) has no evaluation
    args = argparse.Namespace(profile="smoke", out=None, allow_missing=False)
    with pytest.raises(SystemExit, match="evaluation is incomplete: 1 of .* runs .*identity-label-hard.*"
                                         "--allow-missing"):
        pipeline.report.run(args)
    args.allow_missing = True
    pipeline.report.run(args)
    before = {p: p.read_bytes() for p in study.report_dir.rglob("*") if p.is_file()}

    def killed_half_way(study, out, *args, **kwargs):  # the report stage dies while writing its tables
        (out / "tables").mkdir()
        (out / "tables" / "T1.md").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.report, "write_report", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        pipeline.report.run(args)
    after = {p: p.read_bytes() for p in study.report_dir.rglob("*") if p.is_file()}
    assert after == before  # the previous report, whole
    assert [p.name for p in study.report_dir.parent.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(SystemExit, match="written without 1 runs' evaluations"):  # made with --allow-missing
        publish("smoke")
    (study.report_dir / "figures" / ".F1.png.123.tmp").write_bytes(b"")  # a folder `report` did not finish
    with pytest.raises(SystemExit, match="not a whole report"):
        publish("smoke", allow_missing=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds files but no report"):  # --out never replaces other files
        pipeline.report.run(argparse.Namespace(profile="smoke", out=str(tmp_path / "mine"), allow_missing=True))


# ---------------------------------------------------------------------------------------------- weak errors
def test_every_problem_of_a_profile_in_one_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = {"seeds": "zero",  # a type error (schema)
                 "runs": {"affine-label-soft": {"kd": {"teacher": "gfnett"}},  # an unknown teacher
                          "affine-label-nokd": {"optm": {"lr": 1.0}}}}  # an unknown key
    with pytest.raises(StudyError) as e:
        load_study("smoke", check_data=False, overrides=overrides)
    message = str(e.value)
    assert "seeds: 'zero' is not of type 'array'" in message
    assert "kd.teacher 'gfnett' names no run of the study" in message
    assert "optm" in message
    overrides["seeds"] = [0]
    with pytest.raises(StudyError) as e:  # without the schema error, the same two others
        load_study("smoke", check_data=False, overrides=overrides)
    assert "gfnett" in str(e.value) and "optm" in str(e.value)


def test_an_unreachable_tracking_server_fails_within_seconds(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    with pytest.raises(tracking.TrackingUnavailable, match=f"http://127.0.0.1:{port} does not answer"):
        tracking.setup("test-unreachable")
    assert time.perf_counter() - t0 < 10


def test_one_driver_at_a_time(tmp_path):
    """DVC's repository lock held by `dvc repro` stops Snakemake at once; held (shared) by Snakemake, it stops DVC
    before it deletes anything (DVC's own lock class is what `dvc repro` takes)."""
    from dvc.lock import Lock, LockError

    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    dvc = Lock(str(tmp_path / ".dvc" / "tmp" / "lock"))
    dvc._do_lock()  # a running `dvc repro`
    with pytest.raises(SystemExit, match=r"`dvc repro` .* is running in .*wait for it to end"):
        hold_driver_lock("snakemake", tmp_path)
    dvc.unlock()
    # DVC lets go of that lock while a stage's command runs; its stage lock file names the live process
    rwlock = tmp_path / ".dvc" / "tmp" / "rwlock"
    rwlock.write_text(json.dumps({"write": {"results/smoke/data": {"pid": os.getpid(), "cmd": "dvc repro"}}}))
    with pytest.raises(SystemExit, match=f"running in .*pid {os.getpid()}: dvc repro"):
        hold_driver_lock("snakemake", tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rwlock.write_text(json.dumps({"write": {"results/smoke/data": {"pid": dead.pid, "cmd": "dvc repro"}}}))
    hold_driver_lock("snakemake", tmp_path)  # a stage lock left by a DVC that is gone does not count
    repo._DRIVER_LOCKS.pop().close()
    snakemake = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                                  "from pipeline.repo import hold_driver_lock; from pathlib import Path; "
                                  "hold_driver_lock('snakemake', Path(sys.argv[2])); print('held', flush=True); "
                                  "time.sleep(60)", str(REPO), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert snakemake.stdout.readline().strip() == "held"
        with pytest.raises(LockError):
            Lock(str(tmp_path / ".dvc" / "tmp" / "lock"))._do_lock()
        hold_driver_lock("snakemake", tmp_path)  # a second Snakemake (another profile) may share it
        repo._DRIVER_LOCKS.pop().close()
    finally:
        snakemake.kill()
        snakemake.wait()
    with open(tmp_path / ".dvc" / "tmp" / "lock") as f:  # released with the process
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
