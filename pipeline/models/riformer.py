"""RIFormer (Wang et al., CVPR 2023), built on timm's MetaFormer so that it shares every key with
timm's PoolFormer except the affine token mixer.

Training-time block (paper Sec. 3.3, riformer.md Sec. 1):
    x = x + DropPath(ls1 * Affine(GN1(x))),   Affine(z) = s*z + t - z
    x = x + DropPath(ls2 * MLP(GN2(x)))
Deploy-time block, after `timm.utils.reparameterize_model`:
    x = x + GN1''(x),   gamma'' = ls1*gamma*(s-1),  beta'' = ls1*(beta*(s-1) + t)
i.e. the token mixer is gone ("identity after norm") and the first layer scale is folded into the merged norm
too (`fold_layer_scale=True`: the block holds no `layer_scale1`). The paper's and mmpretrain's deploy block keep
ls1 as a separate multiply (their deploy checkpoints load into `token_mixer='identity'`); folding it is exact
and saves one pass over the feature map per block.

`token_mixer` picks the mixer of the same backbone: 'pooling' (PoolFormer), 'identity'
(token-mixer-free, Table 1; also the deploy form) or 'affine' (RIFormer training form).
"""
import re

import torch
import torch.nn as nn
from timm.layers import GroupNorm1
from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs
from timm.models.metaformer import MetaFormer, MetaFormerBlock, Pooling, Scale

from ._checkpoint import check_fits

__all__ = ["Affine", "RIFormer", "RIFormerBlock", "TOKEN_MIXERS", "metaformer_blocks"]


