"""Distillation and module-imitation losses (riformer.md Sec. 3).

`DistillationLoss` follows DeiT's losses.py: one switch for none / hard / soft, alpha and tau.
`ModuleImitation` hooks matched blocks of the student and its same-shape PoolFormer teacher and returns
L'_in (block outputs), L_out (token-mixer outputs) and L_rel (token-relation matrices of the mixer outputs).
`UsageLoss` is AdaViT's computational-budget term on the kept fractions of patches, heads and blocks.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models import metaformer_blocks


class DistillationLoss(nn.Module):
    """total = (1 - alpha) * CE(labels) + alpha * KD; without labels the CE term is dropped (alpha = 1).

    soft: KL(log_softmax(s/tau) || log_softmax(t/tau)), summed, * tau^2 / numel(logits) (DeiT's normalisation)
    hard: CE against the teacher's argmax.
    """

    def __init__(self, base_criterion: nn.Module, kd_type: str = "none", alpha: float = 0.5, tau: float = 1.0,
                 labels: bool = True):
        super().__init__()
        if kd_type not in ("none", "hard", "soft"):
            raise ValueError(f"kd_type must be none, hard or soft, got {kd_type!r}")
        self.base_criterion, self.kd_type, self.tau, self.labels = base_criterion, kd_type, tau, labels
        self.alpha = alpha if labels else 1.0

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        terms = {}
        if self.labels:
            terms["ce"] = self.base_criterion(outputs, targets)
        if self.kd_type == "none":
            return terms
        if self.kd_type == "soft":
            t = self.tau
            kd = F.kl_div(F.log_softmax(outputs / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                          reduction="sum", log_target=True) * (t * t) / outputs.numel()
        else:
            kd = F.cross_entropy(outputs, teacher_logits.argmax(dim=1))
        if self.labels:
            terms["ce"] = terms["ce"] * (1 - self.alpha)
        terms[f"kd_{self.kd_type}"] = kd * self.alpha
        return terms


def default_blocks(depths: list[int], layers: int, pick: str = "last") -> list[int]:
    """Which blocks module imitation matches (an open point of the paper, riformer.md Sec. 8).

    4: one block per stage, its last (`pick` last) or first; 6: every second block, from the second (for 2/2/6/2:
    1, 3, 5, 7, 9, 11) or from the first (0, 2, ..., 10).
    """
    if pick not in ("last", "first"):
        raise ValueError(f"pick must be last or first, got {pick!r}")
    starts = [sum(depths[:i]) for i in range(len(depths))]
    if layers == 4:
        return [sum(depths[: i + 1]) - 1 for i in range(len(depths))] if pick == "last" else starts
    if layers == 6:
        return list(range(1 if pick == "last" else 0, sum(depths), 2))[:6]
    raise ValueError(f"layers must be 4 or 6, got {layers}")


def token_relation(x: torch.Tensor) -> torch.Tensor:
    """R(T) = T~ T~^T with T~ the tokens (B, HW, C) normalised along channels: (B, HW, HW). `x`: (B, C, H, W) or
    (B, C, HW)."""
    tokens = F.normalize(x.flatten(2).transpose(1, 2), dim=-1)
    return tokens @ tokens.transpose(1, 2)


def _mse(a: torch.Tensor, b: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return F.mse_loss(a, b)
    return F.mse_loss(a, b, reduction="sum") / a.shape[0]  # sample_sum


class _Capture:
    """Forward hooks that keep each hooked block's output and its token mixer's output."""

    def __init__(self, blocks: list[nn.Module]):
        self.block_out: list[torch.Tensor | None] = [None] * len(blocks)
        self.mixer_out: list[torch.Tensor | None] = [None] * len(blocks)
        self.handles = []
        for i, blk in enumerate(blocks):
            self.handles.append(blk.register_forward_hook(self._store(self.block_out, i)))
            self.handles.append(blk.token_mixer.register_forward_hook(self._store(self.mixer_out, i)))

    @staticmethod
    def _store(target, i):
        def hook(module, inputs, output):
            # as (B, C, tokens): a convolutional stage's (B, C, H, W) and an attention stage's (B, H*W, C) (CAFormer's
            # stages 3-4) compare token by token
            target[i] = output.flatten(2) if output.dim() == 4 else output.transpose(1, 2)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


class ModuleImitation:
    """Block-wise imitation of a same-shape teacher (RIFormer Sec. 3.4).

    L'_in = MSE(student block output, teacher block output)
    L_out = MSE(student token-mixer output, teacher token-mixer output), both with their "- input" term
    L_rel = MSE(R(student mixer output), R(teacher mixer output))
    Each term has its lambda and a window: it is on for the first `feat_frac` / `rel_frac` of the optimizer
    steps (80/120 and 20/120 epochs in the paper), at any run length.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg, total_steps: int, batch_size: int | None = None):
        """`cfg`: the training config's `mi` section (pipeline/config.py:MICfg); its windows are fractions of the
        run's `total_steps` optimizer steps; its blocks are `cfg.blocks`, else `default_blocks(.., cfg.layers,
        cfg.pick)`; `batch_size`: the global batch, which `cfg.weights: per_batch` divides each lambda by."""
        s_blocks, t_blocks = metaformer_blocks(student), metaformer_blocks(teacher)
        if len(s_blocks) != len(t_blocks):
            raise ValueError(f"module imitation needs the same block structure: student has {len(s_blocks)} "
                             f"blocks, teacher {len(t_blocks)}")
        blocks = cfg.blocks if cfg.blocks is not None else default_blocks([len(s.blocks) for s in student.stages],
                                                                          cfg.layers, cfg.pick)
        bad = [b for b in blocks if not 0 <= b < len(s_blocks)]
        if bad:
            raise ValueError(f"module-imitation blocks {bad} out of range for {len(s_blocks)} blocks")
        self.blocks = list(blocks)
        self.student = _Capture([s_blocks[i] for i in blocks])
        self.teacher = _Capture([t_blocks[i] for i in blocks])
        self.lambdas = {"mi_in": cfg.lambda_in, "mi_out": cfg.lambda_out, "mi_rel": cfg.lambda_rel}
        if cfg.weights == "per_batch":
            if not batch_size:
                raise ValueError("mi.weights per_batch needs the global batch size")
            self.lambdas = {k: v / batch_size for k, v in self.lambdas.items()}
        # `balanced`: each term's factor on its lambda, set by balance() at the first step (saved with checkpoints)
        self.weights, self.scales = cfg.weights, None
        feat_steps, rel_steps = round(cfg.feat_frac * total_steps), round(cfg.rel_frac * total_steps)
        self.windows = {"mi_in": feat_steps, "mi_out": feat_steps, "mi_rel": rel_steps}
        self.feature_reduction, self.rel_reduction = cfg.feature_reduction, cfg.rel_reduction

    def active(self, step: int) -> dict[str, bool]:
        return {k: self.lambdas[k] > 0 and step < self.windows[k] for k in self.lambdas}

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        """The weighted terms active at optimizer step `step` (0-based), from the last forward passes."""
        on = self.active(step)
        terms = {}
        if on["mi_in"]:
            terms["mi_in"] = sum(_mse(s, t, self.feature_reduction)
                                 for s, t in zip(self.student.block_out, self.teacher.block_out, strict=True))
        if on["mi_out"]:
            terms["mi_out"] = sum(_mse(s, t, self.feature_reduction)
                                  for s, t in zip(self.student.mixer_out, self.teacher.mixer_out, strict=True))
        if on["mi_rel"]:
            terms["mi_rel"] = sum(_mse(token_relation(s), token_relation(t), self.rel_reduction)
                                  for s, t in zip(self.student.mixer_out, self.teacher.mixer_out, strict=True))
        return {k: v * self.lambdas[k] * (self.scales or {}).get(k, 1.0) for k, v in terms.items()}

    @property
    def needs_balance(self) -> bool:
        return self.weights == "balanced" and self.scales is None

    def balance(self, terms: dict[str, torch.Tensor], logit_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """`terms` (this step's, as __call__ returned them) rescaled so that each equals `logit_loss` (the logit
        terms of the same step); the factors are kept for every later step. Under torchrun the values are
        averaged over the ranks first, so that every rank applies the same factors."""
        keys = sorted(terms)
        values = torch.stack([logit_loss.detach().float()] + [terms[k].detach().float() for k in keys])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)  # sums: the ratios are those of the means
        target, *own = values.tolist()
        self.scales = {k: target / v if v > 0 else 1.0 for k, v in zip(keys, own, strict=True)}
        return {k: v * self.scales[k] for k, v in terms.items()}

    def remove(self):
        self.student.remove()
        self.teacher.remove()


