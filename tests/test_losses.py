"""KD losses against values worked out by hand, and module imitation (issue 3, Sec. 4)."""
import copy
import math

import pytest
import timm
import torch
import torch.nn as nn

import pipeline.models  # noqa: F401
from pipeline.config import MICfg
from pipeline.losses import DistillationLoss, ModuleImitation, default_blocks, token_relation
from pipeline.models import metaformer_blocks


def softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


S = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
T = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, -1.0]])
Y = torch.tensor([2, 0])


def hand_soft_kd(s, t, tau):
    # DeiT: KL(teacher || student) at temperature tau, summed over everything, * tau^2 / numel(logits)
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        ps, pt = softmax([v / tau for v in srow]), softmax([v / tau for v in trow])
        total += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt, strict=True))
    return total * tau * tau / s.numel()


def hand_ce(s, y):
    return sum(-math.log(softmax(row)[k]) for row, k in zip(s.tolist(), y.tolist(), strict=True)) / len(y)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_soft_kd_without_labels(tau):
    terms = DistillationLoss(nn.CrossEntropyLoss(), "soft", alpha=0.5, tau=tau, labels=False)(S, Y, T)
    assert set(terms) == {"kd_soft"}  # "without labels" drops the CE term: alpha = 1
    assert terms["kd_soft"].item() == pytest.approx(hand_soft_kd(S, T, tau), rel=1e-5)
    # DeiT's normalisation divides by numel (B * classes), not by the batch size
    assert terms["kd_soft"].item() * S.numel() / len(S) != pytest.approx(hand_soft_kd(S, T, tau), rel=1e-3)


def test_soft_kd_with_labels():
    terms = DistillationLoss(nn.CrossEntropyLoss(), "soft", alpha=0.3, tau=2.0, labels=True)(S, Y, T)
    assert terms["ce"].item() == pytest.approx(0.7 * hand_ce(S, Y), rel=1e-5)
    assert terms["kd_soft"].item() == pytest.approx(0.3 * hand_soft_kd(S, T, 2.0), rel=1e-5)


def test_hard_kd():
    teacher_argmax = torch.tensor([0, 1])
    terms = DistillationLoss(nn.CrossEntropyLoss(), "hard", alpha=0.5, labels=True)(S, Y, T)
    assert terms["ce"].item() == pytest.approx(0.5 * hand_ce(S, Y), rel=1e-5)
    assert terms["kd_hard"].item() == pytest.approx(0.5 * hand_ce(S, teacher_argmax), rel=1e-5)
    no_labels = DistillationLoss(nn.CrossEntropyLoss(), "hard", labels=False)(S, Y, T)
    assert set(no_labels) == {"kd_hard"}
    assert no_labels["kd_hard"].item() == pytest.approx(hand_ce(S, teacher_argmax), rel=1e-5)


def test_no_kd_is_plain_cross_entropy():
    terms = DistillationLoss(nn.CrossEntropyLoss(), "none")(S, Y)
    assert set(terms) == {"ce"} and terms["ce"].item() == pytest.approx(hand_ce(S, Y), rel=1e-5)


def test_default_blocks():
    assert default_blocks([2, 2, 6, 2], 4) == [1, 3, 9, 11]  # last block of each stage
    assert default_blocks([2, 2, 6, 2], 6) == [1, 3, 5, 7, 9, 11]


def test_token_relation_shape_and_diagonal():
    r = token_relation(torch.randn(2, 8, 3, 4))
    assert r.shape == (2, 12, 12)
    torch.testing.assert_close(torch.diagonal(r, dim1=1, dim2=2), torch.ones(2, 12))


def _mi(student, teacher, blocks, steps=10, **lambdas):
    cfg = MICfg(blocks=blocks, feat_frac=1.0, rel_frac=1.0, **{"lambda_in": 1.0, "lambda_out": 1.0, "lambda_rel": 1.0,
                                                             **lambdas})
    return ModuleImitation(student, teacher, cfg, total_steps=steps)


def test_module_imitation_hooks_pick_the_right_blocks():
    student = timm.create_model("riformer_nano", num_classes=10, in_chans=1).eval()
    teacher = timm.create_model("poolformer_nano", num_classes=10, in_chans=1).eval()
    mi = _mi(student, teacher, default_blocks([2, 2, 6, 2], 4))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        stage_outputs = student.forward_intermediates(x, intermediates_only=True)
        teacher(x)
    # the last block of each stage outputs exactly the stage output
    for captured, expected in zip(mi.student.block_out, stage_outputs, strict=True):
        torch.testing.assert_close(captured, expected.flatten(2))  # kept as (B, C, tokens)
    assert [m.shape[1] for m in mi.teacher.mixer_out] == [16, 32, 64, 128]
    mi.remove()
    # mixer outputs are the hooked block's token mixer applied to its normed input (Affine here, - input incl.)
    mi = _mi(student, teacher, [10, 11])
    with torch.no_grad():
        student(x)
        block = metaformer_blocks(student)[11]
        expected = block.token_mixer(block.norm1(mi.student.block_out[0].reshape(2, 128, 2, 2)))
    torch.testing.assert_close(mi.student.mixer_out[1], expected.flatten(2))
    mi.remove()


