"""`python -m pipeline bench-train`: how fast each model kind of a study trains, and how far from the machine's limit.

For every distinct architecture the profile trains (its first seed's runs), at the profile's image size, batch size,
thread count and memory format: training images/s of plain steps (forward, cross-entropy, backward, AdamW; no
teacher, no data loading), the training FLOPs per image (FlopCounterMode over the forward and the backward pass:
convolutions, matmuls, attention, GFNet's FFTs; element-wise work not counted), and the fraction of the machine's
matmul FLOP/s those images/s reach. The matmul reference is a float32 GEMM (n = 1024) at the same thread count,
measured in the same interleaved rounds as the models, so that all of them see the same machine state
(pipeline.measure's protocol: each entry's median over rounds, with min and max). This is the number a training
speed-up is judged by.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from pipeline.benchmark import architecture_label
from pipeline.data import load_prepared
from pipeline.io import write_json
from pipeline.measure import FFT_FLOPS, device_name, summarize
from pipeline.models import create_model
from pipeline.study import load_study
from pipeline.train import memory_format

GEMM = "matmul (float32 GEMM, n=1024)"


def study_models(study, num_classes: int, in_chans: int) -> dict[str, nn.Module]:
    """label -> a fresh model, for every distinct architecture the study trains at its first seed (runs whose
    kwargs differ only in defaults or in training-only settings such as drop path give one entry)."""
    models, seen = {}, set()
    for run in study.runs:
        if study.run_specs[run][2] != study.settings["seeds"][0]:
            continue
        cfg = study.run_config(run)
        model = create_model(cfg.model, num_classes, in_chans, cfg.data.img_size, **cfg.model_kwargs)
        if repr(model) not in seen:
            seen.add(repr(model))
            models[architecture_label(cfg.model, cfg.model_kwargs)] = model
    return models


class Step:
    """One plain training step of a model on a fixed batch: forward, cross-entropy, backward, AdamW."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        self.model, self.images, self.labels = model.train(), images, labels
        self.optimizer = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05, fused=True)  # as training

    def loss(self) -> torch.Tensor:
        return nn.functional.cross_entropy(self.model(self.images), self.labels)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()

    def flops_per_image(self) -> float:
        """FLOPs of the forward and backward pass of one batch, per image (the optimizer's are not counted)."""
        counter = FlopCounterMode(display=False, custom_mapping=FFT_FLOPS)
        with counter:
            self.loss().backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops() / len(self.images)


def gemm(n: int = 1024):
    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda: torch.mm(a, b), 2 * n ** 3  # (work, FLOPs per call)


def bench_train(study, threads: int, batch_size: int, warmup: int = 2, repeats: int = 7, iters: int = 3,
                progress: bool = True) -> dict:
    torch.set_num_threads(threads)
    d = study.settings["train"]["data"]
    meta = {"num_classes": 10, "in_chans": 1}
    if study.data_dir.exists():
        meta = load_prepared(study.data_dir).meta
    shape = (meta["in_chans"], d["img_size"], d["img_size"])
    torch.manual_seed(0)
    fmt = memory_format(study.run_config(study.student_runs[0]))  # the memory format the profile's training uses
    images = torch.randn(batch_size, *shape).contiguous(memory_format=fmt)
    labels = torch.randint(0, meta["num_classes"], (batch_size,))
    steps = {label: Step(model.to(memory_format=fmt), images, labels)
             for label, model in study_models(study, meta["num_classes"], meta["in_chans"]).items()}
    flops = {label: step.flops_per_image() for label, step in steps.items()}
    work, gemm_flops = gemm()
    calls = {**steps, GEMM: work}
    for fn in tqdm(calls.values(), desc="warm-up", disable=not progress, leave=False):
        for _ in range(warmup):
            fn()
    seconds = {label: [] for label in calls}
    names = list(calls)
    for r in tqdm(range(repeats), desc="rounds", disable=not progress, leave=False):
        shift = r % len(names)
        for label in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(iters):
                calls[label]()
            seconds[label].append((time.perf_counter() - start) / iters)
    peak = [gemm_flops / s for s in seconds[GEMM]]
    rows = {}
    for label in steps:
        per_round = [batch_size / s for s in seconds[label]]
        rows[label] = {"train_images_per_s": summarize(per_round), "train_flops_per_image": flops[label],
                       # per round, against the GEMM of the same round
                       "fraction_of_matmul": summarize([ips * flops[label] / p for ips, p in zip(per_round, peak,
                                                                                                  strict=True)])}
    return {"profile": study.profile, "device_name": device_name(torch.device("cpu")), "threads": threads,
            "batch_size": batch_size, "input_shape": list(shape), "channels_last": fmt == torch.channels_last,
            "warmup": warmup, "repeats": repeats,
            "iters_per_repeat": iters, "torch": torch.__version__, "timm": timm.__version__,
            "matmul_flops_per_s": summarize(peak), "models": rows}


def print_table(result: dict) -> None:
    peak = result["matmul_flops_per_s"]
    print(f"{result['device_name']}, batch {result['batch_size']} x {tuple(result['input_shape'])}; matmul "
          f"{peak['median'] / 1e9:.1f} GFLOP/s [{peak['min'] / 1e9:.1f}, {peak['max'] / 1e9:.1f}]")
    print(f"{'model':<56} {'train img/s [min, max]':>24} {'train MFLOP/img':>16} {'of matmul':>10}")
    for label, row in result["models"].items():
        ips, frac = row["train_images_per_s"], row["fraction_of_matmul"]
        print(f"{label:<56} {ips['median']:>8.0f} [{ips['min']:>5.0f}, {ips['max']:>5.0f}]   "
              f"{row['train_flops_per_image'] / 1e6:>16.1f} {100 * frac['median']:>9.1f}%")


def run(args: argparse.Namespace) -> dict:
    study = load_study(args.profile, check_data=False)
    threads = args.threads or study.settings["train"]["threads"]
    batch_size = args.batch_size or study.settings["train"]["data"]["batch_size"]
    result = bench_train(study, threads, batch_size, repeats=args.repeats, progress=not args.no_progress)
    out = Path(args.out or f"results/{study.profile}/bench_train.json")
    write_json(out, result)
    print_table(result)
    print(f"written to {out}")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default")
    p.add_argument("--threads", type=int, help="torch threads (default: the profile's train.threads, as its jobs)")
    p.add_argument("--batch-size", type=int, help="default: the profile's training batch size")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    p.add_argument("--out", help="JSON output (default results/<profile>/bench_train.json)")
    p.add_argument("--no-progress", action="store_true")
