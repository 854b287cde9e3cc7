"""Importing this package registers every project model in timm's registry.

RIFormer family: riformer_s12/s24/s36/m36/m48, riformer_nano (token_mixer='affine'|'identity'|'pooling'),
poolformer_nano, poolformer_s9, poolformer_xs12. GFNet family: gfnet_h_ti/h_s/h_b, gfnet_b, gfnet_nano.
LightViT family: lightvit_tiny/small/base, lightvit_nano (a modified LightViT for 32x32 inputs).
AdaViT family: ada_deit_tiny/small/nano and the dense deit_nano (DeiT-Ti/S come from timm itself).
MetaFormer baselines (Table 9) and Swin (Table 5's teacher): riformerv2_s12/s18/n12/n18 (the students),
randformer_s12/n12, poolformerv2_n12, convformer_n18, caformer_n18, swin_nano (pipeline/models/metaformer_v2.py).
PoolFormer S12..M48, PoolFormerV2, ConvFormer, CAFormer and Swin at their published sizes come from timm itself.
"""
from . import adavit, gfnet, lightvit, metaformer_v2, riformer  # noqa: F401  (registration side effect)
from .riformer import TOKEN_MIXERS, Affine, RIFormer, RIFormerBlock, metaformer_blocks

__all__ = ["TOKEN_MIXERS", "Affine", "RIFormer", "RIFormerBlock", "metaformer_blocks"]
