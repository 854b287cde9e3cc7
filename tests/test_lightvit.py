"""LightViT: exact parameter counts, the nano shape, the relative position bias, padding, no_weight_decay, a
reference-layout checkpoint against a re-implementation of the reference forward, timm's backbone API."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_grad_checkpointing_is_exact
from timm.optim import create_optimizer_v2

import pipeline.models  # noqa: F401
from pipeline.measure import count_params
from pipeline.models.lightvit import (
    LightViTAttention,
    ResidualMergePatch,
    checkpoint_filter_fn,
    relative_position_index,
    window_attention,
)

# The reference code (hunto/image_classification_sota lib/models/lightvit.py) instantiated at 1000 classes:
# 9,377,698 / 19,200,248 / 35,195,653 (paper: 9.4M / 19.2M / 35.2M).
LIGHTVIT_PARAMS = {"lightvit_tiny": 9_377_698, "lightvit_small": 19_200_248, "lightvit_base": 35_195_653}


@pytest.mark.parametrize("name", LIGHTVIT_PARAMS)
def test_lightvit_parameter_counts(name):
    assert count_params(timm.create_model(name)) == LIGHTVIT_PARAMS[name]


def _grids(model, x):
    """Image-token grid of each stage (stem output, then each patch merge)."""
    grids = []
    hooks = [model.patch_embed.register_forward_hook(lambda m, i, o: grids.append(tuple(o[1])))]
    hooks += [m.register_forward_hook(lambda m, i, o: grids.append(tuple(o[1])))
              for m in model.modules() if isinstance(m, ResidualMergePatch)]
    out = model(x)
    for h in hooks:
        h.remove()
    return grids, out


def test_nano_forward_backward_on_cpu():
    torch.manual_seed(0)
    model = timm.create_model("lightvit_nano", num_classes=10)
    assert model.num_classes == 10 and model.in_chans == 1
    assert [sum(not isinstance(b, ResidualMergePatch) for b in s) for s in model.stages] == [2, 2, 2]
    grids, out = _grids(model, torch.randn(2, 1, 32, 32))
    assert grids == [(16, 16), (8, 8), (4, 4)]  # window 4: 16 / 4 / 1 windows per stage
    assert out.shape == (2, 10)
    out.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["global_token"].abs().sum() > 0
    assert grads["stages.0.0.attn.relative_position_bias_table"].abs().sum() > 0
    # 28x28 (unpadded Fashion-MNIST) needs window padding and an odd-grid merge: 14 -> 7 -> 4
    model.eval()
    grids, out = _grids(model, torch.randn(2, 1, 28, 28))
    assert grids == [(14, 14), (7, 7), (4, 4)] and out.shape == (2, 10)


def test_classifier_api():
    model = timm.create_model("lightvit_nano", num_classes=10, in_chans=3)
    assert model.in_chans == 3 and model.get_classifier().out_features == 10
    model.reset_classifier(5)
    assert model.num_classes == 5 and model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    feats = model.forward_features(torch.randn(1, 3, 32, 32))
    # global tokens + 4x4 image tokens of the last stage, after the neck (the reference's forward_features)
    assert feats.shape == (1, 8 + 4 * 4, 320) and model.num_features == model.head_hidden_size == 320
    assert model.forward_head(feats, pre_logits=True).shape == (1, 320)
    torch.testing.assert_close(model.forward_head(feats), model.head(feats.mean(1)))


def _window_attention(window=4, dim=32, heads=2, tokens=3):
    torch.manual_seed(0)
    attn = LightViTAttention(dim, heads, tokens, window_size=window).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(std=1.0)  # a clearly non-zero bias
    return attn


def test_window_attention_uses_relative_position_bias():
    """Without a position bias, attention is permutation-equivariant within a window (global aggregation is
    invariant, the broadcast is per token); with it, swapping two image tokens of one window is not."""
    ws, T = 4, 3
    attn = _window_attention(window=ws, tokens=T)
    H = W = 2 * ws
    x = torch.randn(1, T + H * W, 32)
    a, b = T + 0, T + 1 * W + 2  # image tokens (0, 0) and (1, 2): both in the first window
    perm = torch.arange(x.shape[1])
    perm[a], perm[b] = b, a
    with torch.no_grad():
        out, out_perm = attn(x, H, W), attn(x[:, perm], H, W)
        assert not torch.allclose(out_perm, out[:, perm], atol=1e-4)
        # control: with a zero table the same swap only permutes the output, so the check above is not trivial
        attn.relative_position_bias_table.zero_()
        torch.testing.assert_close(attn(x[:, perm], H, W), attn(x, H, W)[:, perm], atol=1e-5, rtol=1e-5)


def test_padded_window_attention_masks_padded_keys():
    """A 5x6 grid with window 4 is padded to 8x8; each real query attends only to the real tokens of its
    window, with the relative position bias of their offsets (brute force over the unpadded tokens)."""
    ws, T, H, W, heads = 4, 3, 5, 6, 2
    attn = _window_attention(window=ws, tokens=T, heads=heads)
    x = torch.randn(2, T + H * W, 32)
    q, k, v = attn.qkv(x).view(2, -1, 3, heads, 16).permute(2, 0, 3, 1, 4).unbind(0)
    q, k, v = q[:, :, T:], k[:, :, T:], v[:, :, T:]
    with torch.no_grad():
        out = window_attention(q, k, v, attn.position_bias(), H, W, ws, 0.0)
        table = attn.relative_position_bias_table
        index = relative_position_index(ws)
        expected = torch.empty_like(out)
        for i in range(H * W):
            r, c = divmod(i, W)
            same = [j for j in range(H * W) if (j // W) // ws == r // ws and (j % W) // ws == c // ws]
            pos = [(j // W % ws) * ws + j % W % ws for j in same]
            bias = table[index[(r % ws) * ws + c % ws, pos]].T  # [heads, n]
            logits = q[:, :, i:i + 1] @ k[:, :, same].transpose(-2, -1) * 16 ** -0.5 + bias[None, :, None]
            expected[:, i] = (F.softmax(logits, -1) @ v[:, :, same]).flatten(1)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    return timm.create_model("lightvit_tiny").eval()


@pytest.mark.parametrize("size,grids", [(224, [(28, 28), (14, 14), (7, 7)]), (200, [(25, 25), (13, 13), (7, 7)])])
def test_input_sizes_needing_padding_work(tiny, size, grids):
    with torch.no_grad():
        got, out = _grids(tiny, torch.randn(1, 3, size, size))
    assert got == grids and out.shape == (1, 1000) and torch.isfinite(out).all()


def test_no_weight_decay_lists_global_tokens_and_bias_tables(tiny):
    names = tiny.no_weight_decay()
    tables = {n for n, _ in tiny.named_parameters() if n.endswith("relative_position_bias_table")}
    assert len(tables) == 2 + 6 + 6  # one per block
    assert names == {"global_token"} | tables
    optimizer = create_optimizer_v2(tiny, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    params = dict(tiny.named_parameters())
    assert all(id(params[n]) in no_decay for n in names)
    assert id(params["stages.0.0.attn.qkv.weight"]) not in no_decay


# --- the reference (hunto/image_classification_sota lib/models/lightvit.py), re-implemented with its module
# names and forward; window 2 at 64 px so that every stage grid (8, 4, 2) is a multiple of the window, as the
# reference requires
class RefStem(nn.Module):
    def __init__(self, in_chans, dim):
        super().__init__()
        mid = dim // 2
        layers = []
        for cin, stride, groups in ((in_chans, 2, 1), (mid, 1, mid), (mid, 1, mid), (mid, 2, mid)):
            layers += [nn.Conv2d(cin, mid, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(mid), nn.GELU()]
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(mid, dim, 3, 2, 1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(self.stem(x))
        return self.norm(x.flatten(2).transpose(1, 2)), tuple(x.shape[-2:])


class RefBiAttn(nn.Module):
    def __init__(self, dim):
        super().__init__()
        r = dim // 4
        self.norm = nn.LayerNorm(dim)
        self.global_reduce, self.local_reduce = nn.Linear(dim, r), nn.Linear(dim, r)
        self.channel_select, self.spatial_select = nn.Linear(r, dim), nn.Linear(2 * r, 1)

    def forward(self, x):
        y = self.norm(x)
        g = F.gelu(self.global_reduce(y.mean(1, keepdim=True)))
        local = F.gelu(self.local_reduce(y))
        s = torch.sigmoid(self.spatial_select(torch.cat([local, g.expand(-1, y.shape[1], -1)], -1)))
        return x * (torch.sigmoid(self.channel_select(g)) * s)


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2, self.attn = nn.Linear(dim, hidden), nn.Linear(hidden, dim), RefBiAttn(dim)

    def forward(self, x):
        return self.attn(self.fc2(F.gelu(self.fc1(x))))


class RefAttention(nn.Module):
    def __init__(self, dim, num_tokens, heads, ws):
        super().__init__()
        self.T, self.heads, self.ws, self.scale = num_tokens, heads, ws, (dim // heads) ** -0.5
        self.qkv, self.kv_global, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads))
        # Swin's index: (dy + ws - 1) * (2ws - 1) + (dx + ws - 1) for key offset (dy, dx)
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("relative_position_index", (rel[..., 0] * (2 * ws - 1) + rel[..., 1]).view(-1))

    def attend(self, q, k, v, bias=0.0):
        return ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(-1) @ v

    def forward(self, x, H, W):
        B, N, C = x.shape
        T, h, ws, A = self.T, self.heads, self.ws, self.ws ** 2
        q, k, v = self.qkv(x).view(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        qi, ki, vi = q[:, :, T:], k[:, :, T:], v[:, :, T:]

        def windows(t):
            t = t.reshape(B, h, H // ws, ws, W // ws, ws, C // h).permute(0, 2, 4, 1, 3, 5, 6)
            return t.reshape(-1, h, A, C // h)

        bias = self.relative_position_bias_table[self.relative_position_index].view(A, A, h).permute(2, 0, 1)
        local = self.attend(windows(qi), windows(ki), windows(vi), bias).transpose(1, 2).reshape(-1, A, C)
        local = local.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H * W, C)
        glb = self.attend(q[:, :, :T], ki, vi).transpose(1, 2).reshape(B, T, C)
        kg, vg = self.kv_global(glb).view(B, T, 2, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        img = local + self.attend(qi, kg, vg).transpose(1, 2).reshape(B, H * W, C)
        return self.proj(torch.cat([glb, img], 1))


class RefBlock(nn.Module):
    def __init__(self, dim, num_tokens, heads, ws, mlp_ratio):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, num_tokens, heads, ws)
        self.mlp = RefMlp(dim, dim * mlp_ratio)

    def forward(self, x, H, W):
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp(self.norm2(x))


class RefMerge(nn.Module):
    def __init__(self, dim, out_dim, num_tokens):
        super().__init__()
        self.T = num_tokens
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, out_dim, bias=False)
        self.norm2, self.proj = nn.LayerNorm(dim), nn.Linear(dim, out_dim, bias=False)
        self.maxp = nn.MaxPool3d((2, 2, 1), (2, 2, 1))  # on [B, H, W, C]: pools H and W
        self.res_proj = nn.Linear(dim, out_dim, bias=False)

    def forward(self, x, H, W):
        g, x = x[:, :self.T], x[:, self.T:]
        B, _, C = x.shape
        x = x.reshape(B, H, W, C)
        res = self.res_proj(self.maxp(x).reshape(B, -1, C))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        x = self.reduction(self.norm(x.reshape(B, -1, 4 * C))) + res
        return torch.cat([self.proj(self.norm2(g)), x], 1), (H // 2, W // 2)


class RefLightViT(nn.Module):
    def __init__(self, dims, depths, heads, mlp_ratios, num_tokens, ws, neck_dim, num_classes):
        super().__init__()
        self.patch_embed = RefStem(3, dims[0])
        self.global_token = nn.Parameter(torch.randn(1, num_tokens, dims[0]))
        self.stages = nn.Sequential(*[nn.Sequential(
            *([RefMerge(dims[i - 1], dims[i], num_tokens)] if i else []),
            *[RefBlock(dims[i], num_tokens, heads[i], ws, mlp_ratios[i]) for _ in range(depths[i])])
            for i in range(len(dims))])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.neck = nn.Sequential(nn.Linear(dims[-1], neck_dim), nn.LayerNorm(neck_dim), nn.GELU())
        self.head = nn.Linear(neck_dim, num_classes)

    def forward(self, x):
        x, (H, W) = self.patch_embed(x)
        x = torch.cat([self.global_token.expand(x.shape[0], -1, -1), x], 1)
        for stage in self.stages:
            for block in stage:
                if isinstance(block, RefMerge):
                    x, (H, W) = block(x, H, W)
                else:
                    x = block(x, H, W)
        return self.head(self.neck(self.norm(x)).mean(1))


SMALL = dict(embed_dims=(16, 32, 64), depths=(1, 2, 1), num_heads=(1, 2, 4), mlp_ratios=(8, 4, 4), num_tokens=3,
             window_size=2, neck_dim=40)


def test_reference_checkpoint_loads_strictly_and_matches_the_reference(tmp_path):
    torch.manual_seed(0)
    ref = RefLightViT(SMALL["embed_dims"], SMALL["depths"], SMALL["num_heads"], SMALL["mlp_ratios"],
                      SMALL["num_tokens"], SMALL["window_size"], SMALL["neck_dim"], num_classes=10)
    with torch.no_grad():  # non-trivial norms and batch-norm statistics
        for name, t in ref.state_dict().items():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "running_var", "neck.1.weight")):
                t.copy_(1 + 0.2 * torch.rand_like(t))
            elif t.is_floating_point() and name.endswith(("bias", "running_mean")):
                t.normal_(std=0.1)
    ref.eval()
    path = tmp_path / "lightvit.pth.tar"
    # as the reference's CheckpointSaver writes them (lib/utils/misc.py)
    torch.save({"epoch": 299, "model": ref.state_dict(), "ema_model": None, "optimizer": None}, path)
    model = timm.create_model("lightvit_tiny", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **SMALL).eval()
    mapped = checkpoint_filter_fn(ref.state_dict(), model)
    assert mapped.keys() == model.state_dict().keys()  # only the relative_position_index buffers are dropped
    assert set(ref.state_dict()) - set(mapped) == {n for n in ref.state_dict() if n.endswith("relative_position_index")}
    assert all(torch.equal(v, mapped[k]) for k, v in model.state_dict().items())
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected, got = ref(x), model(x)
    delta = (got - expected).abs().max().item()
    print(f"LightViT: max |delta logit| vs the reference = {delta:.3g} (logit scale {expected.abs().max():.3g})")
    assert delta < 1e-5


def test_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    state = timm.create_model("lightvit_nano", num_classes=10).state_dict()
    state["stages.0.0.attn.extra"] = torch.zeros(1)
    del state["norm.weight"]
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, path)
    # another class count: timm loads non-strictly, the filter still refuses
    with pytest.raises(ValueError, match=r"keys that map to nothing \(1\): stages\.0\.0\.attn\.extra\n"
                                         r"  model keys the checkpoint lacks \(1\): norm\.weight"):
        timm.create_model("lightvit_nano", num_classes=5, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    with pytest.raises(ValueError, match=r"shape mismatches \(4\): "
                                         r"neck\.0\.bias: checkpoint \(320,\) vs model \(256,\)"):
        checkpoint_filter_fn(state, timm.create_model("lightvit_nano", neck_dim=256))


def test_forward_intermediates():
    torch.manual_seed(0)
    model = timm.create_model("lightvit_nano", num_classes=10).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]
        tokens = model.forward_features(x)
        torch.testing.assert_close(final, tokens)
        # image tokens only (the global tokens come first); the final norm applies to the last stage only
        first, last = model.forward_intermediates(x, indices=[0, 2], norm=True, output_fmt="NHWC",
                                                  intermediates_only=True)
        torch.testing.assert_close(first, feats[0].permute(0, 2, 3, 1))
        torch.testing.assert_close(model.neck(last.flatten(1, 2)), tokens[:, 8:])
        # 28 px: the odd grids of the padded path
        assert [f.shape[-2:] for f in model.forward_intermediates(torch.randn(1, 1, 28, 28), intermediates_only=True)] \
            == [(14, 14), (7, 7), (4, 4)]
    assert [(f["num_chs"], f["reduction"], f["module"]) for f in model.feature_info] == [
        (16, 2, "stages.0"), (32, 4, "stages.1"), (64, 8, "stages.2")]
    assert model.prune_intermediate_layers(indices=[1]) == [1]
    assert len(model.stages) == 2 and isinstance(model.head, nn.Identity) and isinstance(model.neck, nn.Identity)


def test_features_only():
    torch.manual_seed(0)
    model = timm.create_model("lightvit_nano").eval()
    torch.manual_seed(0)
    backbone = timm.create_model("lightvit_nano", features_only=True, out_indices=(0, 1)).eval()
    assert backbone.feature_info.channels() == [16, 32] and backbone.feature_info.reduction() == [2, 4]
    assert len(backbone.model.stages) == 2
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        got = backbone(x)
        expected = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert [f.shape[1] for f in timm.create_model("lightvit_tiny", features_only=True)(torch.randn(1, 3, 224, 224))] \
        == [64, 128, 256]


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model("lightvit_nano", num_classes=10, drop_path_rate=0.0)  # train mode, deterministic
    x = torch.randn(2, 1, 32, 32)
    assert_grad_checkpointing_is_exact(model, x, model.stages[1][1])
