"""`python -m pipeline train`: one training loop for teachers and every student variant.

AdamW + warm-up/cosine (timm's factories), label smoothing, drop path, timm's Mixup/CutMix when the
recipe asks for them, DeiT-style logit distillation and RIFormer's module imitation (pipeline.losses).

Crash safety: a checkpoint is written atomically after every epoch. Started again with the same config,
a run resumes from it; every RNG is re-seeded from (seed, epoch) at the start of each epoch, so a resumed
run ends with the same metrics as an uninterrupted one. A checkpoint from a different config is not
resumed. The final files are written last: model.pt, history.json, then metrics.json.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
import yaml
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import accuracy
from tqdm import tqdm

from pipeline import tracking
from pipeline.config import TrainConfig, apply_overrides, config_from_dict
from pipeline.data import Prepared, build_loader, load_prepared
from pipeline.io import load_checkpoint, model_from_checkpoint, save_checkpoint, write_json
from pipeline.losses import DistillationLoss, ModuleImitation, UsageLoss, default_blocks


class NonFiniteLossError(FloatingPointError):
    pass


# ------------------------------------------------------------------------------------------------ set-up
def seed_everything(seed: int) -> None:
    """The one seeding helper: python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.benchmark = not on


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def model_kwargs(cfg: TrainConfig, prepared: Prepared) -> dict:
    kwargs = {"num_classes": prepared.meta["num_classes"], "in_chans": prepared.meta["in_chans"],
              **cfg.model_kwargs}
    if cfg.model.startswith("gfnet"):
        kwargs.setdefault("img_size", cfg.data.img_size)
    return kwargs


def init_from_file(model: nn.Module, path: str) -> dict:
    """Fine-tune init from a local file: a pipeline checkpoint or any timm/state-dict file (e.g. timm's
    pretrained weights the user has). timm's loader remaps keys, adapts the input conv to in_chans and
    drops the classifier when the class counts differ, so the model keeps a new head."""
    from timm.models import load_pretrained

    cfg = dict(model.pretrained_cfg)
    if str(path).endswith((".pt", ".pth")) and os.path.isfile(path):
        try:
            ckpt = load_checkpoint(path)
            cfg["num_classes"] = ckpt.get("model_kwargs", {}).get("num_classes", cfg.get("num_classes"))
        except ValueError:
            pass  # not a pipeline checkpoint: a plain state dict
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init checkpoint {path} not found")
    cfg.update(file=str(path), url=None, hf_hub_id=None, state_dict=None)
    head_reset = cfg.get("num_classes") != model.num_classes
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)  # timm's key remapping
    load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes,
                    in_chans=getattr(model, "in_chans", 3), filter_fn=filter_fn)
    return {"init": str(path), "head_reset": head_reset}


