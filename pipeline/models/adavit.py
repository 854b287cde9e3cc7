"""AdaViT (Meng et al., CVPR 2022, arXiv 2111.15668): per-input patch, head and block skipping on a DeiT.

Written against the paper and the authors' code (MengLcool/AdaViT, models/ada_transformer_block.py); the
backbone is timm's VisionTransformer with the parameter names of timm's DeiT, so a dense DeiT checkpoint of
the same shape initialises it (only the decision heads are new, see `checkpoint_filter_fn`).

Decisions, made again in every block from that block's input (a patch dropped in one block can come back):
* patches: Linear(C -> 1) on each normed patch token (norm1's output), in every block; CLS is always kept;
* heads: Linear(C -> H) on the CLS token of the block input, from the second block on;
* blocks: Linear(C -> 2) on the CLS token, from the second block on: one gate for the attention branch,
  one for the MLP branch.
Training samples a binary Gumbel-sigmoid, sigmoid((logit + g1 - g2) / tau), tau = 5, and takes the hard
value (> threshold) with a straight-through gradient; evaluation thresholds sigmoid(logit). Thresholds: 0.5
for heads and blocks, 0.6 for patches (the reference's defaults).

Two inference paths that give the same outputs for the same decisions (tests/test_adavit.py):
* masked (`forward`, also the training path): what the reference does. A dropped head has its q, k, v
  zeroed; dropped patches are masked out of the keys (-inf before the softmax; a dropped query keeps its own
  key) and their attention and MLP outputs are multiplied by 0, so they ride the residual unchanged; a gated
  branch is multiplied by its gate. Nothing is removed, so it is slower than the dense model.
* fast (`forward_fast`, eval only): the work really is skipped. Per block, the samples whose attention
  (MLP) gate is on are gathered; their kept patches (plus CLS) are gathered, padded to the largest kept
  count among them with masked keys; the q/k/v rows and projection columns of the heads any of them keeps
  are sliced out of the weights (a sample's other heads are zeroed); the outputs are scattered back. At
  batch 1 there is no padding and the slicing is exact; a batch of inputs with similar kept counts wastes
  little on padding.

Choices where the paper and code leave room (each a constructor argument):
* `token_mlp=True`: patch decisions gate the MLP too (the reference's `ada_token_with_mlp`, used for its
  DeiT-S), so that a dropped patch costs nothing in the block;
* head decisions act on the attention only (q, k, v and the projection input), not on the MLP's channels;
* block 0 keeps its drop path; gated blocks have none (as the reference).

Usage loss (pipeline/losses.py:UsageLoss): 2 |mean(head) - t_h| + 2 |mean(block) - t_b| + 2 (mean(patch) -
t_p)^2, targets 0.5; the reference's optional diversity/entropy terms are not implemented.

Expected MACs (`expected_macs`): per input from its decisions, counted exactly as the project's common
counter counts the fast path for that input (tested against FlopCounterMode), averaged over the test set
by the evaluate stage, the way the paper reports them.

`deit_nano` / `ada_deit_nano`: for 32x32 single-channel inputs (Fashion-MNIST padded to 32): patch 4 (an 8x8
grid, 64 patches + CLS), DeiT-Ti's width divided by 4 with its 3 heads (dim 48, head dim 16), half its
depth (6 blocks), MLP ratio 4.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter_fn

__all__ = ["AdaViT", "AdaBlock", "gumbel_sigmoid"]

DECISIONS = ("patch", "head", "block")


def gumbel_sigmoid(logits: torch.Tensor, tau: float, threshold: float, training: bool) -> torch.Tensor:
    """Hard 0/1 decisions; in training, Gumbel-sigmoid samples with a straight-through gradient. In evaluation
    sigmoid(logit) > threshold, taken as logit > log(t / (1 - t)) (one comparison, the same in both paths)."""
    if training:
        g1 = -torch.empty_like(logits).exponential_().log()
        g2 = -torch.empty_like(logits).exponential_().log()
        soft = ((logits + g1 - g2) / tau).sigmoid()
        hard = (soft > threshold).to(soft.dtype)
    else:
        hard = (logits > math.log(threshold / (1 - threshold))).to(logits.dtype)
        if not torch.is_grad_enabled():
            return hard
        soft = logits.sigmoid()
    return hard - soft.detach() + soft


class AdaBlock(nn.Module):
    """A DeiT block (timm's parameter names) with decision heads; `depth` is its index in the network."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer=nn.LayerNorm, act_layer=nn.GELU, depth: int = 0, tau: float = 5.0,
                 head_threshold: float = 0.5, block_threshold: float = 0.5, patch_threshold: float = 0.6,
                 keep_layers: int = 1, token_mlp: bool = True, **_):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.tau, self.token_mlp = tau, token_mlp
        self.thresholds = {"head": head_threshold, "block": block_threshold, "patch": patch_threshold}
        self.norm1 = norm_layer(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.patch_select = nn.Linear(dim, 1)
        self.adaptive = depth >= keep_layers  # heads and blocks are decided from the second block on
        self.head_select = nn.Linear(dim, num_heads) if self.adaptive else None
        self.block_select = nn.Linear(dim, 2) if self.adaptive else None
        self.drop_path = nn.Identity() if self.adaptive or drop_path == 0 else DropPath(drop_path)

    def _decide(self, kind: str, logits: torch.Tensor) -> torch.Tensor:
        return gumbel_sigmoid(logits, self.tau, self.thresholds[kind], self.training)

    def decide(self, x: torch.Tensor, normed: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Head [B, H] and block [B, 2] decisions from the CLS token; patch [B, N-1] from the normed patches."""
        out = {}
        if self.adaptive:
            out["head"] = self._decide("head", self.head_select(x[:, 0]))
            out["block"] = self._decide("block", self.block_select(x[:, 0]))
        if normed is not None:
            out["patch"] = self._decide("patch", self.patch_select(normed[:, 1:]).squeeze(-1))
        return out

    # ------------------------------------------------------------------------------------- masked path
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, N, C = x.shape
        h = self.norm1(x)
        dec = self.decide(x, h)
        keep = torch.cat([dec["patch"].new_ones(B, 1), dec["patch"]], dim=1)  # [B, N], CLS kept
        H, d = self.num_heads, self.head_dim
        q, k, v = self.attn.qkv(h).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
        if "head" in dec:
            m = dec["head"][:, :, None, None]
            q, k, v = q * m, k * m, v * m
        policy = keep.detach() > 0
        allowed = (policy[:, None, :, None] & policy[:, None, None, :]) | torch.eye(N, dtype=torch.bool,
                                                                                      device=x.device)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        a = self.proj_drop(self.attn.proj(a.transpose(1, 2).reshape(B, N, C))) * keep[..., None]
        gate = dec["block"] if "block" in dec else None
        x = x + (a * gate[:, 0, None, None] if gate is not None else self.drop_path(a))
        m = self.mlp(self.norm2(x))
        if self.token_mlp:
            m = m * keep.detach()[..., None]  # the reference detaches the patch decision here
        x = x + (m * gate[:, 1, None, None] if gate is not None else self.drop_path(m))
        return x, dec

    # --------------------------------------------------------------------------------------- fast path
    @torch.no_grad()
    def forward_fast(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eval only: the same result as `forward`, computing only the kept patches, heads and branches."""
        B, N, C = x.shape
        dec = self.decide(x, None)
        if B == 1:
            return self._fast_one(x, dec)
        gate = dec["block"].bool() if "block" in dec else x.new_ones(B, 2, dtype=torch.bool)
        active = gate.any(dim=1)
        if not active.any():  # every branch of every sample gated off: the block is skipped
            dec["patch"] = x.new_zeros(B, N - 1)
            return x, dec
        h = self.norm1(x)
        patch = x.new_zeros(B, N - 1)
        patch[active] = self._decide("patch", self.patch_select(h[active][:, 1:]).squeeze(-1))
        dec["patch"] = patch
        keep = torch.cat([torch.ones_like(patch[:, :1], dtype=torch.bool), patch > 0], dim=1)
        idx, valid = _gather_index(keep)
        x = x.clone()
        rows = gate[:, 0].nonzero().squeeze(1)
        if len(rows):
            heads = dec["head"][rows].bool() if "head" in dec else None
            used = None if heads is None or heads.all() else heads.any(0).nonzero().squeeze(1)
            out = self._attention(_take(h[rows], idx[rows]), used, valid[rows],
                                  heads[:, used] if used is not None else None)
            _scatter_add(x, rows, idx[rows], out * valid[rows, :, None])
        rows = gate[:, 1].nonzero().squeeze(1)
        if len(rows):
            if self.token_mlp:
                out = self.mlp(self.norm2(_take(x[rows], idx[rows])))
                _scatter_add(x, rows, idx[rows], out * valid[rows, :, None])
            else:
                x[rows] += self.mlp(self.norm2(x[rows]))
        return x, dec

    def _fast_one(self, x: torch.Tensor, dec: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Batch 1: exact slicing of the kept tokens and heads, no padding or masks."""
        attn_on, mlp_on = dec["block"][0].bool().tolist() if "block" in dec else (True, True)
        if not (attn_on or mlp_on):
            dec["patch"] = x.new_zeros(1, x.shape[1] - 1)
            return x, dec
        h = self.norm1(x)
        dec["patch"] = self._decide("patch", self.patch_select(h[:, 1:]).squeeze(-1))
        idx = torch.cat([dec["patch"].new_zeros(1, dtype=torch.long), dec["patch"][0].nonzero().squeeze(1) + 1])
        x = x.clone()
        if attn_on:
            heads = dec["head"][0] if "head" in dec else None
            used = None if heads is None or heads.all() else heads.nonzero().squeeze(1)
            x.index_add_(1, idx, self._attention(h[:, idx], used))
        if mlp_on:
            if self.token_mlp:
                x.index_add_(1, idx, self.mlp(self.norm2(x[:, idx])))
            else:
                x += self.mlp(self.norm2(x))
        return x, dec

    def _attention(self, h: torch.Tensor, used: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                   head_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over gathered tokens h [b, n, C] with only the heads `used` (None: all of them). `valid`
        [b, n] marks real tokens among padding (None: all); `head_mask` [b, len(used)] zeroes the heads a
        sample does not keep (None: it keeps all of `used`)."""
        b, n, C = h.shape
        d, H = self.head_dim, self.num_heads
        qkv, proj = self.attn.qkv, self.attn.proj
        if used is None:
            w, bias, proj_w, u = qkv.weight, qkv.bias, proj.weight, H
        elif len(used) == 0:  # no head kept: the projection sees zeros and returns its bias
            return proj.bias.expand(b, n, C) if proj.bias is not None else h.new_zeros(b, n, C)
        else:
            u = len(used)
            w = qkv.weight.view(3, H, d, C)[:, used].reshape(3 * u * d, C)
            bias = qkv.bias.view(3, H, d)[:, used].reshape(-1) if qkv.bias is not None else None
            proj_w = proj.weight.view(C, H, d)[:, used].reshape(C, u * d)
        q, k, v = F.linear(h, w, bias).reshape(b, n, 3, u, d).permute(2, 0, 3, 1, 4)
        mask = None if valid is None or bool(valid.all()) else valid[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if head_mask is not None and not bool(head_mask.all()):
            a = a * head_mask[:, :, None, None].to(a.dtype)
        return F.linear(a.transpose(1, 2).reshape(b, n, u * d), proj_w, proj.bias)


def _gather_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the kept tokens first (in order), padded to the largest kept count; and their validity."""
    counts = keep.sum(1)
    n = int(counts.max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n]
    valid = torch.arange(n, device=keep.device)[None, :] < counts[:, None]
    return order, valid


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _scatter_add(x: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    index = idx[..., None].expand(-1, -1, x.shape[-1])
    if len(rows) == len(x):  # every sample: in place, no copy
        x.scatter_add_(1, index, values)
    else:
        x[rows] = x[rows].scatter_add(1, index, values)


class AdaViT(VisionTransformer):
    """DeiT (timm's VisionTransformer, class token) with AdaViT's decisions in every block.

    `forward` is the masked path and records the decisions of its input in `self.decisions`:
    patch [B, depth, N-1], head [B, depth-1, H], block [B, depth-1, 2] (from the second block on)."""

    def __init__(self, tau: float = 5.0, head_threshold: float = 0.5, block_threshold: float = 0.5,
                 patch_threshold: float = 0.6, token_mlp: bool = True, decision_bias: float = 0.0, **kwargs):
        block = partial(AdaBlock, tau=tau, head_threshold=head_threshold, block_threshold=block_threshold,
                        patch_threshold=patch_threshold, token_mlp=token_mlp)
        super().__init__(block_fn=block, **kwargs)
        if self.global_pool != "token" or self.num_prefix_tokens != 1:
            raise ValueError("AdaViT needs exactly one class token and global_pool='token' (DeiT)")
        # the decision heads' initial bias: 0 as in the reference (every logit starts near 0, so evaluation at
        # first drops every patch: sigmoid(0) < 0.6); a positive bias starts from "keep everything"
        for m in self.modules():
            if isinstance(m, AdaBlock):
                for head in (m.patch_select, m.head_select, m.block_select):
                    if head is not None:
                        nn.init.constant_(head.bias, decision_bias)
        self.decisions: dict[str, torch.Tensor] = {}

    def _run_blocks(self, x: torch.Tensor, fast: bool) -> torch.Tensor:
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        per_block = []
        for blk in self.blocks:
            x, dec = blk.forward_fast(x) if fast else blk(x)
            per_block.append(dec)
        self.decisions = {k: torch.stack([d[k] for d in per_block if k in d], dim=1) for k in DECISIONS}
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_blocks(x, fast=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The masked path (training and the reference's inference)."""
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits computing only the kept work (module docstring); same outputs as `forward`."""
        if self.training:
            raise RuntimeError("AdaViT.forward_fast is an inference path: call model.eval() first")
        return self.forward_head(self._run_blocks(x, fast=True))

    def usage(self) -> dict[str, torch.Tensor]:
        """Mean kept fraction of each decision kind over the last forward's batch."""
        return {k: v.mean() for k, v in self.decisions.items()}

    def expected_macs(self, decisions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """MACs of each input [B] given its decisions, as the common counter counts the fast path."""
        dec = {k: v.detach().double() for k, v in (decisions or self.decisions).items()}
        patch = dec["patch"]
        B, _, P = patch.shape
        C, H = self.embed_dim, self.blocks[0].num_heads
        d, hidden = C // H, self.blocks[0].mlp.fc1.out_features
        pe = self.patch_embed.proj
        macs = torch.full((B,), float(P * C * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1]),
                          dtype=torch.float64, device=patch.device)
        ones = torch.ones_like(macs)
        j = 0  # index among the adaptive blocks (head and block decisions start at the second block)
        for i, blk in enumerate(self.blocks):
            if blk.adaptive:
                heads, (ga, gm) = dec["head"][:, j].sum(1), (dec["block"][:, j] > 0).double().unbind(1)
                macs += C * H + 2 * C
                j += 1
            else:
                heads, ga, gm = H * ones, ones, ones
            n = patch[:, i].sum(1) + 1
            macs += ((ga + gm) > 0).double() * (P * C)  # the patch decision head of an active block
            hd = heads * d
            macs += ga * (heads > 0).double() * (3 * n * C * hd + 2 * n * n * hd + n * hd * C)
            macs += gm * 2 * (n if blk.token_mlp else (P + 1) * ones) * C * hidden
        return macs + C * self.num_classes


def checkpoint_filter_fn(state_dict: dict, model: AdaViT) -> dict:
    """A dense DeiT / ViT checkpoint of the same shape: timm's ViT key remapping, plus the model's own
    (freshly initialised) decision heads, which a dense checkpoint lacks; every other key must match."""
    state_dict = vit_filter_fn(state_dict, model)
    own = model.state_dict()
    return {**{k: v for k, v in own.items() if k not in state_dict and "_select." in k}, **state_dict}


def _cfg(**kwargs):
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "patch_embed.proj", "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({
    "ada_deit_tiny.untrained": _cfg(),
    "ada_deit_small.untrained": _cfg(),
    "ada_deit_nano.untrained": _cfg(input_size=(1, 32, 32), crop_pct=1.0),
    "deit_nano.untrained": _cfg(input_size=(1, 32, 32), crop_pct=1.0),
})

_NANO = {"img_size": 32, "patch_size": 4, "in_chans": 1, "embed_dim": 48, "depth": 6, "num_heads": 3}


def _create(cls, variant: str, pretrained: bool, filter_fn, **kwargs):
    return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)


@register_model
def ada_deit_tiny(pretrained=False, **kwargs) -> AdaViT:
    return _create(AdaViT, "ada_deit_tiny", pretrained, checkpoint_filter_fn,
                   **{"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs})


@register_model
def ada_deit_small(pretrained=False, **kwargs) -> AdaViT:
    return _create(AdaViT, "ada_deit_small", pretrained, checkpoint_filter_fn,
                   **{"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})


@register_model
def ada_deit_nano(pretrained=False, **kwargs) -> AdaViT:
    return _create(AdaViT, "ada_deit_nano", pretrained, checkpoint_filter_fn, **{**_NANO, **kwargs})


@register_model
def deit_nano(pretrained=False, **kwargs) -> VisionTransformer:
    """The dense DeiT of ada_deit_nano's shape (its initialisation and its T6 baseline)."""
    return _create(VisionTransformer, "deit_nano", pretrained, vit_filter_fn, **{**_NANO, **kwargs})
