"""GFNet against the reference code (raoyongming/GFNet at 2de48b6): variant hyperparameters, official
checkpoints, dropout placement and timm's backbone API.

`RefGFNetPyramid` and `RefGFNet` re-implement the reference's module tree and forward (gfnet.py GFNetPyramid,
GFNet, GlobalFilter, Block, BlockLayerScale, PatchEmbed, DownLayer) with its parameter names, so their state
dicts have the layout of the official checkpoints; their weights are random.
"""
import argparse
import math
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
from conftest import assert_grad_checkpointing_is_exact

import pipeline.models  # noqa: F401
from pipeline.models.gfnet import checkpoint_filter_fn

LN = partial(nn.LayerNorm, eps=1e-6)


class RefGlobalFilter(nn.Module):
    def __init__(self, dim, h):
        super().__init__()
        self.complex_weight = nn.Parameter(torch.randn(h, h // 2 + 1, dim, 2) * 0.02)

    def forward(self, x):  # tokens [B, N, C] viewed as a square grid
        B, N, C = x.shape
        a = int(math.sqrt(N))
        x = torch.fft.rfft2(x.view(B, a, a, C).float(), dim=(1, 2), norm="ortho")
        x = torch.fft.irfft2(x * torch.view_as_complex(self.complex_weight), s=(a, a), dim=(1, 2), norm="ortho")
        return x.reshape(B, N, C)


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    """Block; BlockLayerScale when `init_values` is given."""

    def __init__(self, dim, h, init_values=None):
        super().__init__()
        self.norm1 = LN(dim)
        self.filter = RefGlobalFilter(dim, h)
        self.norm2 = LN(dim)
        self.mlp = RefMlp(dim, 4 * dim)
        if init_values is not None:
            self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        y = self.mlp(self.norm2(self.filter(self.norm1(x))))
        return x + (self.gamma * y if hasattr(self, "gamma") else y)


class RefPatchEmbed(nn.Module):
    def __init__(self, in_chans, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RefDownLayer(nn.Module):
    def __init__(self, size, dim_in, dim_out):
        super().__init__()
        self.size = size
        self.proj = nn.Conv2d(dim_in, dim_out, 2, 2)

    def forward(self, x):
        B, N, C = x.shape
        x = self.proj(x.view(B, self.size, self.size, C).permute(0, 3, 1, 2))
        return x.permute(0, 2, 3, 1).reshape(B, -1, x.shape[1])


class RefGFNetPyramid(nn.Module):
    def __init__(self, img_size, patch_size, dims, depths, init_values, num_classes=1000):
        super().__init__()
        sizes = [img_size // patch_size >> i for i in range(4)]
        self.patch_embed = nn.ModuleList([RefPatchEmbed(3, dims[0], patch_size)])
        self.patch_embed.extend(RefDownLayer(sizes[i], dims[i], dims[i + 1]) for i in range(3))
        self.pos_embed = nn.Parameter(torch.zeros(1, sizes[0] ** 2, dims[0]))
        self.blocks = nn.ModuleList(nn.Sequential(*[RefBlock(dims[i], sizes[i], init_values)
                                                    for _ in range(depths[i])]) for i in range(4))
        self.norm = LN(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for i in range(4):
            x = self.patch_embed[i](x)
            if i == 0:
                x = x + self.pos_embed
            x = self.blocks[i](x)
        return self.head(self.norm(x).mean(1))


class RefGFNet(nn.Module):
    def __init__(self, img_size, patch_size, dim, depth, num_classes=1000):
        super().__init__()
        size = img_size // patch_size
        self.patch_embed = RefPatchEmbed(3, dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, size ** 2, dim))
        self.blocks = nn.ModuleList(RefBlock(dim, size) for _ in range(depth))
        self.norm = LN(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


# main_gfnet.py's gfnet-h-ti / -h-s / -h-b (GFNetPyramid; gfnet-h-ti keeps its default init_values 1e-3) and
# gfnet-b (GFNet, no layer scale); all with patch 4 / 16, MLP ratio 4 and LayerNorm eps 1e-6.
REFERENCE = {
    "gfnet_h_ti": dict(dims=(64, 128, 256, 512), depths=(3, 3, 10, 3), drop_path=0.1, init_values=1e-3),
    "gfnet_h_s": dict(dims=(96, 192, 384, 768), depths=(3, 3, 10, 3), drop_path=0.2, init_values=1e-5),
    "gfnet_h_b": dict(dims=(96, 192, 384, 768), depths=(3, 3, 27, 3), drop_path=0.4, init_values=1e-6),
    "gfnet_b": dict(dims=(512,), depths=(19,), drop_path=0.25, init_values=None),
}


def _reference(name):
    ref = REFERENCE[name]
    if len(ref["dims"]) == 1:
        return RefGFNet(224, 16, ref["dims"][0], ref["depths"][0])
    return RefGFNetPyramid(224, 4, ref["dims"], ref["depths"], ref["init_values"])


def _blocks(model):
    return [block for stage in model.stages for block in stage]


@pytest.mark.parametrize("name", REFERENCE)
def test_variant_hyperparameters_match_main_gfnet(name):
    ref = REFERENCE[name]
    with torch.device("meta"):
        model = timm.create_model(name)
    assert model.embed_dims == ref["dims"] and tuple(len(s) for s in model.stages) == ref["depths"]
    assert model.downsample[0].proj.stride == ((4, 4) if len(ref["dims"]) > 1 else (16, 16))
    assert _blocks(model)[-1].drop_path.drop_prob == pytest.approx(ref["drop_path"])  # linear rule ends there
    assert all(b.mlp.fc1.out_features == 4 * b.mlp.fc1.in_features for b in _blocks(model))
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    # the layer-scale init needs values: the same variant at a tiny width
    tiny = timm.create_model(name, embed_dims=(8,) * len(ref["dims"]), img_size=64)
    for block in _blocks(tiny):
        if ref["init_values"] is None:
            assert block.gamma is None
        else:
            assert torch.equal(block.gamma, torch.full((8,), ref["init_values"]))


@pytest.mark.parametrize("name", REFERENCE)
def test_official_layout_maps_onto_every_variant(name):
    """Every key of a full-size official checkpoint lands on a model key of the same shape (meta tensors)."""
    with torch.device("meta"):
        ref = _reference(name)
        model = timm.create_model(name)
    mapped = checkpoint_filter_fn(ref.state_dict(), model)
    ours = model.state_dict()
    assert mapped.keys() == ours.keys()
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def _randomize(model):
    """Random values for the parameters the reference initialises to constants, so that a misplaced norm,
    layer scale or position embedding shows; convs and linears keep PyTorch's random init."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("complex_weight"):
                p.normal_(std=0.3)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "norm" in name or name.endswith(("gamma", "pos_embed")):
                p.normal_(std=0.2)


def _official(form):
    """A reference model in the official layout and the same model from our registry (timm kwargs)."""
    if form == "GFNet-H":  # GFNetPyramid at gfnet_nano's shape (3-channel input, as GFNetPyramid)
        ref = RefGFNetPyramid(32, 2, (24, 48, 96, 192), (2, 2, 6, 2), init_values=1e-5, num_classes=10)
        return ref, "gfnet_nano", dict(in_chans=3), 32
    ref = RefGFNet(64, 16, 32, 3, num_classes=10)  # GFNet (flat, GFNet-B's form) at a tiny width
    return ref, "gfnet_b", dict(img_size=64, embed_dims=(32,), depths=(3,)), 64


def _save_official(ref, path):
    """As main_gfnet.py saves them: the weights under 'model', next to training state."""
    torch.save({"model": ref.state_dict(), "epoch": 299, "args": argparse.Namespace(arch="gfnet", lr=1e-3)}, path)


@pytest.mark.parametrize("form", ["GFNet-H", "GFNet-B"])
def test_official_checkpoint_loads_strictly_and_matches_the_reference(form, tmp_path):
    torch.manual_seed(0)
    ref, name, kwargs, size = _official(form)
    _randomize(ref)
    ref.eval()
    path = tmp_path / "official.pth"
    _save_official(ref, path)
    overlay = dict(file=str(path), num_classes=10, input_size=(3, size, size))  # a 3-channel checkpoint
    model = timm.create_model(name, pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay, **kwargs).eval()
    # strict: every model tensor comes from the file
    mapped = checkpoint_filter_fn(ref.state_dict(), model)
    assert mapped.keys() == model.state_dict().keys()
    assert all(torch.equal(v, mapped[k]) for k, v in model.state_dict().items())
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        expected, got = ref(x), model(x)
    delta = (got - expected).abs().max().item()
    print(f"{form}: max |delta logit| vs the reference = {delta:.3g} (logit scale {expected.abs().max():.3g})")
    assert delta < 1e-5


def test_official_checkpoint_loads_as_a_feature_backbone(tmp_path):
    torch.manual_seed(0)
    ref, name, kwargs, size = _official("GFNet-H")
    _randomize(ref)
    path = tmp_path / "official.pth"
    _save_official(ref, path)
    overlay = dict(file=str(path), num_classes=10, input_size=(3, size, size))
    backbone = timm.create_model(name, features_only=True, pretrained=True, pretrained_cfg_overlay=overlay,
                                 **kwargs).eval()
    model = timm.create_model(name, pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        for a, b in zip(backbone(x), model.forward_intermediates(x, intermediates_only=True), strict=True):
            torch.testing.assert_close(a, b)


def test_own_checkpoints_still_load(tmp_path):
    torch.manual_seed(1)
    ours = timm.create_model("gfnet_nano", num_classes=10)
    path = tmp_path / "model.pt"
    torch.save({"model": "gfnet_nano", "model_kwargs": {"num_classes": 10}, "state_dict": ours.state_dict()}, path)
    loaded = timm.create_model("gfnet_nano", num_classes=10, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ours.state_dict().items())


def _create_from(state_dict, tmp_path, num_classes=10, in_chans=3):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state_dict}, path)
    return timm.create_model("gfnet_nano", in_chans=in_chans, pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay=dict(file=str(path), num_classes=10, input_size=(3, 32, 32)))


def test_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    pyramid = RefGFNetPyramid(32, 2, (24, 48, 96, 192), (2, 2, 6, 2), init_values=1e-5, num_classes=10).state_dict()
    # a flat GFNet of the same width for the hierarchical nano: its stages 2-4 are missing
    flat = RefGFNet(32, 2, 24, 2, num_classes=10).state_dict()
    with pytest.raises(ValueError, match=r"model keys the checkpoint lacks \(\d+\): downsample\.1\.proj\.bias"):
        _create_from(flat, tmp_path)
    # a key with no place in the model
    with pytest.raises(ValueError, match=r"checkpoint does not fit .*\n  keys that map to nothing \(1\): "
                                         r"pre_logits\.fc\.weight$"):
        _create_from({**pyramid, "pre_logits.fc.weight": torch.zeros(1)}, tmp_path)
    # trained at another input size
    big = RefGFNetPyramid(64, 2, (24, 48, 96, 192), (2, 2, 6, 2), init_values=1e-5, num_classes=10).state_dict()
    with pytest.raises(ValueError, match=r"shape mismatches \(\d+\): pos_embed: checkpoint \(1, 1024, 24\) vs "
                                         r"model \(1, 16, 16, 24\)"):
        _create_from(big, tmp_path)
    # a missing key is an error even where timm loads non-strictly (another class count drops the head)
    del pyramid["norm.weight"]
    with pytest.raises(ValueError, match=r"lacks \(1\): norm\.weight"):
        _create_from(pyramid, tmp_path, num_classes=5)


def test_three_channel_checkpoint_loads_into_a_one_channel_model(tmp_path):
    """timm's loader sums the first conv over the input channels after the filter (Fashion-MNIST is grey)."""
    ref = RefGFNetPyramid(32, 2, (24, 48, 96, 192), (2, 2, 6, 2), init_values=1e-5, num_classes=10)
    model = _create_from(ref.state_dict(), tmp_path, in_chans=1)
    torch.testing.assert_close(model.downsample[0].proj.weight, ref.patch_embed[0].proj.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.stages[3][1].filter.complex_weight, ref.blocks[3][1].filter.complex_weight)


def test_dropout_placement_follows_the_reference():
    hierarchical = timm.create_model("gfnet_nano", drop_rate=0.3, dropcls=0.2)
    mlp = hierarchical.stages[2][1].mlp
    assert mlp.drop1.p == 0.3 and mlp.drop2.p == 0.3  # after GELU and after fc2
    assert isinstance(hierarchical.pos_drop, nn.Identity)  # GFNetPyramid never applies it
    assert hierarchical.head_drop.p == 0.2
    flat = timm.create_model("gfnet_b", img_size=64, embed_dims=(32,), depths=(2,), drop_rate=0.3)
    assert flat.pos_drop.p == 0.3 and flat.stages[0][0].mlp.drop2.p == 0.3 and flat.head_drop.p == 0.0
    default = timm.create_model("gfnet_nano")
    assert default.head_drop.p == 0.0 and default.stages[0][0].mlp.drop1.p == 0.0


def test_forward_intermediates_hierarchical():
    torch.manual_seed(0)
    model = timm.create_model("gfnet_nano", num_classes=10).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert [tuple(f.shape) for f in feats] == [(2, 24, 16, 16), (2, 48, 8, 8), (2, 96, 4, 4), (2, 192, 2, 2)]
        torch.testing.assert_close(final, model.forward_features(x))
        # the final norm applies to the last stage only; NHWC keeps the token layout
        first, last = model.forward_intermediates(x, indices=[0, -1], norm=True, output_fmt="NHWC",
                                                  intermediates_only=True)
        torch.testing.assert_close(first, feats[0].permute(0, 2, 3, 1))
        torch.testing.assert_close(last, final)
        (third,) = model.forward_intermediates(x, indices=[2], intermediates_only=True)
        torch.testing.assert_close(third, feats[2])
    assert [(f["num_chs"], f["reduction"], f["module"]) for f in model.feature_info] == [
        (24, 2, "stages.0"), (48, 4, "stages.1"), (96, 8, "stages.2"), (192, 16, "stages.3")]
    assert model.prune_intermediate_layers(indices=2) == [2, 3]  # last two: nothing to drop but the head
    assert len(model.stages) == 4 and isinstance(model.head, nn.Identity)


def test_forward_intermediates_flat_model_taps_every_block():
    torch.manual_seed(0)
    model = timm.create_model("gfnet_b", img_size=64, embed_dims=(32,), depths=(3,), in_chans=1).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        final, normed = model.forward_intermediates(x, norm=True)
        raw = model.forward_intermediates(x, intermediates_only=True)
        assert [tuple(f.shape) for f in raw] == [(2, 32, 4, 4)] * 3
        torch.testing.assert_close(normed[-1], final.permute(0, 3, 1, 2))  # every block's output is normed
        torch.testing.assert_close(normed[0], model.norm(raw[0].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        assert [f["module"] for f in model.feature_info] == ["stages.0.0", "stages.0.1", "stages.0.2"]
        assert model.prune_intermediate_layers(indices=[1], prune_norm=True) == [1]
        assert len(model.stages[0]) == 2 and isinstance(model.norm, nn.Identity)
        (pruned,) = model.forward_intermediates(x, indices=[1], intermediates_only=True)
    torch.testing.assert_close(pruned, raw[1])


def test_features_only():
    torch.manual_seed(0)
    model = timm.create_model("gfnet_nano").eval()
    torch.manual_seed(0)
    backbone = timm.create_model("gfnet_nano", features_only=True, out_indices=(0, 2)).eval()
    assert backbone.feature_info.channels() == [24, 96] and backbone.feature_info.reduction() == [2, 8]
    assert len(backbone.model.stages) == 3  # pruned after the last wanted stage
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        got = backbone(x)
        expected = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert [tuple(f.shape) for f in got] == [(2, 24, 16, 16), (2, 96, 4, 4)]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert len(timm.create_model("gfnet_nano", features_only=True)(x)) == 4  # default: every stage
    flat = timm.create_model("gfnet_b", features_only=True, img_size=64, embed_dims=(32,), depths=(6,))
    assert flat.feature_info.module_name() == ["stages.0.2", "stages.0.3", "stages.0.4", "stages.0.5"]


@pytest.mark.parametrize("name,kwargs,size", [
    ("gfnet_nano", {}, 32), ("gfnet_b", dict(img_size=64, embed_dims=(32,), depths=(3,), in_chans=1), 64)])
def test_grad_checkpointing_gives_the_same_gradients(name, kwargs, size):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.0, **kwargs)  # train mode, deterministic
    x = torch.randn(2, 1, size, size)
    assert_grad_checkpointing_is_exact(model, x, model.stages[0][0])