class Affine(nn.Module):
    """Per-channel affine token mixer s*z + t - z, a depthwise 1x1 conv with bias minus its input.

    The "- input" follows PoolFormer's pool(z) - z: the block already has a residual.
    `init` is a choice the paper leaves open (riformer.md Sec. 8): 'identity' (our default) starts at s=1, t=0,
    so the mixer branch starts at zero output, as PoolFormer's pool(z) - z is close to zero on smooth features;
    'trunc_normal' is the official one (mmpretrain's RIFormer configs: TruncNormal(std .02) on every Conv2d,
    bias 0; timm's MetaFormer init is the same), so s starts near 0 and the branch near -z.
    """

    def __init__(self, dim: int, init: str = "identity", device=None, dtype=None, **kwargs):
        super().__init__()
        self.affine = nn.Conv2d(dim, dim, kernel_size=1, groups=dim, bias=True, device=device, dtype=dtype)
        if init not in ("identity", "trunc_normal"):
            raise ValueError(f"affine_init must be 'identity' or 'trunc_normal', got {init!r}")
        self.init = init

    def reset_parameters(self) -> None:
        if self.init == "identity":
            nn.init.ones_(self.affine.weight)
            nn.init.zeros_(self.affine.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine(x) - x


class IdentityMixer(nn.Identity):
    """Token-mixer-free block (Table 1 'Identity'): x + ls1 * GN1(x). Accepts MetaFormer's mixer kwargs."""

    def __init__(self, dim: int = 0, **kwargs):
        super().__init__()


TOKEN_MIXERS = {"pooling": Pooling, "identity": IdentityMixer, "affine": Affine}


class RIFormerBlock(MetaFormerBlock):
    """timm's MetaFormerBlock plus the structural re-parameterization of its affine token mixer."""

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge Affine into norm1 (riformer.md Sec. 1): gamma' = gamma*(s-1), beta' = beta*(s-1) + t; then, with
        no token mixer left, fold the layer scale in too: gamma'' = ls1*gamma', beta'' = ls1*beta'."""
        norm = self.norm1
        if isinstance(self.token_mixer, Affine):
            if norm.bias is None:  # a norm without bias (MetaFormer-baseline students): the merged one has one
                norm = self.norm1 = _with_bias(norm)
            s = self.token_mixer.affine.weight.reshape(-1) - 1.0
            t = self.token_mixer.affine.bias
            norm.bias.copy_(norm.bias * s + t)
            norm.weight.copy_(norm.weight * s)
            self.token_mixer = IdentityMixer()
        if isinstance(self.token_mixer, IdentityMixer) and isinstance(self.layer_scale1, Scale):
            ls = self.layer_scale1.scale.reshape(-1)
            norm.bias.copy_(norm.bias * ls)
            norm.weight.copy_(norm.weight * ls)
            self.layer_scale1 = nn.Identity()


def _with_bias(norm: nn.Module) -> GroupNorm1:
    """A GroupNorm(1) with `norm`'s weight, eps and a zero bias, for a GroupNorm(1) without bias (timm's
    GroupNorm1NoBias, the MetaFormer baselines' LayerNormGeneral over (C, H, W))."""
    if not isinstance(norm, GroupNorm1):
        raise TypeError(f"the affine mixer merges into a GroupNorm(1); got {type(norm).__name__}")
    out = GroupNorm1(norm.num_channels, eps=norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(norm.weight)
        out.bias.zero_()
    return out


class RIFormer(MetaFormer):
    """PoolFormer-shaped MetaFormer with a selectable token mixer.

    Args beyond timm's MetaFormer:
        token_mixer: 'affine' | 'identity' | 'pooling', or one entry per stage, each such a name or a token-mixer
            class (pipeline/models/metaformer_v2.py: RandFormer, ConvFormer, CAFormer).
        affine_init: see `Affine`.
        stem_stride: 4 (paper: 7x7 conv, stride 4, padding 2) or 2 (3x3 conv, stride 2, padding 1) for the
            small-input nano variants, so that every stage keeps a grid of at least 2x2 at 28-32 px.
        fold_layer_scale: the deploy form (`token_mixer='identity'` only): no `layer_scale1` in any block, its
            scale folded into norm1 by `reparameterize`, and norm1 has a bias where the training form's has
            none. The deploy checkpoints of `python -m pipeline reparameterize` describe this model.
        img_size: not used here (any input size runs); timm passes it to models with a fixed input size, of which
            RandFormer is one: its registration builds the token matrices for it.
        head_norm_first: True (default): the head of the papers and the official code (PoolFormer, mmpretrain's
            RIFormer): GroupNorm(1) on the final feature map, then global average pooling, then fc. False:
            timm's MetaFormer head (pool, then LayerNorm2d with eps 1e-6, then fc), for timm's own PoolFormer
            weights. Same keys and parameter count either way (`head.norm`, `head.fc`).
    """

    def __init__(self, token_mixer: str = "affine", affine_init: str = "identity", stem_stride: int = 4,
                 fold_layer_scale: bool = False, head_norm_first: bool = True, in_chans: int = 3,
                 dims=(64, 128, 320, 512), img_size=None, **kwargs):
        per_stage = isinstance(token_mixer, list | tuple)
        stages = list(token_mixer) if per_stage else [token_mixer]
        names = [m for m in stages if isinstance(m, str)]
        if any(m not in TOKEN_MIXERS for m in names) or (per_stage and "affine" in names):
            raise ValueError(f"token_mixer must be one of {sorted(TOKEN_MIXERS)}, or one per stage without "
                             f"'affine' (a whole-model choice the stages re-parameterize by), got {token_mixer!r}")
        if fold_layer_scale and token_mixer != "identity":
            raise ValueError(f"fold_layer_scale=True is the deploy form: it needs token_mixer='identity', "
                             f"got {token_mixer!r}")
        mixers = [TOKEN_MIXERS[m] if isinstance(m, str) else m for m in stages]
        if "affine" in names:
            kwargs["init"] = affine_init
        if head_norm_first:
            kwargs.setdefault("output_norm", GroupNorm1)
        super().__init__(in_chans=in_chans, dims=dims, token_mixers=mixers if per_stage else mixers[0], **kwargs)
        self.token_mixer = token_mixer
        self.head_norm_first = head_norm_first
        # timm's MetaFormerStage hard-codes its block class; RIFormerBlock only adds reparameterize().
        for module in self.modules():
            if type(module) is MetaFormerBlock:
                module.__class__ = RIFormerBlock
            if isinstance(module, Affine):
                module.reset_parameters()
            if fold_layer_scale and isinstance(module, MetaFormerBlock):
                module.layer_scale1 = nn.Identity()
                if module.norm1.bias is None:
                    module.norm1 = _with_bias(module.norm1)
        if stem_stride == 2:
            conv = self.stem.conv
            self.stem.conv = nn.Conv2d(in_chans, dims[0], kernel_size=3, stride=2, padding=1,
                                       device=conv.weight.device, dtype=conv.weight.dtype)
            self._init_weights(self.stem.conv)
            for i, info in enumerate(self.feature_info):
                info["reduction"] = 2 ** (i + 1)
        elif stem_stride != 4:
            raise ValueError(f"stem_stride must be 4 or 2, got {stem_stride}")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # written out rather than calling MetaFormer's for the timm head: TorchScript cannot call super()
        if self.head_norm_first:
            x = self.head.global_pool(self.head.norm(x))
        else:
            x = self.head.norm(self.head.global_pool(x))
        x = self.head.drop(self.head.flatten(x))
        return x if pre_logits else self.head.fc(x)


def metaformer_blocks(model: MetaFormer) -> list[MetaFormerBlock]:
    """All blocks of a MetaFormer (RIFormer or timm's PoolFormer) in order; module imitation picks from these."""
    return [blk for stage in model.stages for blk in stage.blocks]


def _official_key(key: str) -> str:
    """A key of the official layouts in ours. mmpretrain's RIFormer / PoolFormer backbones and the original
    PoolFormer code name the stem `patch_embed.proj`, the stages and downsamplings one list `network`
    (`network.{2i}.{j}` = stage i's block j, `network.{2i-1}.proj` = stage i's downsampling), the layer scales
    `layer_scale_{1,2}` ([C]), the final norm `norm` (mmpretrain: `norm6`, the norm of output index 6) and the
    classifier `head` (mmpretrain: `head.fc`); mmpretrain's deploy blocks hold the merged norm as `norm_reparam`.
    """
    key = key.removeprefix("backbone.")
    key = re.sub(r"^patch_embed\.proj\.", "stem.conv.", key)
    key = re.sub(r"^network\.(\d+)\.proj\.", lambda m: f"stages.{(int(m[1]) + 1) // 2}.downsample.conv.", key)
    key = re.sub(r"^network\.(\d+)\.(\d+)\.", lambda m: f"stages.{int(m[1]) // 2}.blocks.{m[2]}.", key)
    key = re.sub(r"\.layer_scale_([12])$", r".layer_scale\1.scale", key)
    key = re.sub(r"\.norm_reparam\.", ".norm1.", key)
    key = re.sub(r"^norm\d*\.", "head.norm.", key)
    return re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)


def checkpoint_filter_fn(state_dict: dict, model: RIFormer) -> dict:
    """Any RIFormer / PoolFormer checkpoint in our layout (timm's MetaFormer keys), mmpretrain's (training and
    deploy form) or the original PoolFormer code's, as a state dict of `model`. Used by timm's loader:
    `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`.

    The official heads put the norm on the map before pooling: load them into the default
    `head_norm_first=True`. A key that maps to nothing, or a key of the model that the checkpoint lacks (other
    than the classifier, which timm's loader drops when the class counts differ), is a ValueError naming them.
    """
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        key = _official_key(key)
        if key in own and value.shape != own[key].shape and value.numel() == own[key].numel():
            value = value.reshape(own[key].shape)  # layer scales: [C] -> [C, 1, 1]
        out[key] = value
    hint = ""
    if any(".norm_reparam." in k for k in state_dict) and model.token_mixer == "affine":
        hint = "this is a deploy (re-parameterized) checkpoint: create the model with token_mixer='identity'"
    elif any(".token_mixer.affine." in k for k in state_dict) and model.token_mixer != "affine":
        hint = ("this is a training-form checkpoint (affine token mixer): create the model with "
                "token_mixer='affine', then timm.utils.reparameterize_model() gives the deploy form")
    check_fits(out, model, f"token_mixer={model.token_mixer!r}", hint)
    return out


def _cfg(**kwargs):
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.conv", "classifier": "head.fc", "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "riformer_s12.untrained": _cfg(),
    "riformer_s24.untrained": _cfg(),
    "riformer_s36.untrained": _cfg(),
    "riformer_m36.untrained": _cfg(crop_pct=0.95),
    "riformer_m48.untrained": _cfg(crop_pct=0.95),
    "riformer_nano.untrained": _cfg(input_size=(1, 32, 32), pool_size=(2, 2), crop_pct=1.0),
    "poolformer_nano.untrained": _cfg(input_size=(1, 32, 32), pool_size=(2, 2), crop_pct=1.0),
    "poolformer_s9.untrained": _cfg(),
    "poolformer_xs12.untrained": _cfg(),
})

