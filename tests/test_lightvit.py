"""LightViT: exact parameter counts, the nano shape, the relative position bias, padding, no_weight_decay."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import pipeline.models  # noqa: F401
from pipeline.benchmark import count_params
from pipeline.models.lightvit import LightViTAttention, ResidualMergePatch, relative_position_index

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
    assert feats.shape == (1, 8 + 4 * 4, 64)  # global tokens + 4x4 image tokens of the last stage
    assert model.forward_head(feats, pre_logits=True).shape == (1, 320)


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
        out = attn.forward_local(q, k, v, H, W)
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
