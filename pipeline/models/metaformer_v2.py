"""Table 9 and the Swin teacher of Table 5: the MetaFormer baselines (Yu et al., "MetaFormer Baselines for Vision",
TPAMI 2023) as module-imitation teachers of a token-mixer-free student with their architecture, and a small Swin.

RIFormer's Table 9 ("generalization to other teachers", appendix D): the student adopts the MetaFormer-baseline
modifications (StarReLU MLP without bias, norms without bias, normed stem and downsampling, res-scale in stages
3-4, no layer scale, head pool -> LayerNorm -> fc) with the affine token mixer, at 12 layers (S12: 2/2/6/2) and
18 layers (S18: 3/3/9/3); GFNet is its logit teacher in every distilled row, and the row's baseline
(RandFormer-S12, PoolFormerV2-S12, ConvFormer-S18, CAFormer-S18) its module-imitation teacher.

Registered here (all RIFormer-class models, so they share its re-parameterization and key layout with timm's
MetaFormer; the timm-registered poolformerv2_s12 / convformer_s18 / caformer_s18 load into the same keys):
  riformerv2_s12 / s18    the student: IdentityFormer's architecture (norm: GroupNorm(1) without bias, as the
                          official LayerNormGeneral over (C, H, W)) with the affine mixer (`token_mixer` as RIFormer)
  randformer_s12          RandFormer: identity mixers in stages 1-2, a fixed random token-mixing matrix in 3-4
                          (not in timm; the official code's RandomMixing)
  *_n12 / *_n18           nano versions for the embedded 32 px data (stem stride 2, dims 16-128, 1 channel):
                          riformerv2_n12 / n18, randformer_n12, poolformerv2_n12, convformer_n18, caformer_n18
  swin_nano               timm's SwinTransformer for 32 px: patch 2, window 4 (stage grids 16, 8, 4, 2; timm
                          shrinks the window to a grid smaller than it), dims 24-192
"""
import torch
import torch.nn as nn
from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs
from timm.models.metaformer import Attention, GroupNorm1NoBias, LayerNorm2dNoBias, LayerNormNoBias, SepConv, StarReLU
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter_fn

from .riformer import NANO, S_DIMS, RIFormer
from .riformer import _create as create_riformer

__all__ = ["RandomMixing", "random_mixing"]


