"""`python -m pipeline train`: one training loop for teachers and every student variant.

AdamW + warm-up/cosine (timm's factories), label smoothing, drop path, timm's Mixup/CutMix when the
recipe asks for them, DeiT-style logit distillation and RIFormer's module imitation (pipeline.losses).

Under torchrun (`train.nproc` in params/, or `torchrun --nproc_per_node N -m pipeline train ...`) every process
trains a DistributedDataParallel replica on its slice of each global batch of the one seeded stream (gloo on CPU,
nccl on GPU); rank 0 alone evaluates, logs to MLflow and writes files.

Crash safety: a checkpoint is written atomically after every epoch. Started again with the same inputs, a
run resumes from it; every RNG is re-seeded from (seed, epoch) at the start of each epoch, so a resumed
run ends with the same metrics as an uninterrupted one. A checkpoint trained from other inputs (config,
data, teacher or init files, code: pipeline.identity) is not resumed: the run starts over and says which
input changed. The final files are written last: model.pt, history.json, then metrics.json.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.models import load_pretrained
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from tqdm import tqdm

from pipeline import tracking
from pipeline.config import TrainConfig, apply_overrides, config_from_dict
from pipeline.data import Prepared, build_loader, load_prepared, model_transform
from pipeline.identity import check_model_file, file_digest, identity_changes, run_identity
from pipeline.io import load_checkpoint, model_from_checkpoint, save_checkpoint, write_json
from pipeline.losses import DistillationLoss, ModuleImitation, UsageLoss
from pipeline.measure import evaluate
from pipeline.models import model_kwargs
from pipeline.repo import git_state
from pipeline.study import load_study


class NonFiniteLossError(FloatingPointError):
    pass


# ------------------------------------------------------------------------------------------------ set-up
def seed_everything(seed: int) -> None:
    """The one seeding helper: python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    """Deterministic kernels (and cuDNN's autotuner off) when `on`; the GPU profiles turn it off for speed. Torch's
    filling of every new tensor with NaN under deterministic mode (a debugging aid for kernels that read memory they
    did not write) stays off: it costs a write of every allocation and changes no result of a correct kernel."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = not on


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is cuda (train.device in a profile), but torch sees no CUDA device on this machine: "
                           "run the job on a GPU, or set train.device: cpu (or auto)")
    rk = ranks()
    if name == "cuda" and rk.world > 1:
        return torch.device("cuda", rk.local)  # one GPU per process
    return torch.device(name)


# ------------------------------------------------------------------------------------------------ torchrun
@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (rank 0 of 1 outside torchrun)."""
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks() -> Ranks:
    if not dist.is_initialized():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def process_group():
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1): gloo for CPU tensors, nccl for CUDA."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_rank() != 0:  # one log: rank 0 prints (as DeiT's setup_for_distributed), errors still reach stderr
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    try:
        yield
    finally:
        dist.destroy_process_group()


# Each rank's dropout / drop-path / Mixup draws differ (seed + RANK_SEED * rank); rank 0's are a single process's.
RANK_SEED = 1_000_003


