"""Importing this package registers every project model in timm's registry.

RIFormer family: riformer_s12/s24/s36/m36/m48, riformer_nano (token_mixer='affine'|'identity'|'pooling'),
poolformer_nano, poolformer_s9, poolformer_xs12. GFNet family: gfnet_h_ti/h_s/h_b, gfnet_b, gfnet_nano.
LightViT family: lightvit_tiny/small/base, lightvit_nano (a modified LightViT for 32x32 inputs).
AdaViT family: ada_deit_tiny/small/nano and the dense deit_nano (DeiT-Ti/S come from timm itself).
MetaFormer baselines (Table 9) and Swin (Table 5's teacher): riformerv2_s12/s18/n12/n18 (the students),
randformer_s12/n12, poolformerv2_n12, convformer_n18, caformer_n18, swin_nano (pipeline/models/metaformer_v2.py).
Pyramid ViG (Table 5): pvig_ti/s/m/b_224_gelu, pvig_nano (a modified Pyramid ViG for 32x32 inputs).
PoolFormer S12..M48, PoolFormerV2, ConvFormer, CAFormer and Swin at their published sizes come from timm itself.
"""
import timm
import torch.nn as nn

from . import adavit, gfnet, lightvit, metaformer_v2, riformer, vig  # noqa: F401  (registration side effect)
from .riformer import TOKEN_MIXERS, Affine, RIFormer, RIFormerBlock, metaformer_blocks

__all__ = ["TOKEN_MIXERS", "Affine", "RIFormer", "RIFormerBlock", "create_model", "metaformer_blocks",
           "model_kwargs"]


def model_kwargs(name: str, num_classes: int, in_chans: int, img_size: int, /, **kwargs) -> dict:
    """The keyword arguments a study model is built with: the data's classes and channels, the model's own
    kwargs, and the image size for GFNet, whose global filters have the shape of the token grid, and for Pyramid ViG,
    whose position embedding and relative-position tables do."""
    out = {"num_classes": num_classes, "in_chans": in_chans, **kwargs}
    if name.startswith(("gfnet", "pvig_")):
        out.setdefault("img_size", img_size)
    return out


def create_model(name: str, num_classes: int, in_chans: int, img_size: int, /, **kwargs) -> nn.Module:
    """A registry model for data of `num_classes` classes and `in_chans` channels at `img_size` (model_kwargs)."""
    return timm.create_model(name, **model_kwargs(name, num_classes, in_chans, img_size, **kwargs))