class RandomMixing(nn.Module):
    """RandFormer's token mixer: a fixed N x N matrix over the H*W tokens, rows softmax(uniform) (each sums to 1),
    never trained. The official code holds it as a Parameter with requires_grad=False; here it is a buffer under the
    same state-dict key (official checkpoints load), so that every parameter gets a gradient (timm's model
    tests), and `count_params` counts it as the official parameter count does. No "- input" term: the official
    mixer returns the mixed tokens."""

    num_tokens = 196

    def __init__(self, dim: int = 0, device=None, dtype=None, **kwargs):
        super().__init__()
        n = self.num_tokens = type(self).num_tokens  # an instance attribute: TorchScript reads no class attribute
        self.register_buffer("random_matrix",
                             torch.softmax(torch.rand(n, n, device=device, dtype=dtype), dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        torch._assert(h * w == self.num_tokens, "RandomMixing: the feature grid does not have the token count of "
                                                "its matrix (the model's input size fixes it)")
        return (x.reshape(b, c, h * w) @ self.random_matrix.t()).reshape(b, c, h, w)


def random_mixing(num_tokens: int) -> type[RandomMixing]:
    """A RandomMixing class for a grid of `num_tokens` tokens (timm's MetaFormer takes one class per stage)."""
    return type(f"RandomMixing{num_tokens}", (RandomMixing,), {"num_tokens": num_tokens})


# MetaFormer-baseline architecture (timm's poolformerv2_* defaults); ConvFormer / CAFormer change norms and head.
V2 = dict(downsample_norm=LayerNorm2dNoBias, norm_layers=GroupNorm1NoBias, mlp_act=StarReLU, mlp_bias=False,
          res_scale_init_values=(None, None, 1.0, 1.0), layer_scale_init_values=None, use_mlp_head=False,
          head_norm_first=False)
CONV_NORMS = dict(norm_layers=LayerNorm2dNoBias, use_mlp_head=True)
CA_NORMS = dict(norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2, use_mlp_head=True)
S12, S18 = dict(depths=(2, 2, 6, 2), dims=S_DIMS), dict(depths=(3, 3, 9, 3), dims=S_DIMS)
N12 = dict(depths=(2, 2, 6, 2), dims=NANO["dims"], stem_stride=2, in_chans=1)
N18 = dict(N12, depths=(3, 3, 9, 3))


def _create(variant: str, pretrained: bool, shape: dict, kwargs: dict, **arch) -> RIFormer:
    return create_riformer(variant, pretrained, base=V2, **{**shape, **arch, **kwargs})


def _rand_mixers(grid: int) -> list:
    """RandFormer's stages: identity, identity, random mixing at the stage-3 and stage-4 grids (`grid`: the stem's
    output grid; the input size fixes the matrices, hence `img_size` and `fixed_input_size`)."""
    return ["identity", "identity", random_mixing((grid // 4) ** 2), random_mixing((grid // 8) ** 2)]


def _side(img_size) -> int:
    """A square input's side from an int or an (H, W) pair."""
    return img_size if isinstance(img_size, int) else img_size[0]


def _cfg(**kwargs):
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "stem.conv", "classifier": "head.fc", "license": "apache-2.0", **kwargs}


_NANO_CFG = dict(input_size=(1, 32, 32), pool_size=(2, 2), crop_pct=1.0, mean=(0.5,), std=(0.5,))
default_cfgs = generate_default_cfgs({
    # crop 1.0 at evaluation, as timm's poolformerv2 / convformer / caformer and the official baselines' configs
    "riformerv2_s12.untrained": _cfg(crop_pct=1.0),
    "riformerv2_s18.untrained": _cfg(crop_pct=1.0),
    "randformer_s12.untrained": _cfg(crop_pct=1.0, fixed_input_size=True),  # its matrices fix the grid
    **{f"{name}.untrained": _cfg(**_NANO_CFG) for name in ("riformerv2_n12", "riformerv2_n18", "poolformerv2_n12")},
    "randformer_n12.untrained": _cfg(**_NANO_CFG, fixed_input_size=True),
    "convformer_n18.untrained": _cfg(**_NANO_CFG, classifier="head.fc.fc2"),
    "caformer_n18.untrained": _cfg(**_NANO_CFG, classifier="head.fc.fc2"),
    "swin_nano.untrained": _cfg(**_NANO_CFG, first_conv="patch_embed.proj"),
})


@register_model
def riformerv2_s12(pretrained=False, **kwargs) -> RIFormer:
    return _create("riformerv2_s12", pretrained, S12, kwargs)


@register_model
def riformerv2_s18(pretrained=False, **kwargs) -> RIFormer:
    return _create("riformerv2_s18", pretrained, S18, kwargs)


@register_model
def randformer_s12(pretrained=False, img_size=224, **kwargs) -> RIFormer:
    return _create("randformer_s12", pretrained, S12, kwargs, token_mixer=_rand_mixers(_side(img_size) // 4))


@register_model
def riformerv2_n12(pretrained=False, **kwargs) -> RIFormer:
    return _create("riformerv2_n12", pretrained, N12, kwargs)


@register_model
def riformerv2_n18(pretrained=False, **kwargs) -> RIFormer:
    return _create("riformerv2_n18", pretrained, N18, kwargs)


@register_model
def randformer_n12(pretrained=False, img_size=32, **kwargs) -> RIFormer:
    return _create("randformer_n12", pretrained, N12, kwargs, token_mixer=_rand_mixers(_side(img_size) // 2))


@register_model
def poolformerv2_n12(pretrained=False, **kwargs) -> RIFormer:
    return _create("poolformerv2_n12", pretrained, N12, kwargs, token_mixer="pooling")


@register_model
def convformer_n18(pretrained=False, **kwargs) -> RIFormer:
    return _create("convformer_n18", pretrained, N18, kwargs, token_mixer=SepConv, **CONV_NORMS)


@register_model
def caformer_n18(pretrained=False, **kwargs) -> RIFormer:
    return _create("caformer_n18", pretrained, N18, kwargs, token_mixer=[SepConv, SepConv, Attention, Attention],
                   **CA_NORMS)


@register_model
def swin_nano(pretrained=False, **kwargs) -> SwinTransformer:
    args = dict(img_size=32, patch_size=2, in_chans=1, window_size=4, embed_dim=24, depths=(2, 2, 6, 2),
                num_heads=(1, 2, 4, 8))
    args.update(kwargs)
    return build_model_with_cfg(SwinTransformer, "swin_nano", pretrained, pretrained_filter_fn=swin_filter_fn,
                                feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **args)
