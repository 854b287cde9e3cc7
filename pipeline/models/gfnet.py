"""GFNet (Rao et al., NeurIPS 2021): the RIFormer paper's logit teacher (riformer.md Sec. 2).

Written against the authors' code (raoyongming/GFNet at 2de48b6: gfnet.py, and main_gfnet.py for the
variants' hyperparameters).

* Global filter token mixer (GlobalFilter): rfft2 over the token grid (norm 'ortho'), multiply by a learned
  complex weight of shape (H, W//2+1, C), irfft2 back to (H, W). The filter fixes the input size, so a model
  built for one size raises a clear error on another (square inputs only, as the reference).
* Block: x + DropPath(MLP(LN2(GlobalFilter(LN1(x))))); the hierarchical models use the layer-scale form
  x + DropPath(gamma * MLP(...)) (reference BlockLayerScale). LayerNorm eps 1e-6 throughout.
* Hierarchical GFNet-H-* (GFNetPyramid): conv patch embedding (patch 4), then four stages with a 2x2 stride-2
  conv (DownLayer) before stages 2-4. Flat GFNet-B (GFNet): one stage after a patch-16 embedding.
* An absolute position embedding is added after the patch embedding. Head: final LN, mean over tokens,
  dropout `dropcls`, Linear.
* Dropout as in the reference: `drop_rate` inside every MLP (after GELU and after fc2) and after the position
  embedding of the flat model only (GFNetPyramid defines that dropout but never applies it); `dropcls` before
  the classifier. Both default to 0, as in main_gfnet.py.

Deviations, none of which changes the function: tokens stay [B, H, W, C] throughout (the reference keeps
[B, N, C] and reshapes to the grid inside each filter and downsampling), and the filter casts its float32 FFT
result back to the input dtype. Module names differ from the reference (`downsample.{i}` for its
`patch_embed.{i}`, `stages.{i}.{j}` for `blocks.{i}.{j}`, `pos_embed` [1, H, W, C] for [1, N, C]), so that
our own checkpoints keep loading; `checkpoint_filter_fn` maps an official checkpoint onto them, and
    timm.create_model("gfnet_h_b", pretrained=True, pretrained_cfg_overlay=dict(file="gfnet-h-b.pth"))
loads one. A checkpoint it cannot map is a ValueError naming the keys.

timm's backbone API: `forward_intermediates`, `prune_intermediate_layers`, `features_only=True` (timm's
FeatureGetterNet), `set_grad_checkpointing`. The features are each stage's output for a hierarchical model and
each block's output for the flat one (as timm's ViT). The model scripts (TorchScript) and traces (torch.fx:
the size checks are leaf functions, `register_notrace_function`).
"""

import re
from functools import partial

import torch
import torch.nn as nn
from timm.layers import (
    DropPath,
    Mlp,
    calculate_drop_path_rates,
    get_device_dtype,
    register_notrace_function,
    trunc_normal_,
)
from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq, named_apply
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import init_weights_vit_timm

from ._checkpoint import check_fits

__all__ = ["GFNet", "GlobalFilter", "checkpoint_filter_fn"]


@register_notrace_function  # a leaf of torch.fx graphs: its Python `if` on the shape is not traced
def check_size(x: torch.Tensor, size: tuple[int, int], what: str) -> torch.Tensor:
    """x unchanged if its dims 1-2 (a [B, H, W, C] token grid) or 2-3 (a [B, C, H, W] image, what='input') are
    `size`; else a ValueError saying that the global filters fix the input size."""
    H, W = (x.shape[2], x.shape[3]) if what == "input" else (x.shape[1], x.shape[2])
    if H != size[0] or W != size[1]:
        raise ValueError(f"GFNet was built for a {size[0]}x{size[1]} {what} but got {H}x{W}: its global filters "
                         f"fix the input size; create it with img_size matching the data (square inputs only)")
    return x


class GlobalFilter(nn.Module):
    def __init__(self, dim: int, h: int, w: int, device=None, dtype=None):
        super().__init__()
        self.size = (h, w)
        self.complex_weight = nn.Parameter(torch.randn(h, w // 2 + 1, dim, 2, device=device, dtype=dtype) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_size(x, self.size, "token grid")
        H, W = x.shape[1], x.shape[2]
        dtype = x.dtype
        x = torch.fft.rfft2(x.float(), dim=(1, 2), norm="ortho")
        # float32 for the FFT at any dtype; contiguous also after model.to(memory_format=torch.channels_last)
        x = x * torch.view_as_complex(self.complex_weight.float().contiguous())
        x = torch.fft.irfft2(x, s=(H, W), dim=(1, 2), norm="ortho")
        return x.to(dtype)


class GFNetBlock(nn.Module):
    """x + DropPath(gamma * MLP(LN2(GlobalFilter(LN1(x))))), gamma only with a layer scale."""

    def __init__(self, dim: int, size: tuple[int, int], mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale: float | None = None, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        norm_layer = partial(nn.LayerNorm, eps=1e-6, **dd)
        self.norm1 = norm_layer(dim)
        self.filter = GlobalFilter(dim, *size, **dd)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop, **dd)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim, **dd)) if layer_scale is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm2(self.filter(self.norm1(x))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y)


