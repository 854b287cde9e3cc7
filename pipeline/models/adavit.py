"""AdaViT (Meng et al., CVPR 2022, arXiv 2111.15668): per-input patch, head and block skipping on a DeiT.

Written against the paper and the authors' code (MengLcool/AdaViT at 9857f92: models/ada_transformer_block.py,
models/ada_t2t_vit.py, models/losses.py, ada_main.py) as its Ada-DeiT-S runs: `--ada-head --ada-layer
--ada-token-with-mlp`, everything else at ada_main.py's defaults. The backbone is timm's VisionTransformer with
the parameter names of timm's DeiT, so a dense DeiT checkpoint of the same shape initialises it, and the
reference's own checkpoints load too (`checkpoint_filter_fn`).

Decisions, made again in every block from that block's input (a patch dropped in one block can come back):
* blocks: Linear(C -> 2) on the CLS token of the block input, from the second block on: one gate for the
  attention branch, one for the MLP branch;
* heads: Linear(C -> H) on the same CLS token, from the second block on;
* patches: Linear(C -> 1) on each normed patch token (norm1's output), in every block; CLS is always kept.
Training samples a binary Gumbel-sigmoid, sigmoid((logit + g1 - g2) / tau), tau = 5, and takes the hard
value (> threshold) with a straight-through gradient; evaluation thresholds sigmoid(logit). Thresholds: 0.5
for heads and blocks, 0.6 for patches. The noise is drawn in the reference's order (block, head, patch).

What the decisions do, as the reference computes it (the masked path, `forward`, also the training path):
* a dropped head has its q, k, v zeroed and its d channels of the projection input zeroed; its d channels of
  the token are also zeroed at the MLP's input (the reference's "width select": fc1 reads only the kept heads'
  channels of norm2's output; fc1's hidden width and fc2 are not reduced);
* dropped patches are masked out of the keys (-inf before the softmax; a dropped query keeps its own key; this
  mask is detached) and their attention and MLP outputs are multiplied by the patch decision (the patch heads'
  gradient), so they ride the residual unchanged;
* the block gates multiply the attention and MLP branches; gated blocks have no drop path (block 0 keeps its).
Nothing is removed, so it is slower than the dense model.

Fast path (`forward_fast`, eval only): the same outputs for the same decisions (tests/test_adavit.py), with the
work really skipped. Per block, the samples whose attention (MLP) gate is on are gathered; their kept patches
(plus CLS) are gathered, padded to the largest kept count among them with masked keys; the q/k/v rows, the
projection columns and the fc1 columns of the heads any of them keeps are sliced out of the weights (a sample's
other heads are zeroed); the outputs are scattered back. At batch 1 there is no padding and the slicing is
exact; a batch of inputs with similar kept counts wastes little on padding.

Constructor arguments; each default is the reference's (another value is a deviation from it):
* `token_mlp=True`: patch decisions gate the MLP too (`--ada-token-with-mlp`);
* `detach_mlp_patch_gate=False`: the MLP's patch gate passes gradient to the patch heads (the reference's
  `--ada-token-detach-attn-at-mlp`, off by default; only the attention mask is detached);
* `train_pos_embed=False`: the position embedding is fixed: the sinusoid table of T2T-ViT until a checkpoint
  overwrites it (the reference's Ada-DeiT-S keeps its dense DeiT's, frozen). The reference holds it as a
  Parameter with requires_grad=False; here it is a buffer under the same key `pos_embed` (every parameter then
  trains, as timm's model tests require), and pipeline.measure.count_params counts it as the reference does;
* `decision_bias=0.0`: the decision heads' initial bias (the reference inits every Linear with bias 0, so
  evaluation at first drops every patch: sigmoid(0) < 0.6; a positive bias starts from "keep everything");
* `tau`, `head_threshold`, `block_threshold`, `patch_threshold`: as above.

Usage loss (pipeline/losses.py:UsageLoss, the reference's AdaLoss with ada_main.py's defaults).

Expected MACs (`expected_macs`): per input from its decisions, counted exactly as the project's common
counter counts the fast path for that input (tested against FlopCounterMode), averaged over the test set
by the evaluate stage, the way the paper reports them.

Checkpoints (`checkpoint_filter_fn`, timm's pretrained route, e.g. `timm.create_model('ada_deit_small',
pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`): our own; a dense DeiT / ViT of the same shape (no
decision key at all: the decision heads keep their fresh init); or the reference's (module.-prefixed keys under
state_dict_ema / state_dict / model; attn.query/key/value, attn.token_select.mlp_head, head_select.mlp_head and
layer_select.mlp_head). Any other missing or unexpected key is a ValueError, never a partial load.

Backbone API: `forward_intermediates` (so `features_only=True` works, through timm's FeatureGetterNet) and
`set_grad_checkpointing` (timm's), both on the masked path. The input size is fixed (`fixed_input_size` in the
pretrained config, as timm's DeiT: the reference's position table is for 14x14 patches); `set_input_size`
resamples the table as timm's ViT does. The masked path scripts (TorchScript; the decisions are then not
recorded in `self.decisions`) and traces (torch.fx).

`deit_nano` / `ada_deit_nano`: for 32x32 single-channel inputs (Fashion-MNIST padded to 32): patch 4 (an 8x8
grid, 64 patches + CLS), DeiT-Ti's width divided by 4 with its 3 heads (dim 48, head dim 16), half its
depth (6 blocks), MLP ratio 4.
"""

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter_fn
from torch.utils.checkpoint import checkpoint

