"""AdaViT: decision shapes, straight-through gradients, fast path = masked path, expected MACs = the common
counter on the fast path, initialisation from a dense DeiT, the usage loss (its formula and a short run), the
backbone API, and the reference's checkpoints and forward (a re-implementation of MengLcool/AdaViT below)."""
import argparse
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import pipeline.models  # noqa: F401
from pipeline.config import UsageCfg
from pipeline.io import save_checkpoint
from pipeline.losses import UsageLoss
from pipeline.measure import count_macs, count_params
from pipeline.models.adavit import checkpoint_filter_fn, gumbel_sigmoid, sinusoid_table
from pipeline.train import init_from_file

DEPTH, HEADS, PATCHES = 6, 3, 64  # ada_deit_nano: 8x8 patches of 4 px at 32 px


def mixed_model(seed=0):
    """ada_deit_nano whose decision heads give a mix of keep and drop (fresh ones drop every patch in eval);
    block 2 drops every head, so its MLP reads no channel (fc1 gives its bias)."""
    torch.manual_seed(seed)
    model = timm.create_model("ada_deit_nano", num_classes=10)
    for blk in model.blocks:
        for lin in (blk.patch_select, blk.head_select, blk.block_select):
            if lin is not None:
                torch.nn.init.normal_(lin.weight, std=0.5)
                torch.nn.init.normal_(lin.bias, std=1.5)
    torch.nn.init.zeros_(model.blocks[2].head_select.weight)
    torch.nn.init.constant_(model.blocks[2].head_select.bias, -10.0)
    with torch.no_grad():  # and always runs its MLP
        model.blocks[2].block_select.weight[1] = 0.0
        model.blocks[2].block_select.bias[1] = 10.0
    return model.eval()


def test_decision_shapes_and_defaults():
    model = timm.create_model("ada_deit_nano", num_classes=10)
    assert model.blocks[0].head_select is None and model.blocks[0].block_select is None  # from block 2 on
    assert all(b.head_select is not None for b in model.blocks[1:])
    blk = model.blocks[1]
    assert blk.tau == 5.0 and blk.thresholds == {"head": 0.5, "block": 0.5, "patch": 0.6}
    assert blk.token_mlp and not blk.detach_mlp_patch_gate  # the reference's Ada-DeiT-S
    model(torch.randn(5, 1, 32, 32))
    d = model.decisions
    assert d["patch"].shape == (5, DEPTH, PATCHES)
    assert d["head"].shape == (5, DEPTH - 1, HEADS) and d["block"].shape == (5, DEPTH - 1, 2)
    assert all(set(v.unique().tolist()) <= {0.0, 1.0} for v in d.values())  # hard decisions
    for name, shape in {"ada_deit_tiny": (196, 3), "ada_deit_small": (196, 6)}.items():
        m = timm.create_model(name)
        # the dense DeiT plus C+1 per block (patches) and (H + 2)(C+1) per block from the second on
        dense = timm.create_model(name.replace("ada_", "") + "_patch16_224")
        C, H = m.embed_dim, shape[1]
        assert count_params(m) == count_params(dense) + 12 * (C + 1) + 11 * (H + 2) * (C + 1)
        m(torch.randn(1, 3, 224, 224))
        assert m.decisions["patch"].shape == (1, 12, shape[0]) and m.decisions["head"].shape == (1, 11, shape[1])