def test_module_imitation_terms_are_zero_for_the_same_network_and_positive_otherwise():
    student = timm.create_model("poolformer_nano", num_classes=10, in_chans=1).eval()
    teacher = copy.deepcopy(student)
    x = torch.randn(4, 1, 32, 32)
    mi = _mi(student, teacher, default_blocks([2, 2, 6, 2], 6))
    student(x), teacher(x)
    terms = mi(step=0)
    assert set(terms) == {"mi_in", "mi_out", "mi_rel"}
    assert all(v.item() == 0.0 for v in terms.values())
    mi.remove()
    other = timm.create_model("riformer_nano", num_classes=10, in_chans=1).eval()
    mi = _mi(other, teacher, default_blocks([2, 2, 6, 2], 4))
    other(x), teacher(x)
    assert all(v.item() > 0 for v in mi(step=0).values())
    mi.remove()


def test_module_imitation_windows():
    student = timm.create_model("riformer_nano", num_classes=10, in_chans=1)
    teacher = timm.create_model("poolformer_nano", num_classes=10, in_chans=1)
    mi = ModuleImitation(student, teacher, MICfg(blocks=[11], lambda_in=1.0, lambda_out=1.0, lambda_rel=1.0,
                                                 feat_frac=1.0, rel_frac=0.25), total_steps=8)
    assert mi.active(0) == {"mi_in": True, "mi_out": True, "mi_rel": True}
    assert mi.active(2) == {"mi_in": True, "mi_out": True, "mi_rel": False}
    assert mi.active(8) == {"mi_in": False, "mi_out": False, "mi_rel": False}
    zero_lambda = _mi(student, teacher, [11], steps=8, lambda_out=0.0, lambda_rel=0.0)
    assert zero_lambda.active(0) == {"mi_in": True, "mi_out": False, "mi_rel": False}


def test_module_imitation_rejects_another_block_structure():
    student = timm.create_model("riformer_nano")
    with pytest.raises(ValueError, match="same block structure"):
        _mi(student, timm.create_model("poolformer_s9"), [1])


def test_imitated_blocks_first_of_each_stage():
    assert default_blocks([2, 2, 6, 2], 4, "first") == [0, 2, 4, 10]
    assert default_blocks([2, 2, 6, 2], 6, "first") == [0, 2, 4, 6, 8, 10]
    with pytest.raises(ValueError, match="pick"):
        default_blocks([2, 2, 6, 2], 4, "middle")


def test_imitation_weights_per_batch_and_balanced():
    """per_batch divides each lambda by the batch size; balanced rescales each term once, at the first step, to the
    logit loss it is given, and keeps those factors afterwards."""
    torch.manual_seed(0)
    student, teacher = (timm.create_model("riformer_nano", num_classes=10, in_chans=1, token_mixer=m).eval()
                        for m in ("affine", "pooling"))
    x = torch.randn(4, 1, 32, 32)
    base = dict(teacher="t", lambda_in=1e-4, lambda_out=1e-3, lambda_rel=1.0, feat_frac=1.0, rel_frac=1.0)

    def terms(weights, step=0, logit=None):
        mi = ModuleImitation(student, teacher, MICfg(**base, weights=weights), total_steps=10, batch_size=64)
        with torch.no_grad():
            student(x), teacher(x)
        out = mi(step)
        if mi.needs_balance:
            out = mi.balance(out, logit)
        mi.remove()
        return mi, out

    _, printed = terms("as_printed")
    _, per_batch = terms("per_batch")
    for k in printed:
        assert torch.allclose(per_batch[k], printed[k] / 64)
    mi, balanced = terms("balanced", logit=torch.tensor(0.25))
    assert set(balanced) == {"mi_in", "mi_out", "mi_rel"}
    for k, v in balanced.items():
        assert v.item() == pytest.approx(0.25, rel=1e-5)
        assert mi.scales[k] == pytest.approx(0.25 / printed[k].item(), rel=1e-5)
    assert not mi.needs_balance  # the factors stay: a later step is not rebalanced
