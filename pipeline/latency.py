"""The paper's Fig. 1 latency breakdown (riformer.md Sec. 7) on whatever device runs it.

A 12-layer ViT-B (no pooling, no head) is built up one component at a time: input embedding, +LN,
+attention, +residual, +LN, +MLP, +residual. Each cumulative model is timed in one interleaved run
(`pipeline.measure.measure_throughput`), and the token mixer's share is the latency that adding
attention costs, over the full model's latency. Under a precision policy (pipeline.measure; the paper profile's is
tf32, params/paper.yaml says why), written in the record.
"""
from __future__ import annotations

import argparse
import statistics

import timm
import torch
import torch.nn as nn
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention

from pipeline import tracking
from pipeline.io import write_json
from pipeline.measure import PRECISIONS, device_name, measure_throughput, precision_flags, setting_device
from pipeline.study import load_study

STEPS = ["embedding", "+layernorm1", "+attention", "+residual1", "+layernorm2", "+mlp", "+residual2"]
TOKEN_MIXER_STEP = "+attention"


class PartialBlock(nn.Module):
    """A ViT block with only its first `n_components` components (of 6) switched on."""

    def __init__(self, dim: int, num_heads: int, n_components: int):
        super().__init__()
        self.n = n_components
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x) if self.n >= 1 else x
        h = self.attn(h) if self.n >= 2 else h
        x = x + h if self.n >= 3 else h
        h = self.norm2(x) if self.n >= 4 else x
        h = self.mlp(h) if self.n >= 5 else h
        return x + h if self.n >= 6 else h


class PartialViT(nn.Module):
    def __init__(self, n_components: int, img_size: int = 224, depth: int = 12, dim: int = 768, heads: int = 12):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, 16, 3, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, dim))
        self.blocks = nn.Sequential(*[PartialBlock(dim, heads, n_components) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.patch_embed(x) + self.pos_embed)


def latency_breakdown(batch_size: int, img_size: int, device: torch.device, precision: str,
                      warmup: int, repeats: int, iters: int, depth: int = 12) -> dict:
    flags = precision_flags(precision, device)  # an unknown policy or tf32 on the CPU fails before building
    models = {step: PartialViT(i, img_size, depth).to(device) for i, step in enumerate(STEPS)}
    batch = torch.randn(batch_size, 3, img_size, img_size, device=device)
    samples = measure_throughput(models, batch, warmup, repeats, iters, precision=precision)
    # images/s -> ms per batch, round by round
    ms = {step: [1000 * batch_size / s for s in samples[step]] for step in STEPS}
    total = ms[STEPS[-1]]
    prev = STEPS[STEPS.index(TOKEN_MIXER_STEP) - 1]
    share = [(a - b) / t for a, b, t in zip(ms[TOKEN_MIXER_STEP], ms[prev], total, strict=True)]
    return {
        "device": str(device), "device_name": device_name(device), "precision": flags,
        "batch_size": batch_size, "img_size": img_size, "depth": depth, "threads": torch.get_num_threads(),
        "warmup": warmup, "repeats": repeats, "iters_per_repeat": iters, "torch": torch.__version__,
        "timm": timm.__version__,
        "steps": [{"step": step, "cumulative_ms": statistics.median(ms[step]), "min_ms": min(ms[step]),
                   "max_ms": max(ms[step])} for step in STEPS],
        "token_mixer_ms": statistics.median(a - b for a, b in zip(ms[TOKEN_MIXER_STEP], ms[prev], strict=True)),
        "token_mixer_share": {"median": statistics.median(share), "min": min(share), "max": max(share)},
    }


def run(args: argparse.Namespace) -> dict:
    if args.profile:
        study = load_study(args.profile, check_data=False)
        threads = args.threads
        for key, value in study.settings["latency"].items():
            setattr(args, key.replace("-", "_"), value)
        args.threads = threads or args.threads
        args.out = args.out or study.latency_path
    if not args.out:
        raise SystemExit("latency-breakdown: give --out or --profile")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    result = latency_breakdown(args.batch_size, args.img_size, setting_device(args.device, "latency.device"),
                               args.precision, args.warmup, args.repeats, args.iters)
    write_json(args.out, result)
    if args.profile:
        with tracking.stage_run(args.profile, "latency-breakdown", "vit_b") as (mlflow, _):
            mlflow.log_metric("token_mixer_share", result["token_mixer_share"]["median"])
            for i, row in enumerate(result["steps"]):
                mlflow.log_metric("cumulative_ms", row["cumulative_ms"], step=i)
    for row in result["steps"]:
        print(f"{row['step']:14s} {row['cumulative_ms']:10.1f} ms  [{row['min_ms']:.1f}, {row['max_ms']:.1f}]")
    s = result["token_mixer_share"]
    print(f"token mixer (attention): {result['token_mixer_ms']:.1f} ms = {100 * s['median']:.1f}% of the total "
          f"[{100 * s['min']:.1f}, {100 * s['max']:.1f}]")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    on_cuda = torch.cuda.is_available()
    p.add_argument("--batch-size", type=int, default=2048 if on_cuda else 8,
                   help="the paper uses 2048 on an A100; a smaller batch on CPU")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--device", default="cuda" if on_cuda else "cpu")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="fp32 (strict: no TF32), tf32 (TF32 for matmuls and convolutions; CUDA only), bf16 / fp16 "
                        "(autocast over fp32 weights)")
    p.add_argument("--threads", type=int, help="torch threads (default: the profile's, or torch's default)")
    p.add_argument("--profile", help="take the settings of params/<profile>.yaml `latency:` (and its output path)")
    p.add_argument("--out", help="JSON file to write")