class _NoTracking:
    """MLflow for ranks other than 0: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def init_from_file(model: nn.Module, path: str) -> dict:
    """Fine-tune init from a local file: a pipeline checkpoint or any timm/state-dict file (e.g. timm's
    pretrained weights the user has). timm's loader remaps keys, adapts the input conv to in_chans and
    drops the classifier when the class counts differ, so the model keeps a new head."""
    cfg = dict(model.pretrained_cfg)
    if str(path).endswith((".pt", ".pth")) and os.path.isfile(path):
        try:
            ckpt = load_checkpoint(path)
            cfg["num_classes"] = ckpt.get("model_kwargs", {}).get("num_classes", cfg.get("num_classes"))
        except ValueError:
            pass  # not a pipeline checkpoint: a plain state dict
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init checkpoint {path} not found")
    check_model_file(path, "init checkpoint")
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


def teacher_checkpoint(path: str, prepared: Prepared, role: str) -> dict:
    """A teacher's (or partial-init source's) checkpoint, checked against the data: one trained for other
    classes or input channels is a clear error, never a size-mismatch traceback in the middle of a step."""
    check_model_file(path, role)
    ckpt = load_checkpoint(path)
    kwargs = ckpt.get("model_kwargs", {})
    for key in ("num_classes", "in_chans"):
        if key in kwargs and kwargs[key] != prepared.meta[key]:
            raise ValueError(f"{role} {path} was trained with {key}={kwargs[key]}, but the prepared data "
                             f"{prepared.path} has {key}={prepared.meta[key]}: retrain it on this data")
    return ckpt


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def load_teacher(path: str, device: torch.device, prepared: Prepared, role: str,
                 fmt: torch.memory_format = torch.contiguous_format) -> nn.Module:
    """A trained teacher in eval mode with frozen weights, in memory format `fmt`."""
    model = model_from_checkpoint(teacher_checkpoint(path, prepared, role)).to(device, memory_format=fmt).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resumable_state(path: Path, identity: dict, name: str) -> dict | None:
    """The checkpoint to resume from; None, saying why, when there is none or it was trained from other
    inputs (config, data, teacher or init files, code, libraries: pipeline.identity)."""
    if not path.exists():
        return None
    try:
        state = load_checkpoint(path)
    except ValueError as e:  # a broken checkpoint is never mistaken for progress
        print(f"[{name}] ignoring {e}; starting over")
        return None
    changes = identity_changes(state.get("identity"), identity)
    if changes:
        print(f"[{name}] not resuming {path}: its inputs changed; starting over. Changed: {'; '.join(changes)}")
        return None
    return state


# ------------------------------------------------------------------------------------------------ epochs
# Shared teacher outputs: at most this many bytes of logits per (teacher, batch stream); larger runs (ImageNet)
# run their teacher in every step.
CACHE_MAX_BYTES = 1 << 30


def cached_teacher_logits(cfg: TrainConfig, teacher: nn.Module, loader, data_hash: str, cache_dir: Path,
                          device: torch.device, autocast) -> torch.Tensor | None:
    """The frozen logit teacher's outputs for every training batch of this run, [epochs * steps, B, classes].

    A run's training batches depend only on the data, seed, batch size, image size, augmentation and subset
    (pipeline.data: the loader draws from its own generator, seeded by (seed, epoch)), and the teacher is frozen,
    so every student of one seed asks the teacher the same questions. The first run computes the answers, under
    a lock, in the same batches and thread count as its steps would; the others read them: the same numbers.
    None (the teacher runs in every step) when the images are mixed or erased (Mixup, CutMix and random erasing draw
    from the training process's global RNG, which the student's own draws share) or the outputs would take more than
    CACHE_MAX_BYTES."""
    d, epochs, steps = cfg.data, cfg.optim.epochs, len(loader)
    size = epochs * steps * d.batch_size * teacher.num_classes * 4
    if d.mixup > 0 or d.cutmix > 0 or d.re_prob > 0 or size > CACHE_MAX_BYTES:
        return None
    key = {"teacher": file_digest(cfg.kd.teacher), "data": data_hash, "seed": cfg.seed, "epochs": epochs,
           "batch_size": d.batch_size, "img_size": d.img_size, "augment": d.augment, "limit": d.train_limit,
           "auto_augment": d.auto_augment,
           "threads": torch.get_num_threads(), "device": str(device), "amp": cfg.amp,
           "channels_last": cfg.channels_last, "torch": str(torch.__version__)}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir / "teacher-logits" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a run of the same seed computing them: wait for it
        cached = _read_logits(path, key, (epochs * steps, d.batch_size), cfg.name)
        if cached is not None:
            return cached
        logits = torch.stack(list(_teacher_outputs(cfg, teacher, loader, device, autocast)))
        save_checkpoint(path, {"key": key, "logits": logits, "sha256": _tensor_sha256(logits)})
        return logits


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _read_logits(path: Path, key: dict, leading_shape: tuple[int, int], name: str) -> torch.Tensor | None:
    """Cached teacher outputs written for `key`, checked byte for byte against the sha256 stored with them; None
    when missing or for another key, and None with a message when damaged (recomputed, never used)."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached["key"] != key or cached["logits"].shape[:2] != leading_shape:
            return None
        if cached.get("sha256") == _tensor_sha256(cached["logits"]):
            return cached["logits"]
        problem = "its bytes do not match the sha256 stored with them"
    except Exception as e:  # a truncated or foreign file
        problem = f"unreadable ({type(e).__name__})"
    print(f"[{name}] cached teacher outputs {path}: {problem}; recomputing them", flush=True)
    return None