class UsageLoss(nn.Module):
    """AdaViT's usage loss, the reference's AdaLoss (models/losses.py) with ada_main.py's defaults (weights 2,
    targets 0.5; its diversity, entropy and minimal-usage terms have weight 0 there and are not implemented):

        w_h |head - t_h| + w_b |mean(block) - t_b| + w_p (token - t_p)^2

    head: the kept fraction of heads over the (sample, block) pairs where the block runs, i.e. its attention or
    MLP gate is on, as sum / (count + 1e-6); token: the kept fraction of tokens over samples, blocks and tokens,
    the always-kept class token counted in; block: over samples, blocks and both gates."""

    def __init__(self, cfg):
        """`cfg`: the training config's `usage` section (pipeline/config.py:UsageCfg)."""
        super().__init__()
        self.targets = {k: getattr(cfg, f"{k}_target") for k in ("head", "block", "patch")}
        self.weights = {k: getattr(cfg, f"{k}_weight") for k in ("head", "block", "patch")}

    def forward(self, decisions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`decisions`: AdaViT.decisions, patch [B, depth, N-1], head [B, depth-1, H], block [B, depth-1, 2]."""
        head, block, patch = decisions["head"], decisions["block"], decisions["patch"]
        terms = {}
        if self.weights["head"] > 0:
            runs = (block.detach().sum(-1, keepdim=True) > 0).to(head.dtype).expand_as(head)
            kept = (head * runs).sum() / (runs.sum() + 1e-6)
            terms["usage_head"] = self.weights["head"] * (kept - self.targets["head"]).abs()
        if self.weights["block"] > 0:
            terms["usage_block"] = self.weights["block"] * (block.mean() - self.targets["block"]).abs()
        if self.weights["patch"] > 0:
            tokens = torch.cat([patch.new_ones(*patch.shape[:2], 1), patch], dim=-1)
            terms["usage_patch"] = self.weights["patch"] * (tokens.mean() - self.targets["patch"]) ** 2
        return terms
