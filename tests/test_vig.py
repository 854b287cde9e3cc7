"""Pyramid ViG (pipeline/models/vig.py): shapes, the k-NN graph, the official checkpoint layout, parameter counts."""
import pytest
import timm
import torch
import torch.nn.functional as F

from pipeline.models import model_kwargs
from pipeline.models.vig import PyramidViG, checkpoint_filter_fn, knn_graph, relative_position

# pyramid_vig.py's variants: channels, blocks
OFFICIAL = {"pvig_ti_224_gelu": ((48, 96, 240, 384), (2, 2, 6, 2)),
            "pvig_s_224_gelu": ((80, 160, 400, 640), (2, 2, 6, 2)),
            "pvig_m_224_gelu": ((96, 192, 384, 768), (2, 2, 16, 2)),
            "pvig_b_224_gelu": ((128, 256, 512, 1024), (2, 2, 18, 2))}


def official_layout(channels, blocks, num_classes=1000, in_chans=3):
    """Key -> shape of the official DeepGCN's state dict (vig_pytorch/pyramid_vig.py with gcn_lib), written from
    its module tree: Stem `convs` (conv, BN, act, conv, BN, act, conv, BN); `pos_embed` fixed at 224 // 4; a flat
    `backbone` of Downsample (`conv`: conv, BN) and Seq(Grapher, FFN) blocks; `prediction` (conv, BN, act, dropout,
    conv). Grapher: fc1 (conv, BN), graph_conv.gconv.nn (BasicConv: conv groups=4, BN, act), fc2, relative_pos
    [1, n, n / r^2] (a Parameter). Every conv has a bias; every BN its running stats and num_batches_tracked."""
    keys = {}

    def conv(name, out, inp, ks=1, groups=1):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (out, inp // groups, ks, ks), (out,)

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{p}"] = (c,)
        keys[f"{name}.num_batches_tracked"] = ()

    c0 = channels[0]
    conv("stem.convs.0", c0 // 2, in_chans, 3), bn("stem.convs.1", c0 // 2)
    conv("stem.convs.3", c0, c0 // 2, 3), bn("stem.convs.4", c0)
    conv("stem.convs.6", c0, c0, 3), bn("stem.convs.7", c0)
    keys["pos_embed"] = (1, c0, 56, 56)
    i, hw = 0, 56 * 56
    for s, (c, depth, r) in enumerate(zip(channels, blocks, (4, 2, 1, 1), strict=True)):
        if s > 0:
            conv(f"backbone.{i}.conv.0", c, channels[s - 1], 3), bn(f"backbone.{i}.conv.1", c)
            i, hw = i + 1, hw // 4
        for _ in range(depth):
            g = f"backbone.{i}.0"
            conv(f"{g}.fc1.0", c, c), bn(f"{g}.fc1.1", c)
            conv(f"{g}.graph_conv.gconv.nn.0", 2 * c, 2 * c, groups=4), bn(f"{g}.graph_conv.gconv.nn.1", 2 * c)
            conv(f"{g}.fc2.0", c, 2 * c), bn(f"{g}.fc2.1", c)
            keys[f"{g}.relative_pos"] = (1, hw, hw // (r * r))
            conv(f"backbone.{i}.1.fc1.0", 4 * c, c), bn(f"backbone.{i}.1.fc1.1", 4 * c)
            conv(f"backbone.{i}.1.fc2.0", c, 4 * c), bn(f"backbone.{i}.1.fc2.1", c)
            i += 1
    conv("prediction.0", 1024, channels[-1]), bn("prediction.1", 1024)
    conv("prediction.4", num_classes, 1024)
    return keys


def test_nano_shapes_at_32_px():
    model = timm.create_model("pvig_nano", num_classes=10).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(2, 24, 16, 16), (2, 48, 8, 8), (2, 96, 4, 4), (2, 192, 2, 2)]
    # tokens 256/64/16/4, keys after the r = 4, 2, 1, 1 pooling 16/16/16/4; k 2..4 never exceeds them
    grids = {tuple(m.relative_pos.shape) for m in model.modules() if hasattr(m, "relative_pos")}
    assert grids == {(1, 256, 16), (1, 64, 16), (1, 16, 16), (1, 4, 4)}
    assert model.num_knn == [2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4] and set(model.dilations) == {1}
    assert model_kwargs("pvig_nano", 10, 1, 32)["img_size"] == 32


def test_ti_shapes_at_224_px_and_the_official_k_and_dilation_schedule():
    model = timm.create_model("pvig_ti_224_gelu").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    grids = [tuple(m.relative_pos.shape) for m in model.modules() if hasattr(m, "relative_pos")]
    assert sorted(set(grids), reverse=True) == [(1, 3136, 196), (1, 784, 196), (1, 196, 196), (1, 49, 49)]
    # int(torch.linspace(9, 18, 12)); dilation min(i // 4 + 1, 49 // 18)
    assert model.num_knn == [9, 9, 10, 11, 12, 13, 13, 14, 15, 16, 17, 18]
    assert model.dilations == [1, 1, 1, 1] + [2] * 8


def test_sizes_the_graph_cannot_fit_are_clear_errors():
    with pytest.raises(ValueError, match=r"needs k\*d = 9\*1 neighbours but stage 1 has 4 keys at 32 px"):
        timm.create_model("pvig_ti_224_gelu", img_size=32)
    model = timm.create_model("pvig_nano")
    with pytest.raises(ValueError, match="built for 32x32 inputs but got 28x28"):
        model(torch.randn(2, 1, 28, 28))


def test_knn_graph_takes_every_dth_of_the_nearest_on_normalised_features():
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 7), torch.randn(2, 3, 9)  # 7 queries, 9 keys, 3 channels
    rel = 0.1 * torch.randn(1, 7, 9)
    for k, d in [(3, 1), (2, 2), (3, 3)]:
        idx = knn_graph(x, y, k, d, rel)
        assert idx.shape == (2, 7, k)
        dist = torch.cdist(F.normalize(x, dim=1).transpose(1, 2), F.normalize(y, dim=1).transpose(1, 2)) ** 2 + rel
        expected = dist.argsort(dim=-1)[:, :, :k * d:d]
        assert torch.equal(idx, expected)
    # the relative-position term: 2 E E^T / C of a sin-cos embedding has 1 on its diagonal, so it is -1 there and
    # a node's own position is the nearest
    table = relative_position(8, 4, 1)[0]
    assert torch.allclose(table.diagonal(), torch.full((16,), -1.0)) and torch.equal(table.argmin(1), torch.arange(16))
    assert relative_position(8, 4, 2).shape == (1, 16, 4)


def test_max_relative_graph_conv_interleaves_node_and_max_relative_channels():
    torch.manual_seed(0)
    model = timm.create_model("pvig_nano").eval()
    gc = model.backbone[0][0].graph_conv  # stage 1: r = 4, k = 2
    x = torch.randn(1, 24, 16, 16)
    rel = model.backbone[0][0].relative_pos
    y = F.avg_pool2d(x, 4).reshape(1, 24, -1)
    flat = x.reshape(1, 24, -1)
    idx = knn_graph(flat, y, gc.k, gc.dilation, rel)[0]  # [256, 2]
    m = torch.stack([(y[0][:, idx[n]] - flat[0][:, n:n + 1]).max(dim=1)[0] for n in range(256)], dim=1)
    mixed = torch.empty(48, 256)
    mixed[0::2], mixed[1::2] = flat[0], m
    with torch.no_grad():
        torch.testing.assert_close(gc(x, rel), gc.gconv.nn(mixed[None, :, :, None]).reshape(1, 48, 16, 16))


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_layout_is_ours_for_every_variant(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_layout(*OFFICIAL[name])


def _official_checkpoint(channels, blocks, num_classes):
    torch.manual_seed(0)
    sd = {}
    for k, shape in official_layout(channels, blocks, num_classes).items():
        sd[k] = (torch.tensor(7) if k.endswith("num_batches_tracked") else
                 torch.rand(shape) + 0.5 if k.endswith("running_var") else 0.2 * torch.randn(shape))
    return sd


def test_official_checkpoint_loads_strictly(tmp_path):
    channels, blocks = (8, 8, 8, 8), (1, 1, 1, 1)
    sd = _official_checkpoint(channels, blocks, 10)
    path = tmp_path / "pvig_tiny.pth.tar"
    torch.save({"epoch": 300, "state_dict": {f"module.{k}": v for k, v in sd.items()}, "arch": "pvig"}, path)
    model = timm.create_model("pvig_ti_224_gelu", channels=channels, blocks=blocks, num_classes=10, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    own = model.state_dict()
    assert own.keys() == sd.keys() and all(torch.equal(own[k], v) for k, v in sd.items())
    # the filter alone unwraps 'state_dict' and 'module.'; strict load
    fresh = timm.create_model("pvig_ti_224_gelu", channels=channels, blocks=blocks, num_classes=10).eval()
    fresh.load_state_dict(checkpoint_filter_fn(torch.load(path), fresh), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = model(x), fresh(x)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    with pytest.raises(ValueError, match=r"lacks \(1\): pos_embed"):
        checkpoint_filter_fn({k: v for k, v in sd.items() if k != "pos_embed"}, fresh)


# Parameters at 1000 classes. The official model also holds the relative-position tables as Parameters with
# requires_grad=False (here buffers): 95.2 M in all, 93.0 M trainable. Paper (Table 3): Ti 10.7, S 27.3, M 51.7,
# B 92.6 M.
PARAMS = {"pvig_ti_224_gelu": (10_714_376, 1_771_938), "pvig_s_224_gelu": (27_251_912, 1_771_938),
          "pvig_m_224_gelu": (49_525_832, 2_156_098), "pvig_b_224_gelu": (92_980_328, 2_232_930)}


@pytest.mark.parametrize("name", PARAMS)
def test_parameter_counts(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    params, tables = PARAMS[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(b.numel() for n, b in model.named_buffers() if n.endswith("relative_pos")) == tables
    if name == "pvig_b_224_gelu":  # the official count, trainable or not: 95.2 M
        assert round((params + tables) / 1e6, 1) == 95.2 and round(params / 1e6, 1) == 93.0
        # the paper's 92.6 M is this count less the 0.40 M position embedding (but its Ti and S match with it)
        assert round((params - model.pos_embed.numel()) / 1e6, 1) == 92.6


def test_features_only():
    backbone = timm.create_model("pvig_nano", features_only=True, out_indices=(1, 3)).eval()
    assert backbone.feature_info.channels() == [48, 192] and backbone.feature_info.reduction() == [4, 16]
    with torch.no_grad():
        assert [tuple(f.shape) for f in backbone(torch.randn(2, 1, 32, 32))] == [(2, 48, 8, 8), (2, 192, 2, 2)]
    assert isinstance(timm.create_model("pvig_nano"), PyramidViG)
