"""AdaViT: decision shapes, straight-through gradients, fast path = masked path, expected MACs = the common
counter on the fast path, initialisation from a dense DeiT, and the usage loss on a short run."""
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import pipeline.models  # noqa: F401
from pipeline.benchmark import count_macs, count_params
from pipeline.config import UsageCfg
from pipeline.io import save_checkpoint
from pipeline.losses import UsageLoss
from pipeline.models.adavit import gumbel_sigmoid
from pipeline.train import init_from_file

DEPTH, HEADS, PATCHES = 6, 3, 64  # ada_deit_nano: 8x8 patches of 4 px at 32 px


def mixed_model(seed=0):
    """ada_deit_nano whose decision heads give a mix of keep and drop (fresh ones drop every patch in eval)."""
    torch.manual_seed(seed)
    model = timm.create_model("ada_deit_nano", num_classes=10)
    for blk in model.blocks:
        for lin in (blk.patch_select, blk.head_select, blk.block_select):
            if lin is not None:
                torch.nn.init.normal_(lin.weight, std=0.5)
                torch.nn.init.normal_(lin.bias, std=1.5)
    return model.eval()


def test_decision_shapes_and_defaults():
    model = timm.create_model("ada_deit_nano", num_classes=10)
    assert model.blocks[0].head_select is None and model.blocks[0].block_select is None  # from block 2 on
    assert all(b.head_select is not None for b in model.blocks[1:])
    blk = model.blocks[1]
    assert blk.tau == 5.0 and blk.thresholds == {"head": 0.5, "block": 0.5, "patch": 0.6}
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
    for blk in model.blocks[1:]:  # branches on: a gated-off branch passes no gradient to its patch decisions
        torch.nn.init.constant_(blk.block_select.bias, 3.0)
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
    model = mixed_model()
    torch.manual_seed(2)
    x = torch.randn(batch, 1, 32, 32)
    masked = model(x)
    dec = {k: v.clone() for k, v in model.decisions.items()}
    fast = model.forward_fast(x)
    torch.testing.assert_close(fast, masked, atol=1e-5, rtol=1e-5)
    # the decisions really vary: some patches, heads and branches are dropped, some kept
    assert 0 < dec["patch"].mean() < 1 and 0 < dec["head"].mean() < 1 and 0 < dec["block"].mean() < 1
    assert torch.equal(model.decisions["head"], dec["head"]) and torch.equal(model.decisions["block"], dec["block"])
    with pytest.raises(RuntimeError, match="eval"):
        model.train().forward_fast(x)


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
    with pytest.raises(RuntimeError, match="size mismatch"):
        init_from_file(timm.create_model("ada_deit_nano", num_classes=10), str(tmp_path / "other.pt"))


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
