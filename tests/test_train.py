"""The training engine: learning, reproducibility, resume after SIGKILL, MLflow, teachers, partial loading."""
import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import tiny_config
from mlflow.tracking import MlflowClient

import pipeline.models  # noqa: F401
import pipeline.train
from pipeline.io import save_checkpoint
from pipeline.train import NonFiniteLossError, init_from_file, partial_load, train

REPO = Path(__file__).resolve().parent.parent


def test_short_run_learns_and_logs_to_mlflow(small_fashion_mnist, tmp_path, mlflow_store):
    cfg = tiny_config(small_fashion_mnist, name="learns", tables=["T1"], optim__epochs=3, optim__lr=2e-3)
    metrics = train(cfg, tmp_path / "run", experiment="test-train", progress=False)
    assert metrics["test_top1"] > 40.0  # chance is 10%
    # checkpoints load with weights_only=True
    for f in ("checkpoint.pt", "model.pt"):
        torch.load(tmp_path / "run" / f, weights_only=True)
    run = MlflowClient(mlflow_store).get_run(metrics["run_id"])
    assert run.info.status == "FINISHED"
    for tag in ("table", "variant", "seed", "role", "git_commit", "git_dirty", "data_hash", "torch", "timm", "device"):
        assert tag in run.data.tags, tag
    assert run.data.tags["table"] == "T1" and run.data.tags["variant"] == "learns" and run.data.tags["seed"] == "0"
    history = MlflowClient(mlflow_store).get_metric_history(metrics["run_id"], "test/top1")
    assert [m.step for m in history] == [1, 2, 3]
    for key in ("train/ce", "lr", "train/top1", "test/top5", "epoch_time_s", "train/images_per_s"):
        assert key in run.data.metrics, key
    assert run.data.params["optim.epochs"] == "3"
    assert run.inputs.dataset_inputs[0].dataset.digest == metrics["data_hash"][:32]
    artifacts = {a.path for a in MlflowClient(mlflow_store).list_artifacts(metrics["run_id"])}
    assert {"config.yaml", "metrics.json"} <= artifacts


def test_same_seed_same_metrics(small_fashion_mnist, tmp_path):
    cfg = tiny_config(small_fashion_mnist, name="seeded", model_kwargs={"drop_path_rate": 0.1})
    a = train(cfg, tmp_path / "a", experiment="test-train", progress=False)
    b = train(cfg, tmp_path / "b", experiment="test-train", progress=False)
    assert a["test_top1"] == b["test_top1"]
    ha = json.loads((tmp_path / "a" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    assert ha[0]["train/loss"] == hb[0]["train/loss"]


def _train_cmd(config_path, out):
    return [sys.executable, "-m", "pipeline", "train", "--config", str(config_path), "--out", str(out),
            "--no-progress", "--experiment", "test-resume"]


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(small_fashion_mnist, tmp_path):
    config = tiny_config(small_fashion_mnist, name="resume", optim__epochs=3, model_kwargs={"drop_path_rate": 0.1},
                         data__batch_size=25).to_dict()
    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_train_cmd(config_path, tmp_path / "full"), check=True, env=env, cwd=REPO,
                   capture_output=True)
    # the same command, killed with SIGKILL in the middle of epoch 2
    proc = subprocess.Popen(_train_cmd(config_path, tmp_path / "killed"), env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0  # only epoch 1 had finished
    resumed = subprocess.run(_train_cmd(config_path, tmp_path / "killed"), check=True, env=env, cwd=REPO,
                             capture_output=True, text=True)
    assert "resuming after epoch 1 of 3" in resumed.stdout
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    again = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert again["test_top1"] == full["test_top1"] and again["test_top5"] == full["test_top5"]
    h_full = json.loads((tmp_path / "full" / "history.json").read_text())
    h_again = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert [r["train/loss"] for r in h_again] == [r["train/loss"] for r in h_full]


def test_a_run_trained_after_others_in_one_process_is_the_run_trained_alone(small_fashion_mnist, tmp_path):
    """A training job of several runs (study.train_batches) trains each one as a process of its own would, bit for
    bit: nothing of an earlier run (RNG, threads, hooks, caches) leaks into the next."""
    cfg = tiny_config(small_fashion_mnist, name="alone", model_kwargs={"drop_path_rate": 0.1}, data__batch_size=25)
    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict()))
    subprocess.run(_train_cmd(config_path, tmp_path / "alone"), check=True, cwd=REPO, capture_output=True)
    teacher = tmp_path / "teacher"
    train(tiny_config(small_fashion_mnist, name="teacher", seed=5), teacher, experiment="test-batch", progress=False)
    train(tiny_config(small_fashion_mnist, name="student", model="riformer_nano", seed=7, kd__type="soft",
                      kd__teacher=str(teacher / "model.pt"), mi__teacher=str(teacher / "model.pt"),
                      mi__lambda_out=1.0), tmp_path / "student", experiment="test-batch", progress=False)
    train(cfg, tmp_path / "after", experiment="test-batch", progress=False)
    alone = torch.load(tmp_path / "alone" / "model.pt", weights_only=True)["state_dict"]
    after = torch.load(tmp_path / "after" / "model.pt", weights_only=True)["state_dict"]
    assert alone.keys() == after.keys() and all(torch.equal(alone[k], after[k]) for k in alone)
    h_alone, h_after = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("alone", "after"))
    assert [r["train/loss"] for r in h_after] == [r["train/loss"] for r in h_alone]