# PoolFormer v1 shape (riformer.md Sec. 1): GN(1) norm, GELU MLP with bias, no norm in stem/downsampling.
_POOLFORMER_V1 = dict(downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True, norm_layers=GroupNorm1,
                      res_scale_init_values=None, use_mlp_head=False)


def _create(variant: str, pretrained: bool = False, base: dict = _POOLFORMER_V1, **kwargs) -> RIFormer:
    """A registered RIFormer-class model: `base` (the PoolFormer v1 architecture, or metaformer_v2's) under the
    variant's and the caller's kwargs."""
    kwargs = {**base, **kwargs}
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs["depths"]))))
    return build_model_with_cfg(
        RIFormer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


S_DIMS, M_DIMS = (64, 128, 320, 512), (96, 192, 384, 768)


@register_model
def riformer_s12(pretrained=False, **kwargs) -> RIFormer:
    return _create("riformer_s12", pretrained, depths=(2, 2, 6, 2), dims=S_DIMS,
                   layer_scale_init_values=1e-5, **kwargs)


@register_model
def riformer_s24(pretrained=False, **kwargs) -> RIFormer:
    return _create("riformer_s24", pretrained, depths=(4, 4, 12, 4), dims=S_DIMS,
                   layer_scale_init_values=1e-5, **kwargs)


@register_model
def riformer_s36(pretrained=False, **kwargs) -> RIFormer:
    return _create("riformer_s36", pretrained, depths=(6, 6, 18, 6), dims=S_DIMS,
                   layer_scale_init_values=1e-6, **kwargs)


@register_model
def riformer_m36(pretrained=False, **kwargs) -> RIFormer:
    return _create("riformer_m36", pretrained, depths=(6, 6, 18, 6), dims=M_DIMS,
                   layer_scale_init_values=1e-6, **kwargs)


@register_model
def riformer_m48(pretrained=False, **kwargs) -> RIFormer:
    return _create("riformer_m48", pretrained, depths=(8, 8, 24, 8), dims=M_DIMS,
                   layer_scale_init_values=1e-6, **kwargs)


# Small-input variant for the embedded 28x28 (padded to 32x32) data: S12's 2/2/6/2 block structure, so
# module imitation matches the same blocks; stem stride 2 gives stage grids 16, 8, 4, 2 at 32 px.
NANO = dict(depths=(2, 2, 6, 2), dims=(16, 32, 64, 128), stem_stride=2, in_chans=1,
            layer_scale_init_values=1e-5)


@register_model
def riformer_nano(pretrained=False, **kwargs) -> RIFormer:
    return _create("riformer_nano", pretrained, **{**NANO, **kwargs})


@register_model
def poolformer_nano(pretrained=False, **kwargs) -> RIFormer:
    """The nano backbone with PoolFormer's pooling mixer: same keys as timm's poolformer_* family."""
    return _create("poolformer_nano", pretrained, **{**NANO, "token_mixer": "pooling", **kwargs})


# Table 8 baselines. The paper does not give their shapes (riformer.md Sec. 6); these are our choices: S9 drops
# 3 of the 6 stage-3 blocks, XS12 narrows every stage by 12.5%. Paper (A100) throughput over PoolFormer-S12:
# S9 x1.21, XS12 x1.15; measured for the nano versions on the 2-core CPU (results/default/benchmark.json):
# depth cut x1.17, width cut x1.10.
@register_model
def poolformer_s9(pretrained=False, **kwargs) -> RIFormer:
    return _create("poolformer_s9", pretrained, depths=(2, 2, 3, 2), dims=S_DIMS, token_mixer="pooling",
                   layer_scale_init_values=1e-5, **kwargs)


@register_model
def poolformer_xs12(pretrained=False, **kwargs) -> RIFormer:
    return _create("poolformer_xs12", pretrained, depths=(2, 2, 6, 2), dims=(56, 112, 280, 448),
                   token_mixer="pooling", layer_scale_init_values=1e-5, **kwargs)