@torch.no_grad()
def partial_load(student: nn.Module, teacher_state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Guideline 5: copy every teacher key into the student; student keys the teacher lacks (the affine
    token mixer) keep their init. A key present in both with another shape is an error."""
    student_state = student.state_dict()
    mismatched = [f"{k}: student {tuple(v.shape)} vs teacher {tuple(teacher_state[k].shape)}"
                  for k, v in student_state.items() if k in teacher_state and v.shape != teacher_state[k].shape]
    if mismatched:
        raise ValueError("partial loading: shape mismatch between student and teacher:\n  " + "\n  ".join(mismatched))
    loaded = [k for k in student_state if k in teacher_state]
    skipped = [k for k in student_state if k not in teacher_state]
    unused = [k for k in teacher_state if k not in student_state]
    student.load_state_dict({**student_state, **{k: teacher_state[k] for k in loaded}})
    return {"loaded": loaded, "skipped": skipped, "unused": unused}


def load_teacher(path: str, device: torch.device) -> nn.Module:
    """A trained teacher in eval mode with frozen weights."""
    model = model_from_checkpoint(load_checkpoint(path)).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------------ epochs
@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast) -> dict[str, float]:
    model.eval()
    n, top1, top5, loss = 0, 0.0, 0.0, 0.0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images)
        logits = logits.float()
        a1, a5 = accuracy(logits, labels, topk=(1, min(5, logits.shape[1])))
        b = len(labels)
        n, top1, top5 = n + b, top1 + a1.item() * b, top5 + a5.item() * b
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n}


def train(cfg: TrainConfig, out_dir: str | Path, experiment: str = "riformer", progress: bool = True,
          profile: str | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(out_dir, cfg.name):
        return _train(cfg, out_dir, experiment, progress, profile)


@contextlib.contextmanager
def run_lock(out_dir: Path, name: str):
    """One process per run folder: a second driver started on the same study fails at once, clearly."""
    with open(out_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{name}: another process is training into {out_dir} (Snakemake and DVC on the "
                               f"same results at once?)") from None
        yield


def _train(cfg: TrainConfig, out_dir: Path, experiment: str, progress: bool, profile: str | None) -> dict:
    torch.set_num_threads(cfg.threads)
    set_deterministic(cfg.deterministic)
    device = resolve_device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext
    prepared = load_prepared(cfg.data.path)
    seed_everything(cfg.seed)

    # model, init, teachers
    kwargs = model_kwargs(cfg, prepared)
    model = timm.create_model(cfg.model, **kwargs)
    init_log = {}
    if cfg.init:
        init_log = init_from_file(model, cfg.init)
    if cfg.partial_init:
        init_log["partial_init"] = partial_load(model, load_checkpoint(cfg.partial_init)["state_dict"])
    model.to(device)
    if use_amp:
        model.to(memory_format=torch.channels_last)
    kd_teacher = load_teacher(cfg.kd.teacher, device) if cfg.kd.type != "none" else None
    mi_on = any(v > 0 for v in (cfg.mi.lambda_in, cfg.mi.lambda_out, cfg.mi.lambda_rel))
    mi_teacher = None
    if mi_on:
        mi_teacher = kd_teacher if cfg.mi.teacher == cfg.kd.teacher else load_teacher(cfg.mi.teacher, device)

    # data, optimiser, schedule, losses
    d, o = cfg.data, cfg.optim
    transform_cfg = {"augment": d.augment, "auto_augment": d.auto_augment, "re_prob": d.re_prob}
    train_loader = build_loader(prepared, "train", d.batch_size, d.img_size, train=True, seed=cfg.seed,
                                augment=d.augment, workers=d.workers, limit=d.train_limit,
                                transform_cfg=transform_cfg)
    test_loader = build_loader(prepared, "test", d.eval_batch_size, d.img_size, train=False, workers=d.workers,
                               limit=d.test_limit)
    if len(train_loader) == 0:
        raise ValueError(f"{cfg.name}: no full training batch: batch_size {d.batch_size} is larger than the "
                         f"training set")
    optimizer = create_optimizer_v2(model, "adamw", lr=o.lr, weight_decay=o.weight_decay, betas=o.betas,
                                    eps=o.eps)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=o.epochs, min_lr=o.min_lr,
                                       warmup_lr=o.warmup_lr, warmup_epochs=o.warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=len(train_loader))
    mixup = (Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, label_smoothing=o.label_smoothing,
                   num_classes=kwargs["num_classes"]) if d.mixup > 0 or d.cutmix > 0 else None)
    base = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
    criterion = DistillationLoss(base, cfg.kd.type, cfg.kd.alpha, cfg.kd.tau, cfg.kd.labels)
    usage = UsageLoss(cfg.usage) if hasattr(model, "decisions") else None  # AdaViT: on its kept fractions
    imitation = None
    if mi_on:
        depths = [len(s.blocks) for s in model.stages]
        blocks = cfg.mi.blocks if cfg.mi.blocks is not None else default_blocks(depths, cfg.mi.layers)
        imitation = ModuleImitation(model, mi_teacher, blocks, cfg.mi.lambda_in, cfg.mi.lambda_out,
                                    cfg.mi.lambda_rel, round(cfg.mi.feat_frac * o.epochs * len(train_loader)),
                                    round(cfg.mi.rel_frac * o.epochs * len(train_loader)), cfg.mi.feature_reduction,
                                    cfg.mi.rel_reduction)
        init_log["mi_blocks"] = blocks

    # resume
    ckpt_path = out_dir / "checkpoint.pt"
    start_epoch, history, run_id = 0, [], None
    if ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a broken checkpoint is never mistaken for progress
            print(f"[{cfg.name}] ignoring unreadable {ckpt_path} ({type(e).__name__}); starting over")
            state = None
        if state is not None and state.get("digest") == cfg.digest():
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, history, run_id = state["epoch"] + 1, state["history"], state.get("run_id")
            print(f"[{cfg.name}] resuming after epoch {state['epoch'] + 1} of {o.epochs} from {ckpt_path}")
        elif state is not None:
            print(f"[{cfg.name}] {ckpt_path} is from another config; starting over")

    mlflow = tracking.setup(experiment)
    run = _start_run(mlflow, cfg, run_id, prepared, device, profile)
    run_id = run.info.run_id
    if start_epoch == 0:
        mlflow.log_params(tracking.flatten({k: v for k, v in cfg.to_dict().items()}))
        mlflow.log_dict(cfg.to_dict(), "config.yaml")
        if init_log:
            mlflow.log_dict(init_log, "init.json")
    if "partial_init" in init_log:
        pl = init_log["partial_init"]
        print(f"[{cfg.name}] partial init: loaded {len(pl['loaded'])} keys, kept init for {pl['skipped']}")

    steps_per_epoch = len(train_loader)
    wall_start = time.perf_counter()
    try:
        for epoch in range(start_epoch, o.epochs):
            seed_everything(cfg.seed * 1000 + epoch)  # resume-exact: every RNG restarts with the epoch
            train_loader.set_epoch(epoch)
            model.train()
            sums: dict[str, float] = {}
            correct = correct5 = seen = 0
            t0 = time.perf_counter()
            bar = tqdm(train_loader, desc=f"{cfg.name} epoch {epoch + 1}/{o.epochs}", disable=not progress,
                       leave=False, dynamic_ncols=True)
            for step, (images, labels) in enumerate(bar):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if use_amp:
                    images = images.contiguous(memory_format=torch.channels_last)
                targets = labels
                if mixup is not None:
                    images, targets = mixup(images, labels)
                with autocast():
                    teacher_logits = None
                    if kd_teacher is not None or mi_teacher is not None:
                        with torch.no_grad():
                            if kd_teacher is not None:
                                teacher_logits = kd_teacher(images).float()
                            if mi_teacher is not None and mi_teacher is not kd_teacher:
                                mi_teacher(images)
                    logits = model(images)
                    terms = criterion(logits.float(), targets, teacher_logits)
                    if usage is not None:
                        terms.update(usage(model.decisions))
                    if imitation is not None:
                        terms.update({k: v.float() for k, v in imitation(epoch * steps_per_epoch + step).items()})
                loss = sum(terms.values())
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"{cfg.name}: non-finite loss {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                        f"(terms: {', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}); "
                        f"lower optim.lr or check the data")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if o.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
                optimizer.step()
                scheduler.step_update(epoch * steps_per_epoch + step + 1)
                for k, v in {"loss": loss, **terms}.items():
                    sums[k] = sums.get(k, 0.0) + v.item()
                top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
                correct += (top5[:, 0] == labels).sum().item()
                correct5 += (top5 == labels[:, None]).any(dim=1).sum().item()
                seen += len(labels)
                if progress:
                    bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.3f}", acc=f"{100 * correct / seen:.1f}",
                                    img_s=f"{seen / (time.perf_counter() - t0):.0f}")
            train_time = time.perf_counter() - t0
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                   **{f"train/{k}": v / steps_per_epoch for k, v in sums.items()},
                   "train/top1": 100 * correct / seen, "train/top5": 100 * correct5 / seen,
                   "train/images_per_s": seen / train_time}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == o.epochs:
                row.update({f"test/{k}": v for k, v in evaluate(model, test_loader, device, autocast).items()})
            row["epoch_time_s"] = time.perf_counter() - t0
            history.append(row)
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            save_checkpoint(ckpt_path, {"digest": cfg.digest(), "epoch": epoch, "state_dict": model.state_dict(),
                                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                        "history": history, "run_id": run_id})
            msg = f"[{cfg.name}] epoch {epoch + 1}/{o.epochs} loss {row['train/loss']:.4f}"
            if "test/top1" in row:
                msg += f" test top-1 {row['test/top1']:.2f}"
            print(msg + f" ({row['train/images_per_s']:.0f} img/s)", flush=True)
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
        mlflow.end_run(status=status)
        raise
    finally:
        if imitation is not None:
            imitation.remove()

    final = history[-1]
    metrics = {
        "name": cfg.name, "role": cfg.role, "model": cfg.model, "run_id": run_id, "data_hash": prepared.data_hash,
        "config_digest": cfg.digest(), "epochs": o.epochs, "test_top1": final["test/top1"],
        "test_top5": final["test/top5"],
        "train_images_per_s": float(np.median([r["train/images_per_s"] for r in history])),
        "train_wall_time_s": sum(r["epoch_time_s"] for r in history), "device": str(device),
        "session_wall_time_s": time.perf_counter() - wall_start,
    }
    model.cpu()
    save_checkpoint(out_dir / "model.pt", {"model": cfg.model, "model_kwargs": kwargs,
                                           "state_dict": model.state_dict(), "config": {"img_size": d.img_size},
                                           "data_hash": prepared.data_hash, "run_id": run_id,
                                           "config_digest": cfg.digest()})
    write_json(out_dir / "history.json", history)
    write_json(out_dir / "metrics.json", metrics)
    mlflow.log_metrics({"final/test_top1": metrics["test_top1"], "final/test_top5": metrics["test_top5"]})
    mlflow.log_dict(metrics, "metrics.json")
    mlflow.end_run(status="FINISHED")
    return metrics


def _start_run(mlflow, cfg: TrainConfig, run_id: str | None, prepared: Prepared, device: torch.device,
               profile: str | None):
    if run_id is not None:
        try:
            return mlflow.start_run(run_id=run_id)
        except Exception as e:  # the store was reset since the run began
            print(f"[{cfg.name}] cannot reopen MLflow run {run_id} ({type(e).__name__}); logging to a new run")
    tags = {"table": ",".join(cfg.tables), "variant": cfg.name, "role": cfg.role, "model": cfg.model,
            "data_hash": prepared.data_hash, "torch": torch.__version__, "timm": timm.__version__,
            "device": str(device), "stage": "train", **tracking.git_state(), **tracking.parent_tags(profile)}
    run = mlflow.start_run(run_name=cfg.name, tags=tags)
    tracking.log_dataset(mlflow, prepared.path, prepared.meta["source"], prepared.data_hash[:32], "training")
    return run


# --------------------------------------------------------------------------------------------------- CLI
def load_config(path: str | None, overrides: list[str]) -> TrainConfig:
    values = {}
    if path:
        values = yaml.safe_load(Path(path).read_text()) or {}
    return config_from_dict(apply_overrides(values, overrides))


def run(args: argparse.Namespace) -> dict:
    if args.run:
        from pipeline.study import run_config
        cfg = run_config(args.profile, args.run, overrides=args.set, threads=args.threads)
        out = args.out or f"results/{args.profile}/runs/{args.run}"
    else:
        cfg = load_config(args.config, args.set + ([f"threads={args.threads}"] if args.threads else []))
        out = args.out
        if not out:
            raise SystemExit("train: --out is needed with --config")
    metrics = train(cfg, out, experiment=args.experiment or tracking.experiment_name(args.profile),
                    progress=not args.no_progress, profile=args.profile)
    print(f"[{cfg.name}] done: test top-1 {metrics['test_top1']:.2f}, top-5 {metrics['test_top5']:.2f}")
    return metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default", help="params/ profile (smoke | default | paper)")
    p.add_argument("--run", help="a teacher or student variant name from the study grid in params/")
    p.add_argument("--config", help="a YAML training config (instead of --run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.epochs=2 --set kd.tau=2.0")
    p.add_argument("--threads", type=int, help="torch threads (Snakemake passes its `threads`)")
    p.add_argument("--experiment", help="MLflow experiment (default riformer-<profile>)")
    p.add_argument("--out", help="run folder (default results/<profile>/runs/<name>)")
    p.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")

