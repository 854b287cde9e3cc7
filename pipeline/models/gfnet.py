"""GFNet (Rao et al., NeurIPS 2021): the RIFormer paper's logit teacher (riformer.md Sec. 2).

Global filter token mixer: rfft2 over (H, W), multiply by a learned complex weight of shape
(H, W//2+1, C), irfft2. The filter fixes the input size, so a model built for one size raises a clear
error on another. Hierarchical GFNet-H-* (patch 4, 2x2 stride-2 downsampling) and the flat GFNet-B
(patch 16). Tokens are kept as [B, H, W, C] throughout.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._manipulate import named_apply
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import init_weights_vit_timm

__all__ = ["GFNet", "GlobalFilter"]


class GlobalFilter(nn.Module):
    def __init__(self, dim: int, h: int, w: int):
        super().__init__()
        self.size = (h, w)
        self.complex_weight = nn.Parameter(torch.randn(h, w // 2 + 1, dim, 2) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if (H, W) != self.size:
            raise ValueError(
                f"GFNet global filter is {self.size[0]}x{self.size[1]} tokens but got a {H}x{W} grid: "
                f"the model was built for another input size; create it with img_size matching the data")
        dtype = x.dtype
        x = torch.fft.rfft2(x.float(), dim=(1, 2), norm="ortho")
        x = x * torch.view_as_complex(self.complex_weight)
        x = torch.fft.irfft2(x, s=(H, W), dim=(1, 2), norm="ortho")
        return x.to(dtype)


class GFNetBlock(nn.Module):
    """x + DropPath(ls * MLP(LN2(GlobalFilter(LN1(x))))) (ls only in the hierarchical models)."""

    def __init__(self, dim: int, size: tuple[int, int], mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale: float | None = None):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm_layer(dim)
        self.filter = GlobalFilter(dim, *size)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm2(self.filter(self.norm1(x))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y)


class ConvEmbed(nn.Module):
    """Non-overlapping conv patch embedding / 2x2 stride-2 downsampling, on [B, H, W, C] tokens."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class GFNet(nn.Module):
    """GFNet with one or more stages. One stage with patch 16 is GFNet-B; four with patch 4 is GFNet-H."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000,
                 embed_dims=(96, 192, 384, 768), depths=(3, 3, 27, 3), mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, layer_scale: float | None = 1e-6,
                 global_pool: str = "avg"):
        super().__init__()
        if isinstance(img_size, (tuple, list)):  # timm passes the cfg's (H, W) for fixed-size models
            if img_size[0] != img_size[1]:
                raise ValueError(f"GFNet supports square inputs only, got img_size {tuple(img_size)}")
            img_size = img_size[0]
        grid = img_size // patch_size
        if img_size % patch_size or grid % (2 ** (len(depths) - 1)):
            raise ValueError(f"GFNet: img_size {img_size} must be divisible by patch {patch_size} and leave a "
                             f"grid divisible by {2 ** (len(depths) - 1)} for {len(depths)} stages")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.global_pool = global_pool
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dims[0]))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.downsample = nn.ModuleList()
        self.stages = nn.ModuleList()
        prev = in_chans
        for i, (dim, depth) in enumerate(zip(embed_dims, depths, strict=True)):
            self.downsample.append(ConvEmbed(prev, dim, patch_size if i == 0 else 2))
            size = (grid >> i, grid >> i)
            start = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                GFNetBlock(dim, size, mlp_ratio, dpr[start + j], layer_scale) for j in range(depth)]))
            prev = dim
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        # timm's ViT init: trunc-normal(0.02) Linear weights, zero biases; other modules keep PyTorch's
        # defaults (norms start at 1 / 0, as the reference sets them)
        named_apply(partial(init_weights_vit_timm, needs_reset=False), self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"GFNet was built for {self.img_size}x{self.img_size} inputs, got "
                             f"{x.shape[-2]}x{x.shape[-1]}: its global filters fix the input size; create it "
                             f"with img_size={x.shape[-1]} (square inputs only)")
        x = x.permute(0, 2, 3, 1)
        for i, (down, stage) in enumerate(zip(self.downsample, self.stages, strict=True)):
            x = down(x)
            if i == 0:
                x = self.pos_drop(x + self.pos_embed)
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(1, 2)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs):
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "downsample.0.proj", "classifier": "head", "fixed_input_size": True, **kwargs}


default_cfgs = generate_default_cfgs({
    "gfnet_h_ti.untrained": _cfg(),
    "gfnet_h_s.untrained": _cfg(),
    "gfnet_h_b.untrained": _cfg(),
    "gfnet_b.untrained": _cfg(),
    "gfnet_nano.untrained": _cfg(input_size=(1, 32, 32), crop_pct=1.0),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> GFNet:
    return build_model_with_cfg(GFNet, variant, pretrained, **kwargs)


# Shapes and drop-path rates of the reference code's main_gfnet.py (riformer.md Sec. 2).
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
                                             "drop_path_rate": 0.1, "layer_scale": None, **kwargs})


# Small-input hierarchical GFNet for 32x32 data: patch 2, so stage grids 16, 8, 4, 2 as in riformer_nano.
@register_model
def gfnet_nano(pretrained=False, **kwargs) -> GFNet:
    return _create("gfnet_nano", pretrained, **{"img_size": 32, "patch_size": 2, "in_chans": 1,
                                                "embed_dims": (24, 48, 96, 192), "depths": (2, 2, 6, 2),
                                                "drop_path_rate": 0.1, "layer_scale": 1e-5, **kwargs})