@torch.no_grad()
def _teacher_outputs(cfg: TrainConfig, teacher: nn.Module, loader, device: torch.device, autocast):
    """The teacher's logits for each training batch of every epoch, in order."""
    for epoch in range(cfg.optim.epochs):
        loader.set_epoch(epoch)
        for images, _ in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format(cfg))
            with autocast():
                yield teacher(images).float().cpu()


@dataclass
class Objective:
    """One training step's loss terms: CE and logit distillation (DeiT), AdaViT's usage loss, module imitation.
    `kd_logits`: the KD teacher's outputs for every step (cached_teacher_logits), used instead of running it."""
    criterion: DistillationLoss
    kd_teacher: nn.Module | None = None
    mi_teacher: nn.Module | None = None
    mixup: Mixup | None = None
    usage: UsageLoss | None = None
    imitation: ModuleImitation | None = None
    kd_logits: torch.Tensor | None = None

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: int):
        """(student logits, {term: weighted loss}) for one batch at optimizer step `step` (0-based)."""
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        teacher_logits = None
        with torch.no_grad():
            if self.kd_logits is not None:
                teacher_logits = self.kd_logits[step]
            elif self.kd_teacher is not None:
                teacher_logits = self.kd_teacher(images).float()
            imitating = self.imitation is not None and any(self.imitation.active(step).values())
            if imitating and self.mi_teacher is not self.kd_teacher:
                self.mi_teacher(images)  # its hooks keep the block outputs module imitation reads; it stops
                # once the imitation windows have closed (eval mode, no RNG: nothing else changes)
        logits = model(images)
        terms = self.criterion(logits.float(), targets, teacher_logits)
        if self.usage is not None:
            terms.update(self.usage(getattr(model, "module", model).decisions))  # DDP wraps the model
        if self.imitation is not None:
            imitation = {k: v.float() for k, v in self.imitation(step).items()}
            if imitation and self.imitation.needs_balance:
                imitation = self.imitation.balance(imitation, sum(terms.values()))
            terms.update(imitation)
        return logits, terms


def optimizer_params(model: nn.Module, o) -> nn.Module | list[dict]:
    """timm's weight-decay groups (no decay on norms, biases, 1-D parameters and the model's no_weight_decay());
    with optim.affine_weight_decay false, the affine token mixer's scale joins the no-decay group."""
    if o.affine_weight_decay or not o.weight_decay:
        return model
    skip = set(getattr(model, "no_weight_decay", set)()) | {"*token_mixer.affine.weight"}
    return param_groups_weight_decay(model, o.weight_decay, no_weight_decay_list=skip)


# Steps between the loop's reads of its running sums (the non-finite check, the progress bar): each read waits for
# the device, so the loop reads them once in a while, not after every step.
SYNC_EVERY = 50