def test_a_failed_run_of_a_job_does_not_stop_the_others(monkeypatch, capsys):
    calls = []

    def fake_train(cfg, out, **kwargs):
        calls.append(cfg.name)
        if cfg.name == "identity-ce":
            raise ValueError("bad things")
        return {"test_top1": 50.0, "test_top5": 90.0}

    monkeypatch.setattr(pipeline.train, "train", fake_train)
    args = argparse.Namespace(profile="smoke", run=["pooling-ce", "identity-ce", "affine-label-nokd"], set=[],
                              threads=1, config=None, out=None, experiment=None, no_progress=True, no_cache=False)
    with pytest.raises(SystemExit, match=r"1 of 3 runs failed: identity-ce \(ValueError: bad things\)"):
        pipeline.train.run(args)
    assert calls == args.run  # the run after the failed one was trained too
    assert "[affine-label-nokd] done" in capsys.readouterr().out


def test_non_finite_loss_fails_the_run(small_fashion_mnist, tmp_path, mlflow_store, monkeypatch):
    from pipeline import losses

    def nan_loss(self, outputs, targets, teacher_logits=None):
        return {"ce": outputs.sum() * float("nan")}

    monkeypatch.setattr(losses.DistillationLoss, "forward", nan_loss)
    cfg = tiny_config(small_fashion_mnist, name="diverges")
    with pytest.raises(NonFiniteLossError,
                       match=r"non-finite loss at epoch 1, in steps 1-\d+ \(sums of the terms: loss=nan, ce=nan\)"):
        train(cfg, tmp_path / "run", experiment="test-nan", progress=False)
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("test-nan")
    runs = client.search_runs([exp.experiment_id])
    assert runs[0].info.status == "FAILED" and "non-finite" in runs[0].data.tags["error"]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_fine_tune_from_a_local_file_gets_a_new_head(tmp_path):
    pretrained = timm.create_model("poolformer_nano", num_classes=1000, in_chans=1)
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pth")  # a plain state dict, as timm ships
    model = timm.create_model("poolformer_nano", num_classes=10, in_chans=1)
    log = init_from_file(model, str(tmp_path / "pretrained.pth"))
    assert log["head_reset"] and model.head.fc.weight.shape == (10, 128)
    for k, v in model.state_dict().items():
        if not k.startswith("head.fc"):
            torch.testing.assert_close(v, pretrained.state_dict()[k])
    # a pipeline checkpoint of the same class count keeps its head
    teacher = timm.create_model("poolformer_nano", num_classes=10, in_chans=1)
    save_checkpoint(tmp_path / "teacher.pt", {"model": "poolformer_nano", "state_dict": teacher.state_dict(),
                                              "model_kwargs": {"num_classes": 10, "in_chans": 1}})
    student = timm.create_model("poolformer_nano", num_classes=10, in_chans=1)
    assert not init_from_file(student, str(tmp_path / "teacher.pt"))["head_reset"]
    torch.testing.assert_close(student.head.fc.weight, teacher.head.fc.weight)


def test_partial_loading_copies_every_key_but_the_affine():
    teacher = timm.create_model("poolformer_nano", num_classes=10, in_chans=1)
    student = timm.create_model("riformer_nano", num_classes=10, in_chans=1)
    log = partial_load(student, teacher.state_dict())
    assert log["skipped"] and all(".token_mixer.affine." in k for k in log["skipped"])
    assert set(log["loaded"]) == set(teacher.state_dict()) and not log["unused"]
    for k in log["loaded"]:
        torch.testing.assert_close(student.state_dict()[k], teacher.state_dict()[k])
    wide = timm.create_model("poolformer_nano", num_classes=10, in_chans=1, dims=(24, 48, 96, 192))
    with pytest.raises(ValueError, match="shape mismatch"):
        partial_load(student, wide.state_dict())


