"""LightViT (Huang et al. 2022, arXiv 2207.05557): convolution-free hierarchical ViT with global tokens.

Written against the authors' ImageNet code (hunto/image_classification_sota, lib/models/lightvit.py) and
its detection variant (hunto/LightViT, detection/lightvit.py); parameter names follow the reference, so its
checkpoints load after dropping the `relative_position_index` buffers (see `checkpoint_filter_fn`).

* Conv stem, total stride 8 (no residuals): conv3x3 s2 (in -> C/2) + BN + GELU, two depthwise 3x3 s1
  + BN + GELU, depthwise 3x3 s2 + BN + GELU, conv3x3 s2 (C/2 -> C, bias), LayerNorm. Three stages follow at
  stride 8/16/32.
* T learnable global tokens [1, T, C0] are prepended to the image tokens and carried through all stages.
* Downsampling (residual patch merge): LN(4C) + Linear(4C -> C', no bias) over the 2x2 neighbours, plus
  MaxPool 2x2 + Linear(C -> C', no bias); the global tokens are re-projected by LN + Linear(C -> C', no bias).
* Attention: one qkv Linear over [global; image] tokens, head dim 32. Local: 7x7 non-shifted window
  attention with a per-layer relative position bias table. Global aggregation: the global tokens' queries
  attend over all image tokens. Global broadcast: Linear(C -> 2C) turns the new global tokens into k, v,
  which every image query attends to; added to the local output. Then Linear(C -> C) on [global; image].
* FFN: fc1 + GELU + fc2, then the bi-dimensional gate: LN; channel gate sigmoid(Linear(GELU(Linear(mean))))
  [B, 1, C]; spatial gate sigmoid(Linear(cat[GELU(Linear(x)), broadcast global])) [B, N, 1].
* Head: LN(eps 1e-6) -> neck Linear(C -> 1280) + LN + GELU per token -> mean over all tokens (global
  ones too) -> Linear(1280 -> classes).

LayerNorm eps as in the reference: 1e-6 in the blocks (norm1/norm2) and the final norm, PyTorch's 1e-5 in the
stem, the patch merge, the FFN gate and the neck. As in the reference, dropout (`drop_rate`) acts in the FFN
only (the reference defines but never applies an output dropout in attention) and attention dropout
(`attn_drop_rate`) on the attention weights.

Input sizes. The reference classification code requires every stage grid to be a multiple of the window
(224 px -> 28/14/7 with window 7) and even before each merge. Here any size works, as in the reference's
detection code: window attention pads the image-token grid with zeros on the bottom/right up to a multiple of
the window and crops the output back; unlike the detection code, padded keys are masked out (-inf before the
softmax), so the output for the real tokens does not depend on the padding. Padded tokens never enter the
global aggregation, broadcast or FFN. A patch merge on an odd grid zero-pads one row/column first (as the
detection code does) and gives ceil(H/2) x ceil(W/2).

`lightvit_nano` is a *modified LightViT* for 32x32 single-channel inputs (Fashion-MNIST padded to 32): at
stride 8/16/32 the reference would leave 4x4, 2x2 and 1x1 grids, smaller than one 7x7 window. Changes vs.
lightvit_tiny and why:
  - stem stride 2 instead of 8 (the last depthwise conv and the projection conv use stride 1): stage grids
    16x16, 8x8, 4x4 at 32 px (14, 7, 4 at 28 px, via padding);
  - window 4 instead of 7: 16/4/1 windows per stage, the same 16/4/1 layout as the reference at 224 px
    (28/14/7 with window 7), so the last stage's window is global as in the reference;
  - lightvit_tiny's widths divided by 4: dims 16/32/64 and neck 320 (tiny: 64/128/256, neck 1280), heads
    1/2/4 (head dim 16 instead of 32, so that stage 1 keeps one full head), depths 2/2/2 instead of 2/6/6;
    8 global tokens and MLP ratios 8/4/4 unchanged. About 0.21M parameters at 10 classes and 9.3M MACs per
    32x32 image (riformer_nano: 7.2M, gfnet_nano: 15.1M), so it trains on CPU.

timm's backbone API: `forward_intermediates` (each stage's image tokens as [B, C, h, w]; the global tokens are
left out), `prune_intermediate_layers`, `features_only=True` (timm's FeatureGetterNet) and
`set_grad_checkpointing` (each block recomputed in the backward pass). `forward_features` ends with the neck, as
the reference's does (there it also takes the mean). The model scripts (TorchScript) and traces (torch.fx: the
grid-dependent padding is in leaf functions, `register_notrace_function`).
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, calculate_drop_path_rates, get_device_dtype, register_notrace_function, trunc_normal_
from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, named_apply
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import init_weights_vit_timm

from ._checkpoint import check_fits

__all__ = ["LightViT", "LightViTAttention", "LightViTBlock", "ResidualMergePatch"]

# stride of the five stem convolutions for each supported total stem stride
_STEM_STRIDES = {8: (2, 1, 1, 2, 2), 4: (2, 1, 1, 2, 1), 2: (2, 1, 1, 1, 1)}


class ConvStem(nn.Module):
    """Conv stem: [B, in, H, W] -> tokens [B, H/s * W/s, C] and the grid (H/s, W/s), s in {2, 4, 8}."""

    def __init__(self, in_chans: int, embed_dim: int, stride: int = 8, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if stride not in _STEM_STRIDES:
            raise ValueError(f"LightViT stem stride must be one of {sorted(_STEM_STRIDES)}, got {stride}")
        s = _STEM_STRIDES[stride]
        mid = embed_dim // 2
        layers = []
        for i, st in enumerate(s[:4]):
            cin = in_chans if i == 0 else mid
            layers += [nn.Conv2d(cin, mid, 3, st, 1, groups=1 if i == 0 else mid, bias=False, **dd),
                       nn.BatchNorm2d(mid, **dd), nn.GELU()]
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(mid, embed_dim, 3, s[4], 1, **dd)
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(self.stem(x))
        H, W = x.shape[2], x.shape[3]
        return self.norm(x.flatten(2).transpose(1, 2)), (H, W)


def relative_position_index(ws: int) -> torch.Tensor:
    """[ws*ws, ws*ws] index into a (2ws-1)^2 table of the relative offset (dy, dx) of key j from query i."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (ws - 1)  # [2, A, A], each in [0, 2ws-2]
    return rel[0] * (2 * ws - 1) + rel[1]


