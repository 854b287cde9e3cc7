"""Pyramid ViG (Han et al., "Vision GNN: An Image is Worth Graph of Nodes", NeurIPS 2022): Table 5's teacher.

Written against the authors' code (huawei-noah/Efficient-AI-Backbones, vig_pytorch/: pyramid_vig.py and
gcn_lib/torch_vertex.py, torch_edge.py, torch_nn.py, pos_embed.py). Parameter names are the official ones, so an
official checkpoint loads as it is (`checkpoint_filter_fn` only unwraps it).

* Stem: conv3x3 s2 (in -> C/2) + BN + GELU, conv3x3 s2 (C/2 -> C) + BN + GELU, conv3x3 s1 (C -> C) + BN; then a
  learned absolute position embedding [1, C, h, w] (zeros at init, as the reference). Stride 4.
* Four stages; between them a conv3x3 s2 + BN (Downsample). A block is Grapher then FFN, each with its own
  drop path and residual. Drop path linear over all blocks, 0 at the first (torch.linspace, as the reference).
* Grapher (Sec. 3.1-3.2, Eq. 7): fc1 (1x1 conv + BN); a dynamic k-NN graph over the tokens; max-relative graph
  convolution; fc2 (1x1 conv 2C -> C + BN); drop path; residual.
  - Graph: keys are the tokens average-pooled by r = 4, 2, 1, 1 (stage 1-4). The distance is the squared
    Euclidean distance between L2-normalised (over channels) query and key features, computed without gradient,
    plus a fixed relative-position term (below); the k*d nearest keys are found and every d-th kept (dilation d).
  - k grows linearly from k to 2k over the blocks (int of torch.linspace); the dilation of block i (counted over
    all stages) is min(i // 4 + 1, max_dilation), max_dilation = (last-stage keys) // (largest k). The reference
    writes 49 there, the last stage's 7x7 tokens at 224 px: the same number for every official variant.
  - Relative position (every block, as the reference): the 2-D sin-cos embedding E [n, C] of the stage's
    (untruncated) token grid, R = 2 E E^T / C, resized bicubically from [n, n] to [n, n / r^2] (the flattened
    table, not the 2-D key grid), negated and added to the distance: nearby tokens are closer. A fixed buffer.
  - MRConv: x_i' = [x_i, max_j(x_j - x_i)] with the two interleaved channel by channel ([x_0, m_0, x_1, m_1, ...]),
    then a grouped 1x1 conv (groups=4, 2C -> 2C) + BN + GELU (the reference's BasicConv). x_j are the un-normalised
    pooled keys.
* FFN: 1x1 conv (C -> 4C) + BN, GELU, 1x1 conv (4C -> C) + BN, drop path, residual.
* Head (`prediction`): global average pool, 1x1 conv (C -> 1024) + BN + GELU + dropout, 1x1 conv to the classes.
* Init as the reference: Kaiming-normal conv weights, zero conv biases, BN at 1 / 0.

Only the deterministic graph is implemented: the reference's `use_stochastic` (random neighbours in place of the
dilated ones with probability epsilon in training) is off in every official config and is not supported here.

Deviations, none of which changes the function: max_j(x_j - x_i) is computed as max_j(x_j) - x_i (the same
floats: rounding is monotone); the neighbours are gathered with `torch.gather`; the position embedding and the
relative-position table are built for `img_size` (the reference hard-codes 224 and interpolates the table at run
time for other sizes, but then fails on its position embedding), so the input size is fixed and any other size is a
clear error; the relative-position table is a buffer (the reference: a Parameter with requires_grad=False, under
the same key). Square inputs only (the reference's table assumes a square grid).

`pvig_nano` is a modified Pyramid ViG for 32x32 single-channel inputs: at stride 4 the stage grids would be 8, 4,
2, 1, and the last stage's graph would have one node (max_j(x_j - x_i) = 0: no mixing), with 4 keys in stage 1
after its r = 4 pooling. The stem's second conv has stride 1 (stem stride 2, as riformer_nano), so the grids are
16, 8, 4, 2 and the keys 16, 16, 16, 4; widths 24/48/96/192 and depths 2/2/6/2 (as gfnet_nano), k = 2 (k 2..4
over the blocks, at most the 4 keys of the last stage), which keeps every dilation at 1.

timm's backbone API: `forward_intermediates`, `prune_intermediate_layers`, `features_only=True` (each stage's
map, timm's FeatureGetterNet), `set_grad_checkpointing`. The model scripts (TorchScript) and traces (torch.fx:
the size check is a leaf function).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, get_device_dtype, register_notrace_function
from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq
from timm.models._registry import generate_default_cfgs

from ._checkpoint import check_fits

__all__ = ["PyramidViG", "Grapher", "knn_graph", "relative_position", "checkpoint_filter_fn"]


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """The MAE-style 2-D sin-cos embedding [grid*grid, dim] (float64) of a square grid, rows then columns
    flattened: the first half of the channels encodes the column (x), the second half the row (y)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")

    def embed(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([embed(xs), embed(ys)], dim=1)


def relative_position(dim: int, grid: int, reduction: int) -> torch.Tensor:
    """The term a Grapher adds to its k-NN distances, [1, n, n / r^2] (n = grid^2): minus 2 E E^T / dim of the
    sin-cos embedding E, resized bicubically along the key axis to the pooled key count (vig_pytorch's
    get_2d_relative_pos_embed and Grapher)."""
    embed = sincos_pos_embed_2d(dim, grid)
    table = (2 * embed @ embed.T / dim).float()[None, None]
    n = grid * grid
    table = F.interpolate(table, size=(n, n // (reduction * reduction)), mode="bicubic", align_corners=False)
    return -table.squeeze(1)


def knn_graph(x: torch.Tensor, y: torch.Tensor, k: int, dilation: int, relative_pos: torch.Tensor) -> torch.Tensor:
    """Neighbour indices [B, N, k] into y's M keys for each of x's N queries (x [B, C, N], y [B, C, M]): the
    k * dilation nearest under the squared distance of the L2-normalised features plus `relative_pos` [1, N, M],
    nearest first, every `dilation`-th kept. No gradient flows through the graph."""
    x = F.normalize(x.detach(), dim=1).transpose(1, 2)
    y = F.normalize(y.detach(), dim=1).transpose(1, 2)
    # the reference's order of terms, so that near-ties resolve as there
    dist = (x * x).sum(-1, keepdim=True) + -2 * torch.matmul(x, y.transpose(1, 2)) \
        + (y * y).sum(-1, keepdim=True).transpose(1, 2)
    dist = dist + relative_pos
    _, idx = torch.topk(-dist, k * dilation)
    return idx[:, :, ::dilation]


class MRConv(nn.Module):
    """Max-relative graph convolution (Li et al. 2019; ViG Eq. 7): [x_i, max_j(x_j - x_i)] interleaved by
    channel, then a grouped 1x1 conv + BN + act (the reference's BasicConv, groups=4)."""

    def __init__(self, in_chs: int, out_chs: int, act_layer=nn.GELU, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.nn = nn.Sequential(nn.Conv2d(2 * in_chs, out_chs, 1, groups=4, **dd), nn.BatchNorm2d(out_chs, **dd),
                                act_layer())

    def forward(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [B, C, N] nodes, y [B, C, M] keys, idx [B, N, k] -> [B, out, N]."""
        B, C, N = x.shape
        k = idx.shape[-1]
        neighbours = torch.gather(y, 2, idx.reshape(B, 1, N * k).expand(-1, C, -1)).reshape(B, C, N, k)
        relative = neighbours.max(dim=-1)[0] - x
        x = torch.stack([x, relative], dim=2).reshape(B, 2 * C, N, 1)
        return self.nn(x).squeeze(-1)


class DyGraphConv(nn.Module):
    """The dynamic graph (k-NN over the tokens against the r-pooled keys) and its max-relative convolution."""

    def __init__(self, in_chs: int, out_chs: int, k: int, dilation: int, reduction: int, act_layer=nn.GELU,
                 device=None, dtype=None):
        super().__init__()
        self.k, self.dilation, self.reduction = k, dilation, reduction
        self.gconv = MRConv(in_chs, out_chs, act_layer, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, relative_pos: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        y = F.avg_pool2d(x, self.reduction, self.reduction) if self.reduction > 1 else x
        x, y = x.reshape(B, C, -1), y.reshape(B, C, -1)
        idx = knn_graph(x, y, self.k, self.dilation, relative_pos)
        return self.gconv(x, y, idx).reshape(B, -1, H, W)


class Grapher(nn.Module):
    """x + DropPath(fc2(graph_conv(fc1(x)))): ViG's graph module (Sec. 3.2), on a [B, C, H, W] map."""

    def __init__(self, dim: int, grid: int, k: int, dilation: int, reduction: int, act_layer=nn.GELU,
                 drop_path: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Sequential(nn.Conv2d(dim, dim, 1, **dd), nn.BatchNorm2d(dim, **dd))
        self.graph_conv = DyGraphConv(dim, 2 * dim, k, dilation, reduction, act_layer, **dd)
        self.fc2 = nn.Sequential(nn.Conv2d(2 * dim, dim, 1, **dd), nn.BatchNorm2d(dim, **dd))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # fixed, but saved under the reference's key (there a Parameter with requires_grad=False)
        self.register_buffer("relative_pos", relative_position(dim, grid, reduction).to(
            device=device, dtype=dtype or torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fc2(self.graph_conv(self.fc1(x), self.relative_pos)))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU, drop_path: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Sequential(nn.Conv2d(dim, hidden, 1, **dd), nn.BatchNorm2d(hidden, **dd))
        self.act = act_layer()
        self.fc2 = nn.Sequential(nn.Conv2d(hidden, dim, 1, **dd), nn.BatchNorm2d(dim, **dd))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fc2(self.act(self.fc1(x))))


class ViGBlock(nn.Sequential):
    """Grapher then FFN; a Sequential so that the children are `0` and `1`, as in the reference."""

    def __init__(self, dim: int, grid: int, k: int, dilation: int, reduction: int, act_layer=nn.GELU,
                 drop_path: float = 0.0, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__(Grapher(dim, grid, k, dilation, reduction, act_layer, drop_path, **dd),
                         FFN(dim, 4 * dim, act_layer, drop_path, **dd))


class Stem(nn.Module):
    """conv3x3 s2 + BN + act, conv3x3 s(stride/2) + BN + act, conv3x3 s1 + BN; total stride 4 (or 2)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 4, act_layer=nn.GELU, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.convs = nn.Sequential(
            nn.Conv2d(in_chs, out_chs // 2, 3, stride=2, padding=1, **dd), nn.BatchNorm2d(out_chs // 2, **dd),
            act_layer(),
            nn.Conv2d(out_chs // 2, out_chs, 3, stride=stride // 2, padding=1, **dd), nn.BatchNorm2d(out_chs, **dd),
            act_layer(),
            nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, **dd), nn.BatchNorm2d(out_chs, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class Downsample(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, device=device, dtype=dtype),
                                  nn.BatchNorm2d(out_chs, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@register_notrace_function  # a leaf of torch.fx graphs: its Python `if` on the shape is not traced
def check_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """x unchanged if it is a size x size image; else a ValueError saying why the size is fixed."""
    if x.shape[2] != size or x.shape[3] != size:
        raise ValueError(f"Pyramid ViG was built for {size}x{size} inputs but got {x.shape[2]}x{x.shape[3]}: its "
                         f"position embedding and relative-position tables fix the input size; create it with "
                         f"img_size matching the data (square inputs only)")
    return x


class PyramidViG(nn.Module):
    """Pyramid ViG (vig_pytorch's DeepGCN in pyramid_vig.py): stem, four stages of Grapher + FFN blocks in one
    flat `backbone` (Downsample modules between the stages, as the reference numbers them), conv head.

    `global_pool` 'avg' (the reference) or '' (no pooling: the head's 1x1 convs act at every position)."""

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 channels=(48, 96, 240, 384), blocks=(2, 2, 6, 2), k: int = 9, reduce_ratios=(4, 2, 1, 1),
                 stem_stride: int = 4, head_dim: int = 1024, act_layer=nn.GELU, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: str = "avg", device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _check_pool(global_pool)
        if isinstance(img_size, (tuple, list)):  # timm passes the cfg's (H, W) for fixed-size models
            if img_size[0] != img_size[1]:
                raise ValueError(f"Pyramid ViG supports square inputs only, got img_size {tuple(img_size)}")
            img_size = img_size[0]
        n_stages = len(blocks)
        if stem_stride not in (2, 4) or img_size % (stem_stride * 2 ** (n_stages - 1)):
            raise ValueError(f"Pyramid ViG: stem_stride must be 2 or 4 and img_size {img_size} divisible by "
                             f"{stem_stride * 2 ** (n_stages - 1)}")
        if any(c % 4 for c in channels):
            raise ValueError(f"Pyramid ViG: channels {list(channels)} must be multiples of 4 (the sin-cos "
                             f"embedding and the grouped conv)")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.channels, self.blocks = tuple(channels), tuple(blocks)
        self.num_features, self.head_hidden_size = channels[-1], head_dim
        self.global_pool = global_pool
        self.grad_checkpointing = False
        n_blocks = sum(blocks)
        # torch.linspace on the CPU, as the reference (and outside any meta-device context): the int() of its
        # float32 values is the k schedule
        num_knn = [int(v) for v in torch.linspace(k, 2 * k, n_blocks, device="cpu").tolist()]
        dpr = torch.linspace(0, drop_path_rate, n_blocks, device="cpu").tolist()
        grids = [img_size // stem_stride >> i for i in range(n_stages)]
        keys = [(g // r) ** 2 for g, r in zip(grids, reduce_ratios, strict=True)]
        max_dilation = keys[-1] // max(num_knn)  # the reference's 49 // max(num_knn) at 224 px

        self.stem = Stem(in_chans, channels[0], stem_stride, act_layer, **dd)
        self.pos_embed = nn.Parameter(torch.zeros(1, channels[0], grids[0], grids[0], **dd))
        layers, self.stage_ends, self.dilations, self.num_knn = [], [], [], num_knn
        idx = 0
        for i, (dim, depth, grid, r) in enumerate(zip(channels, blocks, grids, reduce_ratios, strict=True)):
            if i > 0:
                layers.append(Downsample(channels[i - 1], dim, **dd))
            if grid % r:
                raise ValueError(f"Pyramid ViG: stage {i + 1}'s {grid}x{grid} grid is not divisible by its key "
                                 f"pooling r={r}")
            for _ in range(depth):
                dilation = max(min(idx // 4 + 1, max_dilation), 1)
                if num_knn[idx] * dilation > keys[i]:
                    raise ValueError(f"Pyramid ViG: block {idx} needs k*d = {num_knn[idx]}*{dilation} neighbours but "
                                     f"stage {i + 1} has {keys[i]} keys at {img_size} px ({grid}x{grid} tokens, r={r});"
                                     f" use a smaller k or a larger img_size")
                layers.append(ViGBlock(dim, grid, num_knn[idx], dilation, r, act_layer, dpr[idx], **dd))
                self.dilations.append(dilation)
                idx += 1
            self.stage_ends.append(len(layers) - 1)
        self.backbone = nn.Sequential(*layers)
        self.feature_info = [dict(num_chs=c, reduction=stem_stride * 2 ** i, module=f"backbone.{end}")
                             for i, (c, end) in enumerate(zip(channels, self.stage_ends, strict=True))]
        self.prediction = nn.Sequential(
            nn.Conv2d(channels[-1], head_dim, 1, **dd), nn.BatchNorm2d(head_dim, **dd), act_layer(),
            nn.Dropout(drop_rate),
            nn.Conv2d(head_dim, num_classes, 1, **dd) if num_classes > 0 else nn.Identity())
        for m in self.modules():  # the reference's model_init (BasicConv's reset_parameters does the same)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.prediction[4]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, device=None, dtype=None) -> None:
        """A new last 1x1 conv on the model's device and dtype (unless given); the 1024-wide conv, BN and act before
        it stay (they are the pre-logits). `global_pool` None keeps the pooling."""
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.num_classes = num_classes
        dd = get_device_dtype(self, device, dtype)
        self.prediction[4] = (nn.Conv2d(self.head_hidden_size, num_classes, 1, **dd)
                              if num_classes > 0 else nn.Identity()).train(self.training)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(check_size(x, self.img_size)) + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.backbone, x)
        return self.backbone(x)

    @torch.jit.ignore
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's backbone API: each stage's output map [B, C, h, w] for `indices` (last n if an int, all if None);
        the model has no final norm, so `norm` changes nothing. Returns the intermediates, or (final features,
        intermediates)."""
        if output_fmt != "NCHW":
            raise ValueError(f"Pyramid ViG: output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        take = {self.stage_ends[i] for i in take_indices}
        last = self.stage_ends[max_index] if stop_early or intermediates_only else len(self.backbone) - 1
        intermediates = []
        x = self._embed(x)
        for j, layer in enumerate(self.backbone[:last + 1]):
            x = checkpoint(layer, x) if self.grad_checkpointing else layer(x)
            if j in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers after the last stage of `indices`; returns the absolute indices."""
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        self.stage_ends = self.stage_ends[:max_index + 1]
        self.backbone = self.backbone[:self.stage_ends[-1] + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.global_pool == "avg"
        if pooled:
            x = F.adaptive_avg_pool2d(x, 1)
        x = self.prediction[3](self.prediction[2](self.prediction[1](self.prediction[0](x))))
        if not pre_logits:
            x = self.prediction[4](x)
        return x.flatten(1) if pooled else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_pool(global_pool: str) -> str:
    if global_pool not in ("avg", ""):
        raise ValueError(f"Pyramid ViG: global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    return global_pool


def checkpoint_filter_fn(state_dict: dict, model: PyramidViG) -> dict:
    """An official Pyramid ViG checkpoint (vig_pytorch) or ours as a state dict of `model`. The names are the
    official ones (`stem.convs.*`, `pos_embed`, `backbone.{i}.0.*` Grapher with its `relative_pos`,
    `backbone.{i}.1.*` FFN, `backbone.{i}.conv.*` Downsample, `prediction.{0,1,4}`), so this only unwraps: the
    training script's .pth.tar keeps the weights under 'state_dict' (timm's loader has usually unwrapped it
    already) and a DataParallel / DDP model prefixes `module.`. A key that maps to nothing, a model key the
    checkpoint lacks or a shape mismatch is a ValueError naming them; the classifier and the first conv's input
    channels are left to timm's loader (it drops / adapts them)."""
    for key in ("state_dict", "model"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    out = {k.removeprefix("module."): v for k, v in state_dict.items()}
    check_fits(out, model, f"channels {list(model.channels)}, blocks {list(model.blocks)}, "
                           f"img_size {model.img_size}")
    return out


def _cfg(**kwargs):
    # the reference's default_cfgs: 'vig_224_gelu' (Ti/S/M), 'vig_b_224_gelu' (B: crop 0.95); mean/std 0.5
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "first_conv": "stem.convs.0", "classifier": "prediction.4", "fixed_input_size": True, **kwargs}


default_cfgs = generate_default_cfgs({
    "pvig_ti_224_gelu.untrained": _cfg(),
    "pvig_s_224_gelu.untrained": _cfg(),
    "pvig_m_224_gelu.untrained": _cfg(),
    "pvig_b_224_gelu.untrained": _cfg(crop_pct=0.95),
    "pvig_nano.untrained": _cfg(input_size=(1, 32, 32), pool_size=(2, 2), crop_pct=1.0),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> PyramidViG:
    out_indices = kwargs.pop("out_indices", len(kwargs["blocks"]))  # features_only: every stage
    return build_model_with_cfg(PyramidViG, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **kwargs)


# pyramid_vig.py's OptInit of each variant: k 9, MRConv, GELU, BatchNorm, dropout 0, drop path 0 unless given.
@register_model
def pvig_ti_224_gelu(pretrained=False, **kwargs) -> PyramidViG:
    return _create("pvig_ti_224_gelu", pretrained, **{"channels": (48, 96, 240, 384), "blocks": (2, 2, 6, 2),
                                                      **kwargs})


@register_model
def pvig_s_224_gelu(pretrained=False, **kwargs) -> PyramidViG:
    return _create("pvig_s_224_gelu", pretrained, **{"channels": (80, 160, 400, 640), "blocks": (2, 2, 6, 2),
                                                     **kwargs})


@register_model
def pvig_m_224_gelu(pretrained=False, **kwargs) -> PyramidViG:
    return _create("pvig_m_224_gelu", pretrained, **{"channels": (96, 192, 384, 768), "blocks": (2, 2, 16, 2),
                                                     **kwargs})


@register_model
def pvig_b_224_gelu(pretrained=False, **kwargs) -> PyramidViG:
    return _create("pvig_b_224_gelu", pretrained, **{"channels": (128, 256, 512, 1024), "blocks": (2, 2, 18, 2),
                                                     **kwargs})


# Small-input Pyramid ViG for 32x32 data (module docstring): stem stride 2, grids 16, 8, 4, 2, k 2..4.
@register_model
def pvig_nano(pretrained=False, **kwargs) -> PyramidViG:
    return _create("pvig_nano", pretrained, **{"img_size": 32, "in_chans": 1, "stem_stride": 2, "k": 2,
                                               "channels": (24, 48, 96, 192), "blocks": (2, 2, 6, 2), **kwargs})