def test_student_with_two_teachers_and_every_term(small_fashion_mnist, tmp_path, monkeypatch):
    """Soft KD without labels from a GFNet, module imitation of a PoolFormer, partial init (the final recipe)."""
    for name, model in (("gfnet", "gfnet_nano"), ("pool", "poolformer_nano")):
        cfg = tiny_config(small_fashion_mnist, name=name, role="teacher", model=model, data__train_limit=100)
        train(cfg, tmp_path / name, experiment="test-train", progress=False)
    cfg = tiny_config(small_fashion_mnist, name="final", model="riformer_nano", optim__epochs=2,
                      partial_init=str(tmp_path / "pool" / "model.pt"),
                      kd={"type": "soft", "labels": False, "teacher": str(tmp_path / "gfnet" / "model.pt")},
                      mi={"teacher": str(tmp_path / "pool" / "model.pt"), "lambda_in": 1e-4, "lambda_out": 1e-3,
                          "lambda_rel": 1.0, "feat_frac": 0.5, "rel_frac": 0.25})
    mi_calls = []
    load_teacher = pipeline.train.load_teacher

    def counting(path, device, prepared, role, *fmt):  # counts the imitation teacher's forward passes
        model = load_teacher(path, device, prepared, role, *fmt)
        if role == "mi.teacher":
            model.register_forward_pre_hook(lambda *_: mi_calls.append(1))
        return model

    monkeypatch.setattr(pipeline.train, "load_teacher", counting)
    train(cfg, tmp_path / "final", experiment="test-train", progress=False)
    history = json.loads((tmp_path / "final" / "history.json").read_text())
    first, second = history
    assert "train/ce" not in first  # without labels
    for term in ("train/kd_soft", "train/mi_in", "train/mi_out", "train/mi_rel"):
        assert first[term] > 0, term
    assert "train/mi_rel" not in second and "train/mi_in" not in second  # windows closed in epoch 2
    steps = 2 * (500 // 50)  # 2 epochs of the 500-image fixture in batches of 50
    assert len(mi_calls) == round(0.5 * steps)  # the imitation teacher stops when its windows close
    # ... which changes nothing else: its forward pass (eval mode) reads no random number
    teacher = load_teacher(str(tmp_path / "pool" / "model.pt"), torch.device("cpu"),
                           pipeline.train.load_prepared(small_fashion_mnist), "mi.teacher")
    x = torch.randn(4, 1, 32, 32)
    state = torch.get_rng_state()
    teacher(x)
    assert torch.equal(state, torch.get_rng_state())

    # The KD teacher's outputs shared through the cache: the first run computes them, the second reads them;
    # both train exactly as the run that ran the teacher in every step.
    def same(run):
        h = json.loads((tmp_path / run / "history.json").read_text())
        timing = ("epoch_time_s", "train/images_per_s")
        assert [{k: v for k, v in r.items() if k not in timing} for r in h] == \
               [{k: v for k, v in r.items() if k not in timing} for r in history]
        a, b = (torch.load(tmp_path / r / "model.pt", weights_only=False)["state_dict"] for r in (run, "final"))
        assert all(torch.equal(a[k], b[k]) for k in b)

    for run in ("cached-first", "cached-second"):
        train(cfg, tmp_path / run, experiment="test-train", progress=False, cache_dir=tmp_path / "cache")
        same(run)
    (cached,) = (tmp_path / "cache" / "teacher-logits").glob("*.pt")
    logits = torch.load(cached, weights_only=True)["logits"]
    assert logits.shape == (steps, 50, 10)
    # the cache is what the teacher says about the run's batches: other outputs stored with their own checksum (a
    # deliberate change, not damage) change the run, so the cache is really read
    other = torch.zeros_like(logits)
    torch.save({"key": torch.load(cached, weights_only=True)["key"], "logits": other,
                "sha256": pipeline.train._tensor_sha256(other)}, cached)
    train(cfg, tmp_path / "poisoned", experiment="test-train", progress=False, cache_dir=tmp_path / "cache")
    h = json.loads((tmp_path / "poisoned" / "history.json").read_text())
    assert h[0]["train/kd_soft"] != history[0]["train/kd_soft"]

    # mi.weights balanced: each imitation term equals the soft-KD term at the first step (so their first-epoch means
    # are close), the factors are recorded, and a run stopped after epoch 1 resumes with them (not rebalanced)
    bal = dataclasses.replace(cfg, name="balanced", mi=dataclasses.replace(cfg.mi, weights="balanced", feat_frac=1.0,
                                                                          rel_frac=1.0))
    metrics = train(bal, tmp_path / "balanced", experiment="test-train", progress=False)
    h = json.loads((tmp_path / "balanced" / "history.json").read_text())
    for term in ("train/mi_in", "train/mi_out", "train/mi_rel"):
        assert 0.3 < h[0][term] / h[0]["train/kd_soft"] < 3, (term, h[0])
    assert metrics["mi_lambdas"]["mi_in"] != cfg.mi.lambda_in
    stop = pipeline.train.print_epoch

    def stop_after_first(*args):
        stop(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.train, "print_epoch", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        train(bal, tmp_path / "balanced-resumed", experiment="test-train", progress=False)
    monkeypatch.setattr(pipeline.train, "print_epoch", stop)
    again = train(bal, tmp_path / "balanced-resumed", experiment="test-train", progress=False)
    h2 = json.loads((tmp_path / "balanced-resumed" / "history.json").read_text())
    assert again["mi_lambdas"] == metrics["mi_lambdas"] and h2[1]["train/mi_in"] == h[1]["train/mi_in"]


def _train_logged(cfg, out, capsys):
    metrics = train(cfg, out, experiment="test-identity", progress=False)
    return metrics, capsys.readouterr().out


def test_a_changed_input_restarts_the_run_instead_of_resuming(tmp_path, capsys):
    """Issue 11: re-prepared data at the same path, a retrained teacher, or a changed config each start the run
    over and say which input changed; the same inputs resume (here: a finished run, nothing left to train)."""
    from pipeline.prepare import prepare

    data = tmp_path / "data"
    prepare("fashion-mnist", data, train_subset=200, test_subset=100)
    teacher = tiny_config(data, name="teacher", role="teacher", model="poolformer_nano", data__batch_size=40)
    student = tiny_config(data, name="student", model="riformer_nano", data__batch_size=40,
                          kd={"type": "soft", "teacher": str(tmp_path / "teacher" / "model.pt")})
    _train_logged(teacher, tmp_path / "teacher", capsys)
    first, _ = _train_logged(student, tmp_path / "student", capsys)
    again, out = _train_logged(student, tmp_path / "student", capsys)
    assert "resuming after epoch 1 of 1" in out and again["test_top1"] == first["test_top1"]

    # the teacher is retrained (another learning rate): its file changes, so its student starts over
    _train_logged(tiny_config(data, name="teacher", role="teacher", model="poolformer_nano", data__batch_size=40,
                              optim__lr=5e-4), tmp_path / "teacher", capsys)
    _, out = _train_logged(student, tmp_path / "student", capsys)
    assert "not resuming" in out and "kd.teacher file" in out and "resuming after" not in out

    # the data is prepared again at the same path with more images: the run starts over on the new data
    prepare("fashion-mnist", data, train_subset=400, test_subset=300)
    plain = tiny_config(data, name="plain", data__batch_size=40)
    _train_logged(plain, tmp_path / "plain", capsys)  # trained on the new data
    prepare("fashion-mnist", data, train_subset=200, test_subset=100)
    metrics, out = _train_logged(plain, tmp_path / "plain", capsys)
    assert "not resuming" in out and "prepared data" in out and "resuming after" not in out
    saved = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    assert saved["identity"]["data"] == metrics["data_hash"][:16] == json.loads(
        (data / "meta.json").read_text())["data_hash"][:16]
    assert "run_id" not in saved  # a model's bytes depend on its weights, not on the MLflow store


def test_other_classes_or_channels_at_the_same_path_restart_or_fail_clearly(tmp_path, capsys):
    from PIL import Image

    from pipeline.prepare import prepare

    data = tmp_path / "data"
    prepare("fashion-mnist", data, train_subset=100, test_subset=50)  # 10 classes, 1 channel
    teacher = tiny_config(data, name="teacher", role="teacher", model="poolformer_nano", data__batch_size=25)
    _train_logged(teacher, tmp_path / "teacher", capsys)
    _train_logged(tiny_config(data, name="run", data__batch_size=25), tmp_path / "run", capsys)
    folder = tmp_path / "folder"  # the same path now holds a 2-class RGB image folder
    for split in ("train", "val"):
        for c, color in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            (folder / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), color).save(folder / split / c / f"{i}.png")
    prepare("imagefolder", data, root=str(folder))
    _, out = _train_logged(tiny_config(data, name="run", data__batch_size=4), tmp_path / "run", capsys)
    assert "not resuming" in out and "prepared data" in out  # a fresh model of the new shape, no size mismatch
    student = tiny_config(data, name="student", data__batch_size=4,
                          kd={"type": "soft", "teacher": str(tmp_path / "teacher" / "model.pt")})
    with pytest.raises(ValueError, match="trained with num_classes=10, but the prepared data .* has num_classes=2"):
        train(student, tmp_path / "student", experiment="test-identity", progress=False)


@pytest.mark.parametrize("decay", [True, False])
def test_affine_weight_decay_policy(decay):
    """optim.affine_weight_decay: the affine's scale is decayed like a conv weight (timm's and mmpretrain's rule) or
    exempted like a norm; biases and norms are never decayed."""
    import timm

    from pipeline.config import OptimCfg
    from pipeline.train import optimizer_params

    model = timm.create_model("riformer_nano")
    params = optimizer_params(model, OptimCfg(weight_decay=0.05, affine_weight_decay=decay))
    groups = params if isinstance(params, list) else timm.optim.param_groups_weight_decay(model, 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    named = dict(model.named_parameters())
    affine = [n for n in named if n.endswith("token_mixer.affine.weight")]
    assert len(affine) == 12 and all((id(named[n]) in decayed) == decay for n in affine)
    assert id(named["stages.0.blocks.0.mlp.fc1.weight"]) in decayed
    assert id(named["stages.0.blocks.0.norm1.weight"]) not in decayed


@pytest.mark.parametrize("name,kwargs", [("riformer_nano", {"token_mixer": "pooling"}), ("riformer_nano", {}),
                                         ("gfnet_nano", {"img_size": 32}), ("lightvit_nano", {})])
def test_channels_last_changes_only_rounding(name, kwargs):
    """Training and evaluation run the models in NHWC memory format (faster on CPU too): the same function, the
    outputs and gradients within float32 rounding of the default format's."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, in_chans=1, **kwargs).eval()
    x = torch.randn(8, 1, 32, 32)
    ref = model(x)
    ref.logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last))
    out.logsumexp(-1).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-5, msg=n)


def test_fused_adamw_is_the_same_update_as_the_plain_loop(small_fashion_mnist):
    """`optim.fused` (torch's fused AdamW kernel, the training default) against the per-parameter loop AdamW ran
    before it: 20 steps of riformer_nano on real batches end within float32 rounding of each other, and classify
    the test images the same way."""
    from pipeline.data import build_loader, load_prepared
    from pipeline.train import build_optimizer

    prepared = load_prepared(small_fashion_mnist)
    batches = list(build_loader(prepared, "train", 25, 32, train=True))[:20]
    images = build_loader(prepared, "test", 200, 32, train=False)
    models = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = timm.create_model("riformer_nano", num_classes=10, in_chans=1).train()
        cfg = tiny_config(small_fashion_mnist, name="fused", optim__fused=fused, optim__lr=2e-3)
        optimizer, _ = build_optimizer(cfg, model, len(batches))
        assert optimizer.defaults["fused"] is fused
        for x, y in batches:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        models[fused] = model.eval()
    for (n, a), b in zip(models[True].named_parameters(), models[False].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    with torch.no_grad():
        preds = {f: torch.cat([m(x).argmax(1) for x, _ in images]) for f, m in models.items()}
    assert (preds[True] != preds[False]).sum() == 0


def test_evaluation_on_one_thread_predicts_what_two_threads_do(small_fashion_mnist):
    """The evaluate jobs run on one thread each, beside the training jobs (before: one job on two threads): every
    test prediction is the same."""
    from pipeline.data import build_loader, load_prepared
    from pipeline.measure import evaluate

    torch.manual_seed(0)
    model = timm.create_model("riformer_nano", num_classes=10, in_chans=1, token_mixer="pooling").eval()
    model = model.to(memory_format=torch.channels_last)
    loader = build_loader(load_prepared(small_fashion_mnist), "test", 256, 32, train=False)
    threads, out = torch.get_num_threads(), {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out[n] = evaluate(model, loader, torch.device("cpu"), fmt=torch.channels_last)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[1]["pred"], out[2]["pred"]) and out[1]["top1"] == out[2]["top1"]