from ._checkpoint import check_fits

__all__ = ["AdaViT", "AdaBlock", "gumbel_sigmoid", "sinusoid_table"]

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


def sinusoid_table(n: int, dim: int, device=None) -> torch.Tensor:
    """[1, n, dim]: position p, channel j -> sin (j even) or cos (j odd) of p / 10000^(2 floor(j / 2) / dim),
    the fixed position embedding of T2T-ViT that the reference's model starts from."""
    pos = torch.arange(n, dtype=torch.float64, device=device)[:, None]
    j = torch.arange(dim, dtype=torch.float64, device=device)
    angle = pos / 10000 ** (2 * (j // 2) / dim)
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float()[None]


class AdaBlock(nn.Module):
    """A DeiT block (timm's parameter names) with decision heads; `depth` is its index in the network."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer=nn.LayerNorm, act_layer=nn.GELU, depth: int = 0, tau: float = 5.0,
                 head_threshold: float = 0.5, block_threshold: float = 0.5, patch_threshold: float = 0.6,
                 keep_layers: int = 1, token_mlp: bool = True, detach_mlp_patch_gate: bool = False,
                 device=None, dtype=None, **_):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.tau, self.token_mlp, self.detach_mlp_patch_gate = tau, token_mlp, detach_mlp_patch_gate
        self.thresholds = {"head": head_threshold, "block": block_threshold, "patch": patch_threshold}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.attn.proj = nn.Linear(dim, dim, **dd)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.patch_select = nn.Linear(dim, 1, **dd)
        self.adaptive = depth >= keep_layers  # heads and blocks are decided from the second block on
        self.head_select = nn.Linear(dim, num_heads, **dd) if self.adaptive else None
        self.block_select = nn.Linear(dim, 2, **dd) if self.adaptive else None
        self.drop_path = nn.Identity() if self.adaptive or drop_path == 0 else DropPath(drop_path)

    def _decide(self, kind: str, logits: torch.Tensor) -> torch.Tensor:
        return gumbel_sigmoid(logits, self.tau, self.thresholds[kind], self.training)

    def decide(self, x: torch.Tensor, normed: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Block [B, 2] and head [B, H] decisions from the CLS token; patch [B, N-1] from the normed patches."""
        out: dict[str, torch.Tensor] = {}
        if self.block_select is not None and self.head_select is not None:  # self.adaptive, as TorchScript sees it
            out["block"] = self._decide("block", self.block_select(x[:, 0]))
            out["head"] = self._decide("head", self.head_select(x[:, 0]))
        if normed is not None:
            out["patch"] = self._decide("patch", self.patch_select(normed[:, 1:]).squeeze(-1))
        return out

    # ------------------------------------------------------------------------------------- masked path
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, N, C = x.shape
        H, d = self.num_heads, self.head_dim
        h = self.norm1(x)
        dec = self.decide(x, h)
        keep = torch.cat([dec["patch"].new_ones(B, 1), dec["patch"]], dim=1)  # [B, N], CLS kept
        q, k, v = self.attn.qkv(h).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        width: torch.Tensor | None = None  # [B, 1, C]: the channels of the kept heads
        if "head" in dec:
            m = dec["head"][:, :, None, None]
            q, k, v = q * m, k * m, v * m
            width = dec["head"].repeat_interleave(d, dim=1)[:, None]
        policy = keep.detach() > 0
        allowed = (policy[:, None, :, None] & policy[:, None, None, :]) | torch.eye(N, dtype=torch.bool,
                                                                                      device=x.device)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        a = a.transpose(1, 2).reshape(B, N, C)
        if width is not None:  # already 0 there; the reference masks the projection input too (its gradient)
            a = a * width
        a = self.proj_drop(self.attn.proj(a)) * keep[..., None]
        gate = dec.get("block")
        x = x + (a * gate[:, 0, None, None] if gate is not None else self.drop_path(a))
        h = self.norm2(x)
        m = self.mlp(h * width if width is not None else h)
        if self.token_mlp:
            m = m * (keep.detach() if self.detach_mlp_patch_gate else keep)[..., None]
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
        # under autocast the decision head answers in bf16 / fp16
        patch[active] = self._decide("patch", self.patch_select(h[active][:, 1:]).squeeze(-1)).to(patch.dtype)
        dec["patch"] = patch
        keep = torch.cat([torch.ones_like(patch[:, :1], dtype=torch.bool), patch > 0], dim=1)
        idx, valid = _gather_index(keep)
        x = x.clone()
        rows = gate[:, 0].nonzero().squeeze(1)
        if len(rows):
            used, mask = _kept_heads(dec["head"][rows] if "head" in dec else None)
            out = self._attention(_take(h[rows], idx[rows]), used, valid[rows], mask)
            _scatter_add(x, rows, idx[rows], out * valid[rows, :, None])
        rows = gate[:, 1].nonzero().squeeze(1)
        if len(rows):
            used, mask = _kept_heads(dec["head"][rows] if "head" in dec else None)
            if self.token_mlp:
                out = self._mlp(self.norm2(_take(x[rows], idx[rows])), used, mask)
                _scatter_add(x, rows, idx[rows], out * valid[rows, :, None])
            else:
                x[rows] += self._mlp(self.norm2(x[rows]), used, mask)
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
        used, _ = _kept_heads(dec.get("head"))
        x = x.clone()
        if attn_on:
            x.index_add_(1, idx, self._attention(h[:, idx], used))
        if mlp_on:
            if self.token_mlp:
                x.index_add_(1, idx, self._mlp(self.norm2(x[:, idx]), used))
            else:
                x += self._mlp(self.norm2(x), used)
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
        if head_mask is not None:
            a = a * head_mask[:, :, None, None].to(a.dtype)
        return F.linear(a.transpose(1, 2).reshape(b, n, u * d), proj_w, proj.bias)

    def _mlp(self, h: torch.Tensor, used: torch.Tensor | None = None,
             head_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP (eval: no dropout) on normed tokens h [b, n, C], fc1 reading only the channels of the heads
        `used` (None: all; none: fc1 returns its bias); `head_mask` [b, len(used)] zeroes a sample's others."""
        mlp, fc1 = self.mlp, self.mlp.fc1
        if used is None:
            hidden = fc1(h)
        else:
            b, n, C = h.shape
            H, d, u = self.num_heads, self.head_dim, len(used)
            h = h.reshape(b, n, H, d)[:, :, used]
            if head_mask is not None:
                h = h * head_mask[:, None, :, None].to(h.dtype)
            w = fc1.weight.view(fc1.out_features, H, d)[:, used].reshape(fc1.out_features, u * d)
            hidden = F.linear(h.reshape(b, n, u * d), w, fc1.bias)
        return mlp.fc2(mlp.norm(mlp.act(hidden)))


def _kept_heads(heads: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """From the head decisions [b, H] of the samples a branch runs for (None: the block has none): the heads any
    of them keeps (None: all, nothing to slice) and each sample's mask over those (None: each keeps all)."""
    if heads is None or bool(heads.bool().all()):
        return None, None
    heads = heads.bool()
    used = heads.any(0).nonzero().squeeze(1)
    mask = heads[:, used]
    return used, None if bool(mask.all()) else mask


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
    values = values.to(x.dtype)  # under autocast the branch answers in bf16 / fp16; the residual stream is fp32
    if len(rows) == len(x):  # every sample: in place, no copy
        x.scatter_add_(1, index, values)
    else:
        x[rows] = x[rows].scatter_add(1, index, values)


class AdaViT(VisionTransformer):
    """DeiT (timm's VisionTransformer, class token) with AdaViT's decisions in every block.

    `forward` is the masked path and records the decisions of its input in `self.decisions`:
    patch [B, depth, N-1], head [B, depth-1, H], block [B, depth-1, 2] (from the second block on)."""

    decisions: dict[str, torch.Tensor]  # in the class body, where TorchScript reads attribute types

    def __init__(self, tau: float = 5.0, head_threshold: float = 0.5, block_threshold: float = 0.5,
                 patch_threshold: float = 0.6, token_mlp: bool = True, detach_mlp_patch_gate: bool = False,
                 train_pos_embed: bool = False, decision_bias: float = 0.0, **kwargs):
        block = partial(AdaBlock, tau=tau, head_threshold=head_threshold, block_threshold=block_threshold,
                        patch_threshold=patch_threshold, token_mlp=token_mlp,
                        detach_mlp_patch_gate=detach_mlp_patch_gate)
        super().__init__(block_fn=block, **kwargs)
        self.blocks = nn.ModuleList(self.blocks)  # the blocks return (x, decisions): no Sequential (TorchScript)
        if self.global_pool != "token" or self.num_prefix_tokens != 1:
            raise ValueError("AdaViT needs exactly one class token and global_pool='token' (DeiT)")
        if not train_pos_embed:  # a fixed table, held as a buffer under the same key
            self._freeze_pos_embed(sinusoid_table(*self.pos_embed.shape[1:], device=self.pos_embed.device))
        for m in self.modules():
            if isinstance(m, AdaBlock):
                for head in (m.patch_select, m.head_select, m.block_select):
                    if head is not None:
                        nn.init.constant_(head.bias, decision_bias)
        self.decisions = {}

    def _freeze_pos_embed(self, table: torch.Tensor) -> None:
        """The reference's fixed position embedding (a Parameter with requires_grad=False there) as a buffer,
        so that every parameter of the model trains; `state_dict` keeps the key `pos_embed`."""
        dtype = self.pos_embed.dtype
        del self.pos_embed
        self.register_buffer("pos_embed", table.detach().to(dtype))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {k for k in super().no_weight_decay() if k != "pos_embed" or isinstance(self.pos_embed, nn.Parameter)}

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's ViT resize (the position embedding is resampled to the new grid); a fixed one stays fixed."""
        fixed = not isinstance(self.pos_embed, nn.Parameter)
        super().set_input_size(img_size, patch_size)
        if fixed and isinstance(self.pos_embed, nn.Parameter):
            self._freeze_pos_embed(self.pos_embed)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> [CLS; patch] tokens with the position embedding, before the blocks."""
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    @torch.jit.ignore
    def _run_blocks(self, x: torch.Tensor, fast: bool = False, take=(), stop: int | None = None,
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embed x and run the blocks (the first `stop`; None: all), recording their decisions in
        `self.decisions`; returns the last output (before the final norm) and the outputs of the blocks `take`."""
        x = self._embed(x)
        per_block, taken = [], []
        for i, blk in enumerate(self.blocks if stop is None else self.blocks[:stop]):
            if fast:
                x, dec = blk.forward_fast(x)
            elif self.grad_checkpointing and torch.is_grad_enabled():
                # non-reentrant: the decisions, a second output, keep their gradient for the usage loss
                x, dec = checkpoint(blk, x, use_reentrant=False)
            else:
                x, dec = blk(x)
            per_block.append(dec)
            if i in take:
                taken.append(x)
        self.decisions = {k: torch.stack([d[k] for d in per_block if k in d], dim=1)
                          for k in DECISIONS if any(k in d for d in per_block)}
        return x, taken

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # the same masked path; the decisions are not recorded
            x = self._embed(x)
            for blk in self.blocks:
                x, _ = blk(x)
            return self.norm(x)
        return self.norm(self._run_blocks(x)[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The masked path (training and the reference's inference)."""
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits computing only the kept work (module docstring); same outputs as `forward`."""
        if self.training:
            raise RuntimeError("AdaViT.forward_fast is an inference path: call model.eval() first")
        return self.forward_head(self.norm(self._run_blocks(x, fast=True)[0]))

    @torch.jit.ignore
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's backbone API (as VisionTransformer.forward_intermediates, without its attention-mask and dict
        options) on the masked path: the blocks' outputs `indices` (int: the last n; None: all), patch tokens as
        NCHW or NLC, with their class token if `return_prefix_tokens`; and the final features unless
        `intermediates_only`."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x, taken = self._run_blocks(x, take=take, stop=max_index + 1 if stop_early else None)
        taken = [self.norm(y) if norm else y for y in taken]
        prefix, intermediates = [y[:, :1] for y in taken], [y[:, 1:] for y in taken]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix, strict=True))
        return intermediates if intermediates_only else (self.norm(x), intermediates)

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
            hd = heads * d  # the kept heads' channels
            macs += ga * (heads > 0).double() * (3 * n * C * hd + 2 * n * n * hd + n * hd * C)
            tokens = n if blk.token_mlp else (P + 1) * ones
            macs += gm * tokens * hidden * (hd + C)  # fc1 reads the kept heads' channels only; fc2 is whole
        return macs + C * self.num_classes


# the reference's module names (models/ada_transformer_block.py) -> ours
_REFERENCE_NAMES = {".attn.token_select.mlp_head.": ".patch_select.", ".head_select.mlp_head.": ".head_select.",
                    ".layer_select.mlp_head.": ".block_select."}


def _from_reference(state_dict: dict) -> dict:
    """Rename the reference's keys to ours and concatenate its query/key/value into qkv; other keys unchanged."""
    out = {}
    for k, v in state_dict.items():
        for old, new in _REFERENCE_NAMES.items():
            k = k.replace(old, new)
        out[k] = v
    for q in [k for k in out if ".attn.query." in k]:
        parts = [q.replace(".query.", f".{p}.") for p in ("query", "key", "value")]
        if all(p in out for p in parts):  # else they stay, and are named as unexpected keys
            out[q.replace(".query.", ".qkv.")] = torch.cat([out.pop(p) for p in parts])
    return out


def checkpoint_filter_fn(state_dict: dict, model: AdaViT) -> dict:
    """Our checkpoint, the reference's, or a dense DeiT / ViT of the same shape (module docstring): renamed
    to our keys, with timm's ViT remapping (position-embedding and patch-embedding resampling). A checkpoint
    with no decision key at all is a dense one: the model's (freshly initialised) decision heads fill in.
    Every other key must match both ways; the classifier is left to timm's loader (dropped when the class
    counts differ, else loaded strictly), and shapes to load_state_dict (which names any mismatch). timm's
    loader has already taken the weights out of a training checkpoint (`state_dict_ema`, `model_ema`,
    `state_dict`, `model`, the reference's order) and removed the `module.` prefix."""
    state_dict = vit_filter_fn(_from_reference(state_dict), model)
    own = model.state_dict()
    if not any("_select." in k for k in state_dict):
        state_dict.update({k: v for k, v in own.items() if "_select." in k})
    check_fits(state_dict, model, f"depth {len(model.blocks)}, dim {model.embed_dim}")
    return state_dict


def _cfg(**kwargs):
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "patch_embed.proj", "classifier": "head", "fixed_input_size": True, **kwargs}


default_cfgs = generate_default_cfgs({
    "ada_deit_tiny.untrained": _cfg(),
    "ada_deit_small.untrained": _cfg(),
    "ada_deit_nano.untrained": _cfg(input_size=(1, 32, 32), crop_pct=1.0),
    "deit_nano.untrained": _cfg(input_size=(1, 32, 32), crop_pct=1.0),
})

_NANO = {"img_size": 32, "patch_size": 4, "in_chans": 1, "embed_dim": 48, "depth": 6, "num_heads": 3}


def _create(cls, variant: str, pretrained: bool, filter_fn, **kwargs):
    # features_only through forward_intermediates (timm's FeatureGetterNet), the last 3 blocks as timm's ViTs
    return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=filter_fn,
                                feature_cfg={"out_indices": 3, "feature_cls": "getter"}, **kwargs)


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


class FastPath(nn.Module):
    """An AdaViT whose forward is its fast path (`forward_fast`), so that a benchmark times it like any model."""

    def __init__(self, model: AdaViT):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_fast(x)


def fast_path_label(label: str) -> str:
    """The benchmark row of an AdaViT architecture's fast path."""
    return label + " (fast path)"