def train_one_epoch(cfg: TrainConfig, epoch: int, model: nn.Module, loader, objective: Objective, optimizer,
                    scheduler, device: torch.device, autocast, progress: bool) -> dict:
    """One pass over the training set; returns the epoch's row of the history (means over the steps). The loss
    terms and accuracy counts are summed on the device; the sums are read every SYNC_EVERY steps and at the end."""
    loader.set_epoch(epoch)
    model.train()
    steps = len(loader)
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # top-1 correct, top-5 correct
    seen = 0
    checked = 0  # the steps before this one are known to have finite losses
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=f"{cfg.name} epoch {epoch + 1}/{cfg.optim.epochs}", disable=not progress,
               leave=False, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        images = images.contiguous(memory_format=memory_format(cfg))
        with autocast():
            logits, terms = objective(model, images, labels, epoch * steps + step)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step_update(epoch * steps + step + 1)
        with torch.no_grad():
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0) + v.detach().double()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            counts += torch.stack([(top5[:, 0] == labels).sum(), (top5 == labels[:, None]).any(dim=1).sum()])
        seen += len(labels)
        if (step + 1) % SYNC_EVERY == 0 or step + 1 == steps:
            values = {k: v.item() for k, v in sums.items()}
            if not math.isfinite(values["loss"]):
                raise NonFiniteLossError(
                    f"{cfg.name}: non-finite loss at epoch {epoch + 1}, in steps {checked + 1}-{step + 1} (sums of "
                    f"the terms: {', '.join(f'{k}={v:.4g}' for k, v in values.items())}); lower optim.lr or check "
                    f"the data")
            checked = step + 1
            if progress:
                bar.set_postfix(loss=f"{values['loss'] / (step + 1):.3f}", acc=f"{100 * counts[0].item() / seen:.1f}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    world = ranks().world
    totals = torch.cat([torch.stack(list(sums.values())), counts, counts.new_tensor([seen])])
    if world > 1:  # the epoch's means over every rank's images: the numbers of a single process
        dist.all_reduce(totals)
        totals[:len(sums)] /= world
    *means, correct, correct5, seen = totals.tolist()
    return {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
            **{f"train/{k}": v / steps for k, v in zip(sums, means, strict=True)},
            "train/top1": 100 * correct / seen, "train/top5": 100 * correct5 / seen,
            "train/images_per_s": seen / (time.perf_counter() - t0)}


def train(cfg: TrainConfig, out_dir: str | Path, experiment: str = "riformer", progress: bool = True,
          profile: str | None = None, cache_dir: str | Path | None = None) -> dict:
    """Train one run into `out_dir`. `cache_dir`: where runs share their KD teacher's outputs
    (cached_teacher_logits); None runs the teacher in every step."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(out_dir, cfg.name) if ranks().main else nullcontext():
        return _train(cfg, out_dir, experiment, progress, profile, None if cache_dir is None else Path(cache_dir))


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


@dataclass
class Session:
    """Everything the epochs of one run use, built once by build_session: the model (and `net`, what the steps call:
    the model or its DistributedDataParallel wrapper under torchrun), the loaders, optimiser, schedule and loss."""
    cfg: TrainConfig
    prepared: Prepared
    device: torch.device
    autocast: Callable
    model: nn.Module
    net: nn.Module
    train_loader: Iterable
    test_loader: Iterable
    optimizer: torch.optim.Optimizer
    scheduler: Any
    objective: Objective
    record: dict  # what every checkpoint of the run says about its model and its identity (pipeline.io's schema)
    init_log: dict


def _train(cfg: TrainConfig, out_dir: Path, experiment: str, progress: bool, profile: str | None,
           cache_dir: Path | None) -> dict:
    """Build the run, resume it if it was trained from the same inputs, train the remaining epochs, finish."""
    s = build_session(cfg, cache_dir)
    ckpt_path = out_dir / "checkpoint.pt"
    start_epoch, history, run_id = resume(s, ckpt_path)
    mlflow, run_id = open_run(s, experiment, run_id, profile, start_epoch, out_dir)
    wall_start = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.optim.epochs):
            row = run_epoch(s, epoch, progress)
            history.append(row)
            if ranks().main:  # rank 0 logs and writes; the others go on to the next epoch's steps
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
                save_checkpoint(ckpt_path, {**s.record, "state_dict": s.model.state_dict(), "epoch": epoch,
                                            "optimizer": s.optimizer.state_dict(),
                                            "scheduler": s.scheduler.state_dict(), "history": history,
                                            "run_id": run_id, "mi_scales": _mi_scales(s)})
                print_epoch(cfg, row)
        if not ranks().main:
            return {"name": cfg.name, "history": history}
        metrics = finish(s, out_dir, history, run_id, mlflow, time.perf_counter() - wall_start)
        tracking.close_run(mlflow, run_id)  # FINISHED: every final file is written
        return metrics
    except BaseException as e:
        if ranks().main:
            tracking.close_run(mlflow, run_id, e)
        if isinstance(e, KeyboardInterrupt):
            print(f"[{cfg.name}] stopped ({str(e) or 'SIGINT'}) after {len(history)} of {cfg.optim.epochs} epochs; "
                  f"MLflow run {run_id} KILLED; the same command resumes it from {ckpt_path}"
                  + ("; under torchrun, a failure of another rank also stops this one so: see its log"
                     if ranks().world > 1 else ""), flush=True)
        raise
    finally:
        if s.objective.imitation is not None:
            s.objective.imitation.remove()


def build_session(cfg: TrainConfig, cache_dir: Path | None) -> Session:
    """The run's device, data, models, loaders, optimiser, schedule and loss, in a fixed order (the global RNG is
    seeded once before the models are built: a run's initial weights depend on its seed only)."""
    rk = ranks()
    torch.set_num_threads(max(1, cfg.threads // rk.world))  # `threads` is the job's: shared by its processes
    set_deterministic(cfg.deterministic)
    device = resolve_device(cfg.device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cfg.amp and device.type == "cuda" \
        else nullcontext
    prepared = load_prepared(cfg.data.path)
    seed_everything(cfg.seed)
    model, kwargs, init_log = build_model(cfg, prepared, device)
    net = model
    if rk.world > 1:  # (AdaViT trains with soft masks: every parameter gets a gradient in every step)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    kd_teacher, mi_teacher = build_teachers(cfg, prepared, device)
    train_loader, test_loader, eval_transform = build_loaders(cfg, prepared, model, device)
    optimizer, scheduler = build_optimizer(cfg, model, len(train_loader))
    objective = build_objective(cfg, model, kd_teacher, mi_teacher, len(train_loader), kwargs["num_classes"])
    if objective.imitation is not None:
        init_log["mi_blocks"] = objective.imitation.blocks
    if kd_teacher is not None and cache_dir is not None and mi_teacher is not kd_teacher and rk.world == 1:
        logits = cached_teacher_logits(cfg, kd_teacher, train_loader, prepared.data_hash, cache_dir, device, autocast)
        objective.kd_logits = None if logits is None else logits.to(device)  # at most CACHE_MAX_BYTES: no copy per step
    record = {"model": cfg.model, "model_kwargs": kwargs, "identity": run_identity(cfg, prepared.data_hash),
              "config": {"img_size": cfg.data.img_size, "transform": eval_transform}}
    return Session(cfg, prepared, device, autocast, model, net, train_loader, test_loader, optimizer, scheduler,
                   objective, record, init_log)


def build_model(cfg: TrainConfig, prepared: Prepared, device: torch.device) -> tuple[nn.Module, dict, dict]:
    """(the model on `device`, its kwargs, what its initialisation loaded): fresh, fine-tuned from `init`, and/or
    partially loaded from a teacher (guideline 5)."""
    kwargs = model_kwargs(cfg.model, prepared.meta["num_classes"], prepared.meta["in_chans"], cfg.data.img_size,
                          **cfg.model_kwargs)
    model = timm.create_model(cfg.model, **kwargs)
    init_log = {}
    if cfg.init:
        init_log = init_from_file(model, cfg.init)
    if cfg.partial_init:
        source = teacher_checkpoint(cfg.partial_init, prepared, "partial_init")
        init_log["partial_init"] = partial_load(model, source["state_dict"])
    return model.to(device, memory_format=memory_format(cfg)), kwargs, init_log


def build_teachers(cfg: TrainConfig, prepared: Prepared, device: torch.device):
    """(logit-distillation teacher, module-imitation teacher): frozen, or None when not used; one model when the
    two are the same file."""
    fmt = memory_format(cfg)
    kd_teacher = load_teacher(cfg.kd.teacher, device, prepared, "kd.teacher", fmt) if cfg.kd.type != "none" else None
    if not cfg.mi.enabled:
        return kd_teacher, None
    mi_teacher = (kd_teacher if cfg.mi.teacher == cfg.kd.teacher
                  else load_teacher(cfg.mi.teacher, device, prepared, "mi.teacher", fmt))
    return kd_teacher, mi_teacher


def build_loaders(cfg: TrainConfig, prepared: Prepared, model: nn.Module, device: torch.device):
    """(training loader, test loader, the evaluation transform of image-folder data), their batches on `device`.
    Under torchrun each rank gets its slice of every batch, of the test set too (every rank evaluates its part)."""
    d, rk = cfg.data, ranks()
    eval_transform = model_transform(model, d.interpolation, d.crop_pct)  # image folders only
    train_loader = build_loader(prepared, "train", d.batch_size, d.img_size, train=True, seed=cfg.seed,
                                augment=d.augment, workers=d.workers, limit=d.train_limit,
                                transform_cfg={"augment": d.augment, "auto_augment": d.auto_augment,
                                               "re_prob": d.re_prob, "re_mode": d.re_mode,
                                               "interpolation": eval_transform["interpolation"]},
                                shard=(rk.rank, rk.world), decoded_cache_mb=d.decoded_cache_mb, device=device)
    test_loader = build_loader(prepared, "test", d.eval_batch_size, d.img_size, train=False, workers=d.workers,
                               limit=d.test_limit, transform_cfg=eval_transform, decoded_cache_mb=d.decoded_cache_mb,
                               shard=(rk.rank, rk.world), device=device)
    if len(train_loader) == 0:
        raise ValueError(f"{cfg.name}: no full training batch: batch_size {d.batch_size} is larger than the "
                         f"training set")
    return train_loader, test_loader, eval_transform


def build_optimizer(cfg: TrainConfig, model: nn.Module, steps_per_epoch: int):
    """AdamW and the warm-up + cosine schedule, stepped per update (timm's factories)."""
    o = cfg.optim
    optimizer = create_optimizer_v2(optimizer_params(model, o), "adamw", lr=o.lr, weight_decay=o.weight_decay,
                                    betas=o.betas, eps=o.eps, fused=o.fused)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=o.epochs, min_lr=o.min_lr,
                                       warmup_lr=o.warmup_lr, warmup_epochs=o.warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return optimizer, scheduler


def build_objective(cfg: TrainConfig, model: nn.Module, kd_teacher: nn.Module | None, mi_teacher: nn.Module | None,
                    steps_per_epoch: int, num_classes: int) -> Objective:
    """The loss terms of a step: CE (soft targets under Mixup/CutMix), distillation, AdaViT's usage, imitation."""
    d, o = cfg.data, cfg.optim
    mixup = (Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, label_smoothing=o.label_smoothing,
                   num_classes=num_classes) if d.mixup > 0 or d.cutmix > 0 else None)
    base = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
    objective = Objective(DistillationLoss(base, cfg.kd.type, cfg.kd.alpha, cfg.kd.tau, cfg.kd.labels),
                          kd_teacher, mi_teacher, mixup)
    if hasattr(model, "decisions"):  # AdaViT: the usage loss on its kept fractions
        objective.usage = UsageLoss(cfg.usage)
    if mi_teacher is not None:
        objective.imitation = ModuleImitation(model, mi_teacher, cfg.mi, o.epochs * steps_per_epoch, d.batch_size)
    return objective


def resume(s: Session, path: Path) -> tuple[int, list[dict], str | None]:
    """(first epoch to train, history so far, MLflow run to continue): from the run's checkpoint when it was
    trained from the same inputs (resumable_state), else a fresh start."""
    state = resumable_state(path, s.record["identity"], s.cfg.name)
    if state is None:
        return 0, [], None
    s.model.load_state_dict(state["state_dict"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    if s.objective.imitation is not None:  # `mi.weights: balanced`: the factors set at the first step
        s.objective.imitation.scales = state.get("mi_scales")
    print(f"[{s.cfg.name}] resuming after epoch {state['epoch'] + 1} of {s.cfg.optim.epochs} from {path}")
    return state["epoch"] + 1, state["history"], state.get("run_id")


def _mi_scales(s: Session) -> dict[str, float] | None:
    return s.objective.imitation.scales if s.objective.imitation is not None else None


def open_run(s: Session, experiment: str, run_id: str | None, profile: str | None, start_epoch: int,
             out_dir: Path):
    """(mlflow, run id): the run's MLflow run, continued when resuming; its params and config logged once. Runs of
    this folder left RUNNING by a vanished process are closed first (this process holds the folder's lock). Ranks
    other than 0 get a tracker that does nothing."""
    if not ranks().main:
        return _NoTracking(), run_id
    mlflow = tracking.setup(experiment)
    run_dir = str(out_dir.resolve())
    tracking.close_vanished(mlflow, experiment, s.cfg.name, run_dir)
    run_id = _start_run(mlflow, s.cfg, run_id, s.prepared, s.device, profile, ranks().world, run_dir).info.run_id
    try:
        if start_epoch == 0:
            mlflow.log_params(tracking.flatten(s.cfg.to_dict()))
            mlflow.log_dict(s.cfg.to_dict(), "config.yaml")
            if s.init_log:
                mlflow.log_dict(s.init_log, "init.json")
    except BaseException as e:
        tracking.close_run(mlflow, run_id, e)
        raise
    if "partial_init" in s.init_log:
        pl = s.init_log["partial_init"]
        print(f"[{s.cfg.name}] partial init: loaded {len(pl['loaded'])} keys, kept init for {pl['skipped']}")
    return mlflow, run_id


def run_epoch(s: Session, epoch: int, progress: bool) -> dict:
    """One epoch's steps, then (every `eval_every` epochs and at each of the last `eval_last`) the test set: its
    history row. Under torchrun every rank evaluates its slice of the test set and the counts are summed."""
    cfg, rk = s.cfg, ranks()
    seed_everything(cfg.seed * 1000 + epoch + RANK_SEED * rk.rank)  # resume-exact: RNGs restart each epoch
    t0 = time.perf_counter()
    row = train_one_epoch(cfg, epoch, s.net, s.train_loader, s.objective, s.optimizer, s.scheduler, s.device,
                          s.autocast, progress and rk.main)
    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 > cfg.optim.epochs - cfg.eval_last:
        sums = evaluate(s.model, s.test_loader, s.device, s.autocast, memory_format(cfg))["sums"]
        if rk.world > 1:
            dist.all_reduce(sums)
        top1, top5, loss, n = sums.tolist()
        row.update({"test/top1": top1 / n, "test/top5": top5 / n, "test/loss": loss / n})
    row["epoch_time_s"] = time.perf_counter() - t0
    if s.device.type == "cuda":  # this process's peak, over the run so far
        row["cuda_peak_memory_gb"] = torch.cuda.max_memory_allocated(s.device) / 2**30
    return row


def print_epoch(cfg: TrainConfig, row: dict) -> None:
    msg = f"[{cfg.name}] epoch {row['epoch']}/{cfg.optim.epochs} loss {row['train/loss']:.4f}"
    if "test/top1" in row:
        msg += f" test top-1 {row['test/top1']:.2f}"
    print(msg + f" ({row['train/images_per_s']:.0f} img/s)", flush=True)


def finish(s: Session, out_dir: Path, history: list[dict], run_id: str, mlflow, session_s: float) -> dict:
    """The final files, written last (model.pt, history.json, then metrics.json), and the run's final metrics."""
    cfg, final = s.cfg, history[-1]
    metrics = {
        "name": cfg.name, "variant": cfg.variant or cfg.name, "seed": cfg.seed, "role": cfg.role, "model": cfg.model,
        "run_id": run_id, "data_hash": s.prepared.data_hash, "identity": s.record["identity"],
        "epochs": cfg.optim.epochs,
        "test_top1": final["test/top1"], "test_top5": final["test/top5"],
        "train_images_per_s": float(np.median([r["train/images_per_s"] for r in history])),
        "train_wall_time_s": sum(r["epoch_time_s"] for r in history), "device": str(s.device),
        "session_wall_time_s": session_s,
    }
    if s.objective.imitation is not None:  # the imitation weights as applied (mi.weights), lambda x factor
        mi = s.objective.imitation
        metrics["mi_lambdas"] = {k: v * (mi.scales or {}).get(k, 1.0) for k, v in mi.lambdas.items()}
    s.model.cpu()
    save_checkpoint(out_dir / "model.pt", {**s.record, "state_dict": s.model.state_dict()})
    metrics["model_sha256"] = file_digest(out_dir / "model.pt")  # checked where a later run reads it
    write_json(out_dir / "history.json", history)
    write_json(out_dir / "metrics.json", metrics)
    mlflow.log_metrics({"final/test_top1": metrics["test_top1"], "final/test_top5": metrics["test_top5"]})
    mlflow.log_dict(metrics, "metrics.json")
    return metrics


def _start_run(mlflow, cfg: TrainConfig, run_id: str | None, prepared: Prepared, device: torch.device,
               profile: str | None, processes: int, run_dir: str):
    if run_id is not None:
        try:
            client = mlflow.MlflowClient()
            before = client.get_run(run_id)
            run = mlflow.start_run(run_id=run_id)
        except Exception as e:  # the store was reset since the run began
            print(f"[{cfg.name}] cannot reopen MLflow run {run_id} ({type(e).__name__}); logging to a new run")
        else:  # resumed: the interruption stays on record, the run's status is again its own
            try:
                error = before.data.tags.get("error")
                if error:
                    client.delete_tag(run_id, "error")
                client.set_tag(run_id, "resumed", f"after {before.info.status}"
                               + (f" ({error})" if error else "")[:4000])
                mlflow.set_tags(tracking.owner_tags())
            except BaseException as e:
                tracking.close_run(mlflow, run_id, e)
                raise
            return run
    # `variant` is the same for every seed of a variant, so the MLflow UI groups them; `seed` tells them apart
    tags = {"table": ",".join(cfg.tables), "variant": cfg.variant or cfg.name, "seed": str(cfg.seed),
            "role": cfg.role, "model": cfg.model,
            "data_hash": prepared.data_hash, "torch": torch.__version__, "timm": timm.__version__,
            "device": str(device), "processes": str(processes), "stage": "train", "run_dir": run_dir,
            **git_state(), **tracking.parent_tags(profile), **tracking.owner_tags()}
    run = mlflow.start_run(run_name=cfg.name, tags=tags)
    try:
        tracking.log_dataset(mlflow, prepared.path, prepared.meta["source"], prepared.data_hash[:32], "training")
    except BaseException as e:
        tracking.close_run(mlflow, run.info.run_id, e)
        raise
    return run


# --------------------------------------------------------------------------------------------------- CLI
def load_config(path: str | None, overrides: list[str]) -> TrainConfig:
    values = {}
    if path:
        values = yaml.safe_load(Path(path).read_text()) or {}
    return config_from_dict(apply_overrides(values, overrides))


def run(args: argparse.Namespace) -> dict:
    with process_group():
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    if not args.run:
        cfg = load_config(args.config, args.set + ([f"threads={args.threads}"] if args.threads else []))
        if not args.out:
            raise SystemExit("train: --out is needed with --config")
        return _train_and_report(cfg, args, args.out, None)
    if args.out and len(args.run) > 1:
        raise SystemExit("train: --out takes one --run")
    # Several runs: one after another in this process (a Snakemake / DVC job of the study's train_batches). A run
    # that fails does not stop the others (but under torchrun); the job fails at the end, naming it. Each run is
    # what it would be alone.
    study = load_study(args.profile, check_data=False)
    results, failed = {}, {}
    for name in args.run:
        cfg = study.run_config(name, overrides=args.set, threads=args.threads)
        out = args.out or study.run_dir(name)
        try:
            results[name] = _train_and_report(cfg, args, out, None if args.no_cache else study.results / "cache")
        except Exception as e:
            if len(args.run) == 1 or ranks().world > 1:  # torchrun stops every rank when one fails
                raise
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"[{name}] FAILED: {failed[name]}", flush=True)
    if failed:
        raise SystemExit(f"train: {len(failed)} of {len(args.run)} runs failed: "
                         + "; ".join(f"{k} ({v.splitlines()[0][:300]})" for k, v in failed.items()))
    return results[args.run[0]] if len(args.run) == 1 else results


def _train_and_report(cfg: TrainConfig, args: argparse.Namespace, out, cache) -> dict:
    metrics = train(cfg, out, experiment=args.experiment or tracking.experiment_name(args.profile),
                    progress=not args.no_progress, profile=args.profile, cache_dir=cache)
    if ranks().main:
        print(f"[{cfg.name}] done: test top-1 {metrics['test_top1']:.2f}, top-5 {metrics['test_top5']:.2f}",
              flush=True)
    return metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default", help="params/ profile (smoke | default | paper)")
    p.add_argument("--run", nargs="+", metavar="RUN",
                   help="teacher or student run names from the study grid in params/ (several: trained one after "
                        "another in this process)")
    p.add_argument("--config", help="a YAML training config (instead of --run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.epochs=2 --set kd.tau=2.0")
    p.add_argument("--threads", type=int, help="torch threads (Snakemake passes its `threads`)")
    p.add_argument("--experiment", help="MLflow experiment (default riformer-<profile>)")
    p.add_argument("--out", help="run folder (default results/<profile>/runs/<name>)")
    p.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")
    p.add_argument("--no-cache", action="store_true",
                   help="run the KD teacher in every step instead of sharing its outputs across the study's runs")