class LightViTAttention(nn.Module):
    """Local window attention + global aggregation + global broadcast over [global; image] tokens."""

    def __init__(self, dim: int, num_heads: int, num_tokens: int, window_size: int = 7, qkv_bias: bool = True,
                 attn_drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"LightViT: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.num_tokens, self.window_size = num_heads, num_tokens, window_size
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.kv_global = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads, **dd))
        self.register_buffer("relative_position_index", relative_position_index(window_size).flatten().to(device),
                             persistent=False)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> torch.Tensor:
        """[1, heads, A, A] with A = window_size ** 2."""
        area = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(area, area, -1).permute(2, 0, 1).unsqueeze(0)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        T, nh = self.num_tokens, self.num_heads
        q, k, v = self.qkv(x).view(B, N, 3, nh, C // nh).permute(2, 0, 3, 1, 4).unbind(0)
        q_img, k_img, v_img = q[:, :, T:], k[:, :, T:], v[:, :, T:]
        x_img = window_attention(q_img, k_img, v_img, self.position_bias().to(q.dtype), H, W, self.window_size,
                                 self.attn_drop if self.training else 0.0)
        # global aggregation: global queries over all image tokens
        x_glb = self._attend(q[:, :, :T], k_img, v_img).transpose(1, 2).reshape(B, T, C)
        # global broadcast: image queries over the new global tokens
        k_glb, v_glb = self.kv_global(x_glb).view(B, T, 2, nh, C // nh).permute(2, 0, 3, 1, 4).unbind(0)
        x_img = x_img + self._attend(q_img, k_glb, v_glb).transpose(1, 2).reshape(B, N - T, C)
        return self.proj(torch.cat([x_glb, x_img], dim=1))


@register_notrace_function  # a leaf of torch.fx graphs: the padding depends on the grid size
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, H: int, W: int,
                     ws: int, dropout_p: float) -> torch.Tensor:
    """Attention within ws x ws windows among image tokens [B, heads, H*W, d] -> [B, H*W, heads*d], with the
    relative position `bias` [1, heads, A, A] (A = ws*ws). The grid is zero-padded on the bottom/right to a
    multiple of ws; the padded keys are masked out (-inf), every window keeps a real key."""
    B, nh, _, d = q.shape
    Hp, Wp = (H + ws - 1) // ws * ws, (W + ws - 1) // ws * ws
    gh, gw = Hp // ws, Wp // ws
    mask = bias
    if Hp != H or Wp != W:  # mask the padded keys: [gh*gw, 1, 1, A]
        valid = torch.zeros(Hp, Wp, dtype=torch.bool, device=q.device)
        valid[:H, :W] = True
        valid = valid.view(gh, ws, gw, ws).permute(0, 2, 1, 3).reshape(gh * gw, 1, 1, ws * ws)
        pad = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill(~valid, float("-inf"))
        mask = (bias + pad).unsqueeze(0).expand(B, -1, -1, -1, -1).reshape(B * gh * gw, nh, ws * ws, ws * ws)
    x = F.scaled_dot_product_attention(_partition(q, H, W, ws), _partition(k, H, W, ws), _partition(v, H, W, ws),
                                       attn_mask=mask, dropout_p=dropout_p)  # [B*gh*gw, heads, A, d]
    x = x.view(B, gh, gw, nh, ws, ws, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Hp, Wp, nh * d)
    return x[:, :H, :W].reshape(B, H * W, nh * d)


def _partition(t: torch.Tensor, H: int, W: int, ws: int) -> torch.Tensor:
    """[B, heads, H*W, d] -> [B*windows, heads, ws*ws, d], zero-padding the grid to a multiple of ws."""
    B, nh, _, d = t.shape
    Hp, Wp = (H + ws - 1) // ws * ws, (W + ws - 1) // ws * ws
    t = t.reshape(B, nh, H, W, d)
    if Hp != H or Wp != W:
        t = F.pad(t, (0, 0, 0, Wp - W, 0, Hp - H))
    t = t.view(B, nh, Hp // ws, ws, Wp // ws, ws, d).permute(0, 2, 4, 1, 3, 5, 6)
    return t.reshape(-1, nh, ws * ws, d)


@register_notrace_function  # a leaf of torch.fx graphs: the padding depends on the grid size
def pad_to_even(x: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] zero-padded by one row / column at the bottom / right where H / W is odd."""
    return F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))


class BiAttn(nn.Module):
    """Bi-dimensional (channel x spatial) gate of the FFN output."""

    def __init__(self, dim: int, act_ratio: float = 0.25, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        reduced = int(dim * act_ratio)
        self.norm = nn.LayerNorm(dim, **dd)
        self.global_reduce = nn.Linear(dim, reduced, **dd)
        self.local_reduce = nn.Linear(dim, reduced, **dd)
        self.act_fn = nn.GELU()
        self.channel_select = nn.Linear(reduced, dim, **dd)
        self.spatial_select = nn.Linear(2 * reduced, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        g = self.act_fn(self.global_reduce(y.mean(dim=1, keepdim=True)))  # [B, 1, C/4]
        local = self.act_fn(self.local_reduce(y))  # [B, N, C/4]
        channel = torch.sigmoid(self.channel_select(g))  # [B, 1, C]
        spatial = torch.sigmoid(self.spatial_select(torch.cat([local, g.expand_as(local)], dim=-1)))  # [B, N, 1]
        return x * (channel * spatial)


class BiAttnMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, **dd)
        self.attn = BiAttn(dim, **dd)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.drop(self.act(self.fc1(x))))
        return self.drop(self.attn(x))


class LightViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_tokens: int, window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        norm_layer = partial(nn.LayerNorm, eps=1e-6, **dd)
        self.norm1 = norm_layer(dim)
        self.attn = LightViTAttention(dim, num_heads, num_tokens, window_size, qkv_bias, attn_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = BiAttnMlp(dim, int(dim * mlp_ratio), drop, **dd)

    def forward(self, x: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """(tokens, grid) -> (tokens, grid), as ResidualMergePatch: a stage is one loop over both kinds."""
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x))), (H, W)


class ResidualMergePatch(nn.Module):
    """2x2 patch merge + max-pool residual on the image tokens; LN + Linear on the global tokens."""

    def __init__(self, dim: int, out_dim: int, num_tokens: int, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_tokens = num_tokens
        self.norm = nn.LayerNorm(4 * dim, **dd)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.proj = nn.Linear(dim, out_dim, bias=False, **dd)
        self.res_proj = nn.Linear(dim, out_dim, bias=False, **dd)

    def forward(self, x: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, tuple[int, int]]:
        glb, x = x[:, :self.num_tokens], x[:, self.num_tokens:]
        B, _, C = x.shape
        x = pad_to_even(x.reshape(B, H, W, C))
        Ho, Wo = x.shape[1] // 2, x.shape[2] // 2
        res = self.res_proj(F.max_pool2d(x.permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2))
        # neighbour order (0,0), (1,0), (0,1), (1,1) as in the reference (Swin's patch merging)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        x = self.reduction(self.norm(x.reshape(B, Ho * Wo, 4 * C))) + res
        return torch.cat([self.proj(self.norm2(glb)), x], dim=1), (Ho, Wo)


class LightViT(nn.Module):
    """LightViT. `patch_size` is the total stride of the conv stem (8 in the paper; 4 or 2 for small inputs).

    As in the reference, `forward_features` ends with the neck, so its tokens [B, T + h*w, neck_dim] are what
    the head pools (`num_features` = `head_hidden_size` = neck_dim); `global_pool` 'avg' is the reference's
    mean over all tokens, '' leaves the tokens unpooled."""

    def __init__(self, img_size=None, patch_size: int = 8, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims=(64, 128, 256), depths=(2, 6, 6), num_heads=(2, 4, 8), mlp_ratios=(8, 4, 4),
                 num_tokens: int = 8, window_size: int = 7, neck_dim: int = 1280, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 global_pool: str = "avg", device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        # img_size is accepted for timm compatibility only: the model takes any input size.
        if not len(embed_dims) == len(depths) == len(num_heads) == len(mlp_ratios):
            raise ValueError("LightViT: embed_dims, depths, num_heads and mlp_ratios need one entry per stage")
        self.num_classes, self.in_chans, self.global_pool = num_classes, in_chans, _check_pool(global_pool)
        self.patch_size, self.window_size, self.num_tokens = patch_size, window_size, num_tokens
        self.embed_dims, self.depths = tuple(embed_dims), tuple(depths)
        self.num_features = self.head_hidden_size = neck_dim
        self.grad_checkpointing = False
        self.feature_info = [dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"stages.{i}")
                             for i, dim in enumerate(embed_dims)]
        self.patch_embed = ConvStem(in_chans, embed_dims[0], patch_size, **dd)
        self.global_token = nn.Parameter(torch.zeros(1, num_tokens, embed_dims[0], **dd))
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))  # linear over all blocks
        stages = []
        for i, (dim, depth, heads, ratio) in enumerate(zip(embed_dims, depths, num_heads, mlp_ratios, strict=True)):
            blocks = [ResidualMergePatch(embed_dims[i - 1], dim, num_tokens, **dd)] if i > 0 else []
            start = sum(depths[:i])
            blocks += [LightViTBlock(dim, heads, num_tokens, window_size, ratio, qkv_bias, drop_rate,
                                     attn_drop_rate, dpr[start + j], **dd) for j in range(depth)]
            stages.append(nn.ModuleList(blocks))
        self.stages = nn.ModuleList(stages)  # blocks take (x, H, W): no Sequential
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6, **dd)
        self.neck = nn.Sequential(nn.Linear(embed_dims[-1], neck_dim, **dd), nn.LayerNorm(neck_dim, **dd), nn.GELU())
        self.head = nn.Linear(neck_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.global_token, std=0.02)
        # timm's ViT init: trunc-normal(0.02) Linear weights, zero biases; other modules keep PyTorch's
        # defaults (norms start at 1 / 0, as the reference sets them)
        named_apply(partial(init_weights_vit_timm, needs_reset=False), self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Exact parameter names: the global tokens and every relative position bias table."""
        return {"global_token"} | {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, device=None, dtype=None) -> None:
        """A new classifier on the model's device and dtype (unless given); `global_pool` None keeps the pooling."""
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.num_classes = num_classes
        self.head = (nn.Linear(self.head_hidden_size, num_classes, **get_device_dtype(self, device, dtype))
                     if num_classes > 0 else nn.Identity()).train(self.training)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, in, H, W] -> [global; image] tokens [B, T + h*w, C] and the grid (h, w)."""
        x, grid = self.patch_embed(x)
        return torch.cat([self.global_token.expand(x.shape[0], -1, -1), x], dim=1), grid

    @torch.jit.ignore
    def _stage(self, stage: nn.ModuleList, x: torch.Tensor, grid: tuple[int, int]):
        """One stage for forward_intermediates; forward_features runs the same loop inline (TorchScript cannot
        pass a container to a method)."""
        for block in stage:
            x, grid = checkpoint(block, x, *grid) if self.grad_checkpointing else block(x, *grid)
        return x, grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in, H, W] -> tokens [B, T + h*w, neck_dim] (global tokens first): final norm, then the neck."""
        x, (H, W) = self._embed(x)
        for stage in self.stages:
            for block in stage:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x, (H, W) = checkpoint(block, x, H, W)
                else:
                    x, (H, W) = block(x, H, W)
        return self.neck(self.norm(x))

    @torch.jit.ignore
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's backbone API: the image tokens after each stage of `indices` (last n if an int, all if None)
        as [B, C, h, w] ('NCHW') or [B, h, w, C] ('NHWC'); `norm` applies the final norm to the last stage's.
        Returns the intermediates, or (the final tokens, as forward_features gives them, intermediates)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"LightViT: output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_stage = len(self.embed_dims) - 1
        stages = self.stages[:max_index + 1] if stop_early or intermediates_only else self.stages
        intermediates = []
        x, grid = self._embed(x)
        for i, stage in enumerate(stages):
            x, grid = self._stage(stage, x, grid)
            if i in take_indices:
                y = self.norm(x) if norm and i == last_stage else x
                y = y[:, self.num_tokens:].reshape(y.shape[0], *grid, -1)
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return (self.neck(self.norm(x)) if len(stages) == len(self.stages) else x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last one of `indices` (the final norm, sized for the last stage, goes with
        them), and the neck and classifier with `prune_head`; returns the absolute indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.neck = nn.Identity()
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
            self.reset_classifier(0)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_pool(global_pool: str) -> str:
    if global_pool not in ("avg", ""):
        raise ValueError(f"LightViT: global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    return global_pool


def checkpoint_filter_fn(state_dict: dict, model: LightViT) -> dict:
    """A reference or our own checkpoint as a state dict of `model`: the names are the same; the reference's
    `relative_position_index` buffers are recomputed here, so they are dropped. The reference's training
    checkpoints keep the weights under 'model' (its converted ones under 'state_dict'). A key that maps to
    nothing, a model key the checkpoint lacks or a shape mismatch is a ValueError naming them; the classifier
    and the first conv's input channels are left to timm's loader (it drops / adapts them), which has already
    taken the weights out of the checkpoint's 'model' / 'state_dict' entry."""
    out = {k: v for k, v in state_dict.items() if not k.endswith("relative_position_index")}
    check_fits(out, model, f"dims {list(model.embed_dims)}, depths {list(model.depths)}")
    return out


def _cfg(**kwargs):
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "patch_embed.stem.0", "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({
    "lightvit_tiny.untrained": _cfg(),
    "lightvit_small.untrained": _cfg(),
    "lightvit_base.untrained": _cfg(),
    "lightvit_nano.untrained": _cfg(input_size=(1, 32, 32), crop_pct=1.0),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> LightViT:
    out_indices = kwargs.pop("out_indices", len(kwargs["embed_dims"]))  # features_only: every stage
    return build_model_with_cfg(LightViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **kwargs)


# Shapes of the reference's lightvit_tiny/small/base; drop-path rates of its README (0.1, base 0.3).
@register_model
def lightvit_tiny(pretrained=False, **kwargs) -> LightViT:
    return _create("lightvit_tiny", pretrained, **{
        "embed_dims": (64, 128, 256), "depths": (2, 6, 6), "num_heads": (2, 4, 8), "mlp_ratios": (8, 4, 4),
        "num_tokens": 8, "drop_path_rate": 0.1, **kwargs})


@register_model
def lightvit_small(pretrained=False, **kwargs) -> LightViT:
    return _create("lightvit_small", pretrained, **{
        "embed_dims": (96, 192, 384), "depths": (2, 6, 6), "num_heads": (3, 6, 12), "mlp_ratios": (8, 4, 4),
        "num_tokens": 16, "drop_path_rate": 0.1, **kwargs})


@register_model
def lightvit_base(pretrained=False, **kwargs) -> LightViT:
    return _create("lightvit_base", pretrained, **{
        "embed_dims": (128, 256, 512), "depths": (3, 8, 6), "num_heads": (4, 8, 16), "mlp_ratios": (8, 4, 4),
        "num_tokens": 24, "drop_path_rate": 0.3, **kwargs})


# Modified LightViT for 32x32 single-channel inputs (see the module docstring): stem stride 2, window 4.
@register_model
def lightvit_nano(pretrained=False, **kwargs) -> LightViT:
    return _create("lightvit_nano", pretrained, **{
        "patch_size": 2, "in_chans": 1, "window_size": 4, "embed_dims": (16, 32, 64), "depths": (2, 2, 2),
        "num_heads": (1, 2, 4), "mlp_ratios": (8, 4, 4), "num_tokens": 8, "neck_dim": 320,
        "drop_path_rate": 0.1, **kwargs})