class ConvEmbed(nn.Module):
    """Non-overlapping conv patch embedding / 2x2 stride-2 downsampling, on [B, H, W, C] tokens."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size=stride, stride=stride, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class GFNet(nn.Module):
    """GFNet with one or more stages. One stage with patch 16 is GFNet-B; four with patch 4 is GFNet-H.

    Features are token grids [B, h, w, C] (`output_fmt` 'NHWC', as timm's Swin); `global_pool` 'avg' (the
    reference's mean over tokens) or '' (no pooling: `forward_head(pre_logits=True)` returns the grid)."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000,
                 embed_dims=(96, 192, 384, 768), depths=(3, 3, 27, 3), mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, layer_scale: float | None = 1e-6,
                 dropcls: float = 0.0, global_pool: str = "avg", device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _check_pool(global_pool)
        if isinstance(img_size, (tuple, list)):  # timm passes the cfg's (H, W) for fixed-size models
            if img_size[0] != img_size[1]:
                raise ValueError(f"GFNet supports square inputs only, got img_size {tuple(img_size)}")
            img_size = img_size[0]
        grid = img_size // patch_size
        if img_size % patch_size or grid % (2 ** (len(depths) - 1)):
            raise ValueError(f"GFNet: img_size {img_size} must be divisible by patch {patch_size} and leave a "
                             f"grid divisible by {2 ** (len(depths) - 1)} for {len(depths)} stages")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dims[0], **dd))
        # the reference's GFNetPyramid creates this dropout but never calls it (gfnet.py, forward_features)
        self.pos_drop = nn.Dropout(drop_rate) if len(depths) == 1 else nn.Identity()
        dpr = iter(calculate_drop_path_rates(drop_path_rate, sum(depths)))  # linear over all blocks (gfnet.py)
        self.downsample = nn.ModuleList()
        self.stages = nn.ModuleList()
        prev = in_chans
        for i, (dim, depth) in enumerate(zip(embed_dims, depths, strict=True)):
            self.downsample.append(ConvEmbed(prev, dim, patch_size if i == 0 else 2, **dd))
            size = (grid >> i, grid >> i)
            self.stages.append(nn.Sequential(*[
                GFNetBlock(dim, size, mlp_ratio, drop_rate, next(dpr), layer_scale, **dd) for _ in range(depth)]))
            prev = dim
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6, **dd)
        self.head_drop = nn.Dropout(dropcls)
        self.head = nn.Linear(embed_dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()
        # Feature taps of the backbone API, as (stage, first block, end block): each stage of a hierarchical
        # model, each block of the flat one.
        if len(depths) > 1:
            self.taps = [(i, 0, depth) for i, depth in enumerate(depths)]
        else:
            self.taps = [(0, j, j + 1) for j in range(depths[0])]
        self.feature_info = [dict(num_chs=embed_dims[s], reduction=patch_size * 2 ** s,
                                  module=f"stages.{s}" if len(depths) > 1 else f"stages.0.{start}")
                             for s, start, _ in self.taps]
        trunc_normal_(self.pos_embed, std=0.02)
        # timm's ViT init: trunc-normal(0.02) Linear weights, zero biases; other modules keep PyTorch's
        # defaults (norms start at 1 / 0, as the reference sets them)
        named_apply(partial(init_weights_vit_timm, needs_reset=False), self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

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
        self.head = (nn.Linear(self.num_features, num_classes, **get_device_dtype(self, device, dtype))
                     if num_classes > 0 else nn.Identity()).train(self.training)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in, H, W] image -> [B, h, w, C] tokens with the position embedding."""
        x = check_size(x, (self.img_size, self.img_size), "input")
        return self.pos_drop(self.downsample[0](x.permute(0, 2, 3, 1)) + self.pos_embed)

    def _blocks(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(blocks, x)
        return blocks(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for i, (down, stage) in enumerate(zip(self.downsample, self.stages)):  # noqa: B905 (no strict= in TorchScript)
            if i > 0:
                x = down(x)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
        return self.norm(x)

    @torch.jit.ignore
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's backbone API: the features of `indices` (last n if an int, all if None) as [B, C, h, w]
        ('NCHW') or [B, h, w, C] ('NHWC'); `norm` applies the final norm to those of the last stage (every
        block's of the flat model, as timm's ViT). Returns the intermediates, or (final features, intermediates)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"GFNet: output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.taps), indices)
        last_stage = len(self.embed_dims) - 1
        taps = self.taps[:max_index + 1] if stop_early or intermediates_only else self.taps
        intermediates = []
        x = self._embed(x)
        for i, (stage, start, end) in enumerate(taps):
            if start == 0 and stage > 0:
                x = self.downsample[stage](x)
            x = self._blocks(self.stages[stage][start:end], x)
            if i in take_indices:
                y = self.norm(x) if norm and stage == last_stage else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if taps[-1][0] == last_stage else x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages / blocks after the last feature of `indices`; returns the absolute indices."""
        take_indices, max_index = feature_take_indices(len(self.taps), indices)
        stage, _, end = self.taps[max_index]
        self.taps = self.taps[:max_index + 1]
        self.downsample = self.downsample[:stage + 1]
        self.stages = self.stages[:stage + 1]
        self.stages[stage] = self.stages[stage][:end]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_pool(global_pool: str) -> str:
    if global_pool not in ("avg", ""):
        raise ValueError(f"GFNet: global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    return global_pool


def checkpoint_filter_fn(state_dict: dict, model: GFNet) -> dict:
    """Map an official GFNet checkpoint (raoyongming/GFNet) onto this model's names; ours pass unchanged.

    Official names: `patch_embed.proj` (GFNet) or `patch_embed.{i}.proj` (GFNetPyramid: the patch embedding,
    then the DownLayers), `blocks.{j}.*` (GFNet) or `blocks.{i}.{j}.*` (GFNetPyramid), `pos_embed` [1, N, C];
    the block internals (norm1, filter.complex_weight, norm2, mlp.fc1/fc2, gamma), `norm` and `head` keep their
    names. A key that maps to nothing, a model key the checkpoint lacks or a shape mismatch is a ValueError
    naming them; the classifier is left to timm's loader (it drops it when the class counts differ), and so
    is the first conv's input-channel count (it adapts it to `in_chans`).
    """
    own = model.state_dict()
    _, h, w, c = own["pos_embed"].shape
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^patch_embed\.proj\.", "downsample.0.proj.", k)
        k = re.sub(r"^patch_embed\.(\d+)\.", r"downsample.\1.", k)
        k = re.sub(r"^blocks\.(\d+)\.(\d+)\.", r"stages.\1.\2.", k)
        k = re.sub(r"^blocks\.(\d+)\.", r"stages.0.\1.", k)
        if k == "pos_embed" and v.shape == (1, h * w, c):
            v = v.reshape(1, h, w, c)
        out[k] = v
    check_fits(out, model, f"{len(model.stages)} stages, dims {list(model.embed_dims)}")
    return out


def _cfg(**kwargs):
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "downsample.0.proj", "classifier": "head", "fixed_input_size": True, **kwargs}


default_cfgs = generate_default_cfgs({
    "gfnet_h_ti.untrained": _cfg(),
    "gfnet_h_s.untrained": _cfg(),
    "gfnet_h_b.untrained": _cfg(),
    "gfnet_b.untrained": _cfg(pool_size=(14, 14)),
    "gfnet_nano.untrained": _cfg(input_size=(1, 32, 32), pool_size=(2, 2), crop_pct=1.0),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> GFNet:
    depths = kwargs["depths"]
    num_features = len(depths) if len(depths) > 1 else depths[0]
    out_indices = kwargs.pop("out_indices", min(4, num_features))  # features_only: the last 4 (at most)
    return build_model_with_cfg(GFNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **kwargs)


# Shapes, drop-path rates and layer-scale inits of the reference's main_gfnet.py (gfnet-h-ti keeps
# GFNetPyramid's default init_values 1e-3); MLP ratio 4 and LayerNorm eps 1e-6 in all of them.
@register_model
def gfnet_h_ti(pretrained=False, **kwargs) -> GFNet:
    return _create("gfnet_h_ti", pretrained, **{"embed_dims": (64, 128, 256, 512), "depths": (3, 3, 10, 3),
                                                "drop_path_rate": 0.1, "layer_scale": 1e-3, **kwargs})


@register_model
def gfnet_h_s(pretrained=False, **kwargs) -> GFNet:
    return _create("gfnet_h_s", pretrained, **{"embed_dims": (96, 192, 384, 768), "depths": (3, 3, 10, 3),
                                               "drop_path_rate": 0.2, "layer_scale": 1e-5, **kwargs})


@register_model
def gfnet_h_b(pretrained=False, **kwargs) -> GFNet:
    return _create("gfnet_h_b", pretrained, **{"embed_dims": (96, 192, 384, 768), "depths": (3, 3, 27, 3),
                                               "drop_path_rate": 0.4, "layer_scale": 1e-6, **kwargs})


@register_model
def gfnet_b(pretrained=False, **kwargs) -> GFNet:
    return _create("gfnet_b", pretrained, **{"patch_size": 16, "embed_dims": (512,), "depths": (19,),
                                             "drop_path_rate": 0.25, "layer_scale": None, **kwargs})


# Small-input hierarchical GFNet for 32x32 data: patch 2, so stage grids 16, 8, 4, 2 as in riformer_nano.
@register_model
def gfnet_nano(pretrained=False, **kwargs) -> GFNet:
    return _create("gfnet_nano", pretrained, **{"img_size": 32, "patch_size": 2, "in_chans": 1,
                                                "embed_dims": (24, 48, 96, 192), "depths": (2, 2, 6, 2),
                                                "drop_path_rate": 0.1, "layer_scale": 1e-5, **kwargs})
