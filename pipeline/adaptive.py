"""AdaViT's measurements: in the evaluate stage, fast-path agreement, expected MACs over the test set and decision
examples for the report's figure; in the benchmark stage, the wall-clock speed-up of the fast path over the dense
DeiT at batch 1 and on batches grouped by kept-token count (pipeline/models/adavit.py)."""
from __future__ import annotations

import torch

from pipeline.measure import measure_throughput, precision_policy, summarize
from pipeline.models.adavit import FastPath


@torch.no_grad()
def evaluate_adaptive(model, loader) -> dict:
    """Over the test set: fast-path top-1 and its largest logit difference to the masked path, expected MACs
    per image (mean, min, max) and the kept fraction of patches, heads and blocks."""
    model.eval()
    macs, usage, diff, correct, agree, seen = [], {"patch": [], "head": [], "block": []}, 0.0, 0, 0, 0
    for images, labels in loader:
        masked = model(images)
        fast = model.forward_fast(images)
        macs.append(model.expected_macs())
        for k in usage:
            usage[k].append(model.decisions[k].float().flatten(1).mean(1))
        diff = max(diff, (masked - fast).abs().max().item())
        correct += (fast.argmax(1) == labels).sum().item()
        agree += (fast.argmax(1) == masked.argmax(1)).sum().item()
        seen += len(labels)
    macs = torch.cat(macs)
    return {"expected_macs": {"mean": macs.mean().item(), "min": macs.min().item(), "max": macs.max().item()},
            "usage": {k: torch.cat(v).mean().item() for k, v in usage.items()},
            "fast_path": {"top1": 100 * correct / seen, "argmax_agreement": agree / seen,
                          "max_abs_logit_diff": diff}}


@torch.no_grad()
def decision_examples(model, images: torch.Tensor, labels: torch.Tensor, patch_size: int) -> dict:
    """Which patches each block kept for a few test images (fast path = masked path decisions)."""
    model.eval()
    logits = model(images)
    return {"images": images[:, 0].tolist(), "labels": labels.tolist(), "pred": logits.argmax(1).tolist(),
            "patch": model.decisions["patch"].int().tolist(), "block": model.decisions["block"].int().tolist(),
            "head": model.decisions["head"].int().tolist(), "patch_size": patch_size,
            "grid": list(model.patch_embed.grid_size)}


@torch.no_grad()
def kept_tokens(model, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Total kept patches over the blocks of each image (the key for grouping a batch)."""
    out = []
    for chunk in images.split(batch_size):
        model.forward_fast(chunk)
        out.append(model.decisions["patch"].sum((1, 2)))
    return torch.cat(out)


def adaptive_speedup(dense, model, images: torch.Tensor, batch_size: int, batch1_images: int, warmup: int,
                     repeats: int, iters: int, precision: str = "fp32") -> dict:
    """Interleaved images/s of the dense DeiT, the masked path and the fast path, and each ratio to dense:
    at batch 1 over `batch1_images` test images, and on the same images sorted by kept-token count and cut
    into batches of `batch_size` (so a batch's samples keep similar numbers of patches). Under the benchmark's
    precision policy (pipeline.measure), the grouping too: its decisions are the timed passes'."""
    models = {"dense": dense.eval(), "masked": model.eval(), "fast": FastPath(model).eval()}
    with precision_policy(precision, images.device):
        order = torch.argsort(kept_tokens(model, images, batch_size), stable=True)
    grouped = list(images[order].split(batch_size))
    settings = {"batch_1": [images[i:i + 1] for i in range(min(batch1_images, len(images)))],
                f"grouped_batch_{batch_size}": grouped}
    out = {}
    for name, batches in settings.items():
        samples = measure_throughput(models, batches, warmup, repeats, iters, progress=False, precision=precision)
        out[name] = {"images": sum(len(b) for b in batches),
                     **{m: {"throughput": summarize(s),
                            "ratio_to_dense": summarize([a / b for a, b in zip(s, samples["dense"], strict=True)])}
                        for m, s in samples.items()}}
    return out