def test_position_embedding_is_the_fixed_sinusoid_table_unless_asked():
    model = timm.create_model("ada_deit_nano", num_classes=10)
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed, sinusoid_table(PATCHES + 1, 48))
    p, j = 3, 5  # odd channel: cos
    assert model.pos_embed[0, p, j].item() == pytest.approx(math.cos(p / 10000 ** (2 * (j // 2) / 48)), abs=1e-6)
    assert model.pos_embed[0, p, j - 1].item() == pytest.approx(math.sin(p / 10000 ** (2 * (j // 2) / 48)), abs=1e-6)
    assert timm.create_model("ada_deit_nano", train_pos_embed=True).pos_embed.requires_grad


def test_gumbel_sigmoid_is_hard_with_a_straight_through_gradient():
    logits = torch.zeros(10000, requires_grad=True)
    torch.manual_seed(0)
    y = gumbel_sigmoid(logits, tau=5.0, threshold=0.6, training=True)
    assert set(y.unique().tolist()) == {0.0, 1.0}
    # P(sigmoid(logistic / 5) > 0.6) = 1 / (1 + e^(5 logit(0.6))) = 0.116
    assert 0.10 < y.mean().item() < 0.13
    y.sum().backward()
    assert logits.grad.abs().min() > 0  # every sample gets the soft sigmoid's gradient
    assert gumbel_sigmoid(torch.tensor([0.3, 0.5]), 5.0, 0.6, training=False).tolist() == [0.0, 1.0]


def test_straight_through_gradient_reaches_every_decision_head():
    model = mixed_model().train()
    for blk in model.blocks[1:]:  # branches and heads on: a gated-off branch passes no gradient to its decisions
        torch.nn.init.constant_(blk.block_select.bias, 3.0)
    torch.nn.init.constant_(model.blocks[2].head_select.bias, 0.0)
    torch.manual_seed(1)
    out = model(torch.randn(16, 1, 32, 32))
    loss = torch.nn.functional.cross_entropy(out, torch.randint(0, 10, (16,)))
    loss.backward(retain_graph=True)
    for i, blk in enumerate(model.blocks):
        # the last block's patch outputs never reach the class token (the attention mask is detached, as in
        # the reference), so only the usage loss trains its patch head
        if i < DEPTH - 1:
            assert blk.patch_select.weight.grad.abs().sum() > 0, f"block {i} patch head"
        if i >= 1:
            assert blk.head_select.weight.grad.abs().sum() > 0, f"block {i} head head"
            assert blk.block_select.weight.grad.abs().sum() > 0, f"block {i} block head"
    assert model.blocks[-1].patch_select.weight.grad.abs().sum() == 0
    usage = UsageLoss(UsageCfg())
    sum(usage(model.decisions).values()).backward()
    assert model.blocks[-1].patch_select.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("batch", [1, 16])
def test_fast_path_equals_masked_path(batch):
    """With mixed head decisions: the fast path slices q/k/v, the projection and fc1 (width select) per head."""
    model = mixed_model()
    torch.manual_seed(2)
    x = torch.randn(batch, 1, 32, 32)
    masked = model(x)
    dec = {k: v.clone() for k, v in model.decisions.items()}
    fast = model.forward_fast(x)
    torch.testing.assert_close(fast, masked, atol=1e-5, rtol=1e-5)
    # the decisions really vary: some patches, heads and branches are dropped, some kept
    assert 0 < dec["patch"].mean() < 1 and 0 < dec["head"].mean() < 1 and 0 < dec["block"].mean() < 1
    kept = dec["head"].sum(-1)
    assert ((kept > 0) & (kept < HEADS)).any()  # blocks that keep some of their heads
    assert dec["head"][:, 1].sum() == 0 and dec["block"][:, 1, 1].all()  # an MLP without heads
    assert torch.equal(model.decisions["head"], dec["head"]) and torch.equal(model.decisions["block"], dec["block"])
    with pytest.raises(RuntimeError, match="eval"):
        model.train().forward_fast(x)


def test_fast_path_runs_under_autocast():
    """A bf16 / fp16 throughput (pipeline.measure's precision policy) times the fast path under autocast: its
    branches answer in bf16 into the fp32 residual stream."""
    model = mixed_model()
    x = torch.randn(16, 1, 32, 32)
    with torch.no_grad():
        fp32 = model.forward_fast(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.forward_fast(x)
    torch.testing.assert_close(bf16.float(), fp32, atol=0.05, rtol=0.05)


def test_head_decisions_select_the_mlp_input_channels():
    """The reference's width select: a dropped head's d channels of norm2's output are zero at fc1's input."""
    model = mixed_model()
    blk = model.blocks[1]
    torch.nn.init.zeros_(blk.head_select.weight)
    blk.head_select.bias.data = torch.tensor([5.0, -5.0, 5.0])  # head 1 (channels 16..31) dropped
    torch.nn.init.zeros_(blk.block_select.weight)
    torch.nn.init.constant_(blk.block_select.bias, 5.0)
    seen = {}
    blk.mlp.fc1.register_forward_pre_hook(lambda mod, inputs: seen.update(x=inputs[0]))
    model(torch.randn(2, 1, 32, 32))
    assert seen["x"][..., 16:32].abs().max() == 0 and seen["x"][..., :16].abs().min() > 0


def test_expected_macs_count_the_fast_path_exactly():
    model = mixed_model(seed=3)
    torch.manual_seed(3)
    x = torch.randn(6, 1, 32, 32)
    model(x)
    expected = model.expected_macs()
    for i in range(len(x)):
        counter = FlopCounterMode(display=False)
        with counter:
            model.forward_fast(x[i:i + 1])
        assert counter.get_total_flops() // 2 == int(expected[i])
    assert len(set(expected.tolist())) > 1  # per-input


def test_initialised_from_dense_deit_and_equal_to_it_when_everything_is_kept(tmp_path):
    torch.manual_seed(0)
    dense = timm.create_model("deit_nano", num_classes=10).eval()
    save_checkpoint(tmp_path / "deit.pt", {"model": "deit_nano", "model_kwargs": {"num_classes": 10},
                                           "state_dict": dense.state_dict()})
    model = timm.create_model("ada_deit_nano", num_classes=10)
    init_from_file(model, str(tmp_path / "deit.pt"))
    assert torch.equal(model.pos_embed, dense.pos_embed) and not model.pos_embed.requires_grad
    for blk in model.blocks:  # keep everything
        for lin in (blk.patch_select, blk.head_select, blk.block_select):
            if lin is not None:
                torch.nn.init.constant_(lin.bias, 10.0)
    model.eval()
    x = torch.randn(4, 1, 32, 32)
    torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.forward_fast(x), dense(x), atol=1e-5, rtol=1e-5)
    # all kept: the dense model's MACs plus the decision heads (C per patch, C*H + 2C per adaptive block)
    heads = DEPTH * PATCHES * 48 + (DEPTH - 1) * (48 * HEADS + 2 * 48)
    assert int(model.expected_macs()[0]) == count_macs(dense, (1, 32, 32)) + heads
    # a checkpoint of another shape is an error, not a silent partial load
    small = timm.create_model("deit_nano", num_classes=10, embed_dim=24)
    save_checkpoint(tmp_path / "other.pt", {"model": "deit_nano", "model_kwargs": {"num_classes": 10},
                                            "state_dict": small.state_dict()})
    with pytest.raises(ValueError, match=r"shape mismatches \(\d+\): blocks.0.attn.proj.bias: checkpoint \(24,\)"):
        init_from_file(timm.create_model("ada_deit_nano", num_classes=10), str(tmp_path / "other.pt"))


def test_usage_loss_is_the_reference_formula():
    """models/losses.py:AdaLoss: heads over the (sample, block) pairs whose block runs, tokens with the CLS."""
    patch = torch.tensor([[[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]],
                          [[0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 0]]], dtype=torch.float)  # [B, depth, N-1]
    head = torch.tensor([[[1, 1, 0], [0, 1, 0]], [[1, 0, 0], [1, 1, 1]]], dtype=torch.float)  # [B, depth-1, H]
    block = torch.tensor([[[0, 0], [1, 0]], [[0, 1], [1, 1]]], dtype=torch.float)  # sample 0, block 1: off
    cfg = UsageCfg(head_target=0.3, block_target=0.2, patch_target=0.7, head_weight=1.0, block_weight=2.0,
                   patch_weight=3.0)
    terms = UsageLoss(cfg)({"patch": patch, "head": head, "block": block})
    kept_heads = (1 + 1 + 3) / 9  # sample 0's block 1 (both gates off) does not count
    kept_tokens = (patch.sum().item() + 2 * 3) / (2 * 3 * 5)  # the class token of every (sample, block) kept
    assert terms["usage_head"].item() == pytest.approx(1.0 * abs(kept_heads - 0.3), abs=1e-6)
    assert terms["usage_block"].item() == pytest.approx(2.0 * abs(4 / 8 - 0.2), abs=1e-6)
    assert terms["usage_patch"].item() == pytest.approx(3.0 * (kept_tokens - 0.7) ** 2, abs=1e-6)


@pytest.mark.parametrize("target", [0.2, 0.8])
def test_usage_loss_pulls_the_kept_fractions_to_their_targets(target):
    """A short run with only the usage loss (and CE): each kept fraction moves to its target from either side."""
    torch.manual_seed(0)
    model = timm.create_model("ada_deit_nano", num_classes=10).train()
    usage = UsageLoss(UsageCfg(head_target=target, block_target=target, patch_target=target))
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "_select." in n], lr=0.05)
    x, y = torch.randn(32, 1, 32, 32), torch.randint(0, 10, (32,))
    ratios = []
    for _ in range(40):
        out = model(x)
        terms = usage(model.decisions)
        loss = torch.nn.functional.cross_entropy(out, y) + sum(terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        ratios.append({k: v.mean().item() for k, v in model.decisions.items()})
    start = ratios[0]
    end = {k: sum(r[k] for r in ratios[-5:]) / 5 for k in start}
    for kind in ("patch", "head", "block"):
        assert abs(end[kind] - target) < max(0.1, 0.5 * abs(start[kind] - target)), (kind, start, end)


def test_backbone_api():
    model = mixed_model()
    x = torch.randn(2, 1, 32, 32)
    final, inter = model.forward_intermediates(x, indices=2)
    assert [tuple(t.shape) for t in inter] == [(2, 48, 8, 8)] * 2
    torch.testing.assert_close(model.forward_head(final), model(x))
    inter = model.forward_intermediates(x, indices=[0], output_fmt="NLC", stop_early=True, intermediates_only=True)
    assert tuple(inter[0].shape) == (2, PATCHES, 48) and model.decisions["patch"].shape == (2, 1, PATCHES)
    features = timm.create_model("ada_deit_nano", features_only=True, out_indices=(1, 5))
    assert [tuple(t.shape) for t in features(x)] == [(2, 48, 8, 8)] * 2
    # gradient checkpointing: the same outputs and gradients, the usage loss's included
    model.train()
    y = torch.randint(0, 10, (2,))
    grads = []
    for on in (False, True):
        model.set_grad_checkpointing(on)
        model.zero_grad()
        torch.manual_seed(5)
        loss = F.cross_entropy(model(x), y) + sum(UsageLoss(UsageCfg())(model.decisions).values())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("patch_select" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


# ---------------------------------------------------------------------------------------------------------------
# The reference, MengLcool/AdaViT at 9857f92, re-implemented from reading it for its Ada-DeiT (`--ada-head
# --ada-layer --ada-token-with-mlp`, ada_main.py's defaults otherwise): its module names, hence its checkpoint
# keys, and its forward. File:line below are the reference's.

def ref_gumbel_sigmoid(logits, threshold, training, tau=5.0):
    """ada_transformer_block.py:7-36 with hard=True."""
    if training:
        g1 = -torch.empty_like(logits).exponential_().log()
        g2 = -torch.empty_like(logits).exponential_().log()
        soft = ((logits + g1 - g2) / tau).sigmoid()
    else:
        soft = logits.sigmoid()
    hard = torch.zeros_like(logits).masked_fill(soft > threshold, 1.0)
    return hard - soft.detach() + soft


def dyna_linear(lin, x, out_mask=None, in_mask=None):
    """DynaLinear (:166-242) with a width_select: (b, C, 1) masks the weight's rows and the bias (out_mask),
    (b, 1, C) the weight's columns (in_mask); a per-sample weight, as its grouped conv1d."""
    w, b = lin.weight[None], lin.bias[None]
    if out_mask is not None:
        w, b = w * out_mask[:, :, None], b * out_mask
    if in_mask is not None:
        w = w * in_mask[:, None, :]
    return torch.einsum("bni,boi->bno", x, w) + b[:, None]


class RefSelect(nn.Module):
    """SimpleTokenSelect / BlockHeadSelect / BlockLayerSelect: one parameter, their `mlp_head`."""

    def __init__(self, dim, out):
        super().__init__()
        self.mlp_head = nn.Linear(dim, out)


class RefBlock(nn.Module):
    """StepAdaBlock (:398-571) with AdaAttention (:245-365) and AdaMlp (:368-395)."""

    def __init__(self, dim, heads, adaptive):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.query, self.attn.key, self.attn.value = (nn.Linear(dim, dim) for _ in range(3))
        self.attn.proj = nn.Linear(dim, dim)
        self.attn.token_select = RefSelect(dim, 1)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.layer_select = RefSelect(dim, 2) if adaptive else None
        self.head_select = RefSelect(dim, heads) if adaptive else None

    def forward(self, x):
        B, N, C = x.shape
        d = C // self.heads
        layer = head = width = None
        if self.layer_select is not None:  # :525-532, from the block input's class token, layer first
            layer = ref_gumbel_sigmoid(self.layer_select.mlp_head(x[:, 0]), 0.5, self.training)
            head = ref_gumbel_sigmoid(self.head_select.mlp_head(x[:, 0]), 0.5, self.training)
            width = head[:, :, None].expand(-1, -1, d).reshape(B, C)  # :134-135
        h = self.norm1(x)
        q, k, v = (dyna_linear(lin, h, out_mask=width).reshape(B, N, self.heads, d).transpose(1, 2)
                   for lin in (self.attn.query, self.attn.key, self.attn.value))
        attn = q @ k.transpose(-2, -1) * d ** -0.5
        token = ref_gumbel_sigmoid(self.attn.token_select.mlp_head(h[:, 1:]), 0.6, self.training)  # :69-70
        token = torch.cat([token.new_ones(B, 1, 1), token], dim=1).transpose(1, 2)  # (B, 1, N)
        policy = (token.transpose(1, 2) @ token)[:, None].detach()  # :88-91
        eye = torch.eye(N)
        attn = attn * policy + torch.zeros_like(attn).masked_fill((1 - policy - eye) > 0, float("-inf"))
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        out = dyna_linear(self.attn.proj, out, in_mask=width) * token.transpose(1, 2)  # :357-362
        token = token[:, 0]
        x = x + (out if layer is None else layer[:, 0, None, None] * out)
        mlp = self.mlp.fc2(F.gelu(dyna_linear(self.mlp.fc1, self.norm2(x), in_mask=width)))  # :387-393
        mlp = token[..., None] * mlp  # not detached: --ada-token-detach-attn-at-mlp is off (:556-560)
        x = x + (mlp if layer is None else layer[:, 1, None, None] * mlp)
        return x, {"patch": token[:, 1:], "head": head, "block": layer}


class RefAdaDeiT(nn.Module):
    """AdaStepT2T_ViT(use_t2t=False) (ada_t2t_vit.py:104-242), keep_layers 1, a token select in every block."""

    def __init__(self, img=32, patch=4, in_chans=1, dim=48, depth=DEPTH, heads=HEADS, classes=10):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img // patch) ** 2 + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(RefBlock(dim, heads, adaptive=i >= 1) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        per_block = []
        for blk in self.blocks:
            x, dec = blk(x)
            per_block.append(dec)
        self.decisions = {k: torch.stack([d[k] for d in per_block if d[k] is not None], dim=1)
                          for k in ("patch", "head", "block")}
        return self.head(self.norm(x)[:, 0])


def reference_model(seed=0):
    """RefAdaDeiT at ada_deit_nano's shape with random weights and decision heads that give mixed decisions."""
    torch.manual_seed(seed)
    ref = RefAdaDeiT()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(0, 0.5 if "mlp_head" in name else 0.1)
            if "mlp_head.bias" in name:
                p.normal_(0, 1.5)
            elif "norm" in name and name.endswith("weight"):
                p.add_(1.0)
        ref.pos_embed.normal_(0, 0.1)
    return ref


def save_reference_checkpoint(path, ref):
    """As the reference's saver.py: a training checkpoint whose EMA weights ada_load_state_dict prefers."""
    ema = {f"module.{k}": v.clone() for k, v in ref.state_dict().items()}
    raw = {k: v + 1 for k, v in ref.state_dict().items()}
    torch.save({"epoch": 299, "arch": "ada_step_deit_small_patch16_224", "state_dict": raw, "state_dict_ema": ema,
                "args": argparse.Namespace(ada_head=True, ada_layer=True, ada_token_with_mlp=True)}, path)


def load_official(path):
    return timm.create_model("ada_deit_nano", pretrained=True, num_classes=10,
                             pretrained_cfg_overlay={"file": str(path), "num_classes": 10})


def test_reference_checkpoint_loads_every_key(tmp_path):
    ref = reference_model()
    save_reference_checkpoint(tmp_path / "ref.pth", ref)
    model = load_official(tmp_path / "ref.pth")
    ours = model.state_dict()
    names = {"attn.token_select.mlp_head": "patch_select", "head_select.mlp_head": "head_select",
             "layer_select.mlp_head": "block_select"}
    covered = set()
    for k, v in ref.state_dict().items():
        qkv = [p for p in ("query", "key", "value") if f".attn.{p}." in k]
        if qkv:
            key = k.replace(qkv[0], "qkv")
            part = ours[key].chunk(3)[("query", "key", "value").index(qkv[0])]
        else:
            key = k
            for old, new in names.items():
                key = key.replace(old, new)
            part = ours[key]
        assert torch.equal(part, v), k
        covered.add(key)
    assert covered == set(ours)


def test_logits_and_gradients_equal_the_reference(tmp_path):
    """Ours (masked and fast paths) on the reference's checkpoint against its forward: eval, and a seeded
    training step (the same Gumbel noise: drawn in the same order) with its gradients."""
    ref = reference_model()
    save_reference_checkpoint(tmp_path / "ref.pth", ref)
    model = load_official(tmp_path / "ref.pth")
    ref.eval()
    model.eval()
    torch.manual_seed(1)
    x, y = torch.randn(16, 1, 32, 32), torch.randint(0, 10, (16,))
    with torch.no_grad():
        expected = ref(x)
        delta = {"masked": (model(x) - expected).abs().max().item(),
                 "fast": (model.forward_fast(x) - expected).abs().max().item()}
    print(f"max |delta logit| vs the reference: {delta}")
    assert max(delta.values()) < 1e-5, delta
    model(x)
    for kind in ("head", "block", "patch"):
        assert torch.equal(model.decisions[kind], ref.decisions[kind]), kind
    d = model.decisions
    assert 0 < d["patch"].mean() < 1 and 0 < d["head"].mean() < 1 and 0 < d["block"].mean() < 1
    assert ((d["head"].sum(-1) > 0) & (d["head"].sum(-1) < HEADS) & (d["block"][..., 1] > 0)).any()

    for mode in ("eval", "train"):  # eval: straight-through on sigmoid(logit); train: Gumbel samples
        ref.train(mode == "train")
        model.train(mode == "train")
        ref.zero_grad()
        model.zero_grad()
        losses = []
        for net in (ref, model):
            torch.manual_seed(2)
            out = net(x)
            loss = F.cross_entropy(out, y) + sum(UsageLoss(UsageCfg())(net.decisions).values())
            loss.backward()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], abs=1e-5), mode
        assert torch.equal(model.decisions["patch"], ref.decisions["patch"]), mode
        # the reference's gradients under our names (query/key/value concatenated as qkv)
        ref_grads = checkpoint_filter_fn({k: p.grad if p.grad is not None else torch.zeros_like(p)
                                          for k, p in ref.named_parameters()}, model)
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=f"{mode}: {name}")


def test_bad_checkpoints_are_errors_naming_the_keys(tmp_path):
    sd = {f"module.{k}": v for k, v in reference_model().state_dict().items()}
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "module.blocks.3.head_select.mlp_head.weight"},
                    r"model keys the checkpoint lacks \(1\): blocks.3.head_select.weight"),
        "unexpected": ({**sd, "module.blocks.1.norm_policy.weight": torch.ones(48)},
                       r"keys that map to nothing \(1\): blocks.1.norm_policy.weight"),
        "no qkv": ({k: v for k, v in sd.items() if k != "module.blocks.2.attn.key.bias"},
                   r"(?s)map to nothing \(2\): blocks.2.attn.query.bias.*lacks \(1\): blocks.2.attn.qkv.bias"),
    }
    dense = timm.create_model("deit_nano", num_classes=10).state_dict()
    cases["dense with one decision head"] = ({**dense, "blocks.1.head_select.weight": torch.zeros(HEADS, 48),
                                              "blocks.1.head_select.bias": torch.zeros(HEADS)},
                                             r"lacks \(\d+\): blocks.0.patch_select")
    for name, (state_dict, message) in cases.items():
        torch.save({"state_dict": state_dict}, tmp_path / f"{name}.pth")
        with pytest.raises(ValueError, match=message):
            load_official(tmp_path / f"{name}.pth")
    # the legitimate dense case: the backbone loads, the decision heads keep their fresh init
    torch.save({"model": dense}, tmp_path / "dense.pth")
    torch.manual_seed(0)
    fresh = timm.create_model("ada_deit_nano", num_classes=10).state_dict()
    torch.manual_seed(0)
    loaded = load_official(tmp_path / "dense.pth").state_dict()
    assert all(torch.equal(loaded[k], dense[k]) for k in dense)
    assert all(torch.equal(loaded[k], fresh[k]) for k in loaded if "_select." in k)


def test_reference_keys_of_ada_deit_small_map_onto_ours():
    """The full-size key set and shapes (on the meta device: no memory, no compute)."""
    with torch.device("meta"):
        ref = RefAdaDeiT(img=224, patch=16, in_chans=3, dim=384, depth=12, heads=6, classes=1000)
        model = timm.create_model("ada_deit_small")
    mapped = checkpoint_filter_fn(ref.state_dict(), model)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in model.state_dict().items()}
