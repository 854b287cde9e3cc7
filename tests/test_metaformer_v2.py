"""Table 9's MetaFormer baselines and students, and Table 5's Swin teacher (pipeline/models/metaformer_v2.py)."""
import pytest
import timm
import torch
from timm.models.metaformer import Attention, SepConv

import pipeline.models  # noqa: F401
from pipeline.config import MICfg
from pipeline.losses import ModuleImitation
from pipeline.measure import count_params
from pipeline.models.metaformer_v2 import CA_NORMS, CONV_NORMS, RandomMixing


def test_random_mixing_is_a_frozen_row_stochastic_token_matrix():
    model = timm.create_model("randformer_n12", num_classes=10)
    mixers = [m for m in model.modules() if isinstance(m, RandomMixing)]
    assert [m.num_tokens for m in mixers] == [16] * 6 + [4] * 2  # stages 3-4 of 2/2/6/2 at 32 px: 4x4, 2x2 grids
    assert not any("random_matrix" in name for name, _ in model.named_parameters())  # never trained
    for m in mixers:
        assert not m.random_matrix.requires_grad and "random_matrix" in dict(m.named_buffers())
        torch.testing.assert_close(m.random_matrix.sum(-1), torch.ones(m.num_tokens))
    # the input size fixes the matrices (timm's `fixed_input_size`): 64 px gives 8x8 and 4x4 grids in stages 3-4
    big = timm.create_model("randformer_n12", num_classes=10, img_size=64)
    assert [m.num_tokens for m in big.modules() if isinstance(m, RandomMixing)] == [64] * 6 + [16] * 2
    assert big(torch.randn(1, 1, 64, 64)).shape == (1, 10)
    # the official NHWC form: einsum('mn, bnc -> bmc') over the H*W tokens
    m, x = mixers[0], torch.randn(2, 64, 4, 4)
    official = torch.einsum("mn,bnc->bmc", m.random_matrix, x.permute(0, 2, 3, 1).reshape(2, 16, 64))
    torch.testing.assert_close(m(x), official.reshape(2, 4, 4, 64).permute(0, 3, 1, 2))
    with pytest.raises(AssertionError, match="input size fixes it"):
        m(torch.randn(1, 64, 5, 5))
    # RandFormer-S12 is PoolFormerV2-S12 (parameter-free pooling) plus its fixed 196^2 and 49^2 matrices, counted as
    # the official code counts them (frozen Parameters there)
    extra = 6 * 196 ** 2 + 2 * 49 ** 2
    assert count_params(timm.create_model("randformer_s12")) == count_params(
        timm.create_model("poolformerv2_s12")) + extra


@pytest.mark.parametrize("timm_name,kwargs", [
    ("poolformerv2_s12", {"token_mixer": "pooling"}),
    ("convformer_s18", {"token_mixer": SepConv, **CONV_NORMS}),
    ("caformer_s18", {"token_mixer": [SepConv, SepConv, Attention, Attention], **CA_NORMS}),
])
def test_baselines_compute_what_timm_computes(timm_name, kwargs):
    """Our MetaFormer-baseline family (RIFormer class, v2 architecture, with the norms and heads the nano
    teachers are built with) loads timm's published-architecture models key for key and gives their logits: the
    nano teachers are these models at another size."""
    depths = "riformerv2_s18" if timm_name.endswith("18") else "riformerv2_s12"
    torch.manual_seed(0)
    ref = timm.create_model(timm_name).eval()
    ours = timm.create_model(depths, **kwargs).eval()
    ours.load_state_dict(ref.state_dict())  # strict: the same keys and shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("teacher", ["randformer_n12", "poolformerv2_n12", "convformer_n18", "caformer_n18"])
def test_module_imitation_of_each_baseline_teacher(teacher):
    """The T9 pairs match block for block, CAFormer's attention stages (tokens as (B, N, C)) included."""
    student = timm.create_model("riformerv2_n18" if teacher.endswith("18") else "riformerv2_n12", num_classes=10)
    t = timm.create_model(teacher, num_classes=10).eval()
    mi = ModuleImitation(student, t, MICfg(layers=4, feat_frac=1.0, rel_frac=1.0, lambda_in=1.0, lambda_out=1.0,
                                           lambda_rel=1.0), total_steps=10)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        t(x)
    student(x)
    terms = mi(0)
    assert set(terms) == {"mi_in", "mi_out", "mi_rel"} and all(torch.isfinite(v) and v > 0 for v in terms.values())
    sum(terms.values()).backward()
    assert student.stages[0].blocks[0].token_mixer.affine.weight.grad.abs().sum() > 0
    mi.remove()


def test_swin_nano_fits_the_nano_grids():
    model = timm.create_model("swin_nano", num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    # stage grids 16, 8, 4, 2: the window (4) shrinks to the last stage's 2x2 grid
    assert [tuple(s.output_resolution) for s in model.layers] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert tuple(model.layers[3].blocks[0].window_size) == (2, 2)


def test_deploy_norm_of_a_bias_free_student_keeps_its_eps():
    """The merged norm of the T9 students gets a bias and keeps GroupNorm1NoBias's eps (1e-6, not GroupNorm's
    1e-5: a difference the logits barely show), in the re-parameterized and in the constructed deploy form."""
    model = timm.create_model("riformerv2_n12", num_classes=10)
    assert {b.norm1.eps for s in model.stages for b in s.blocks} == {1e-6}
    deploy = timm.utils.reparameterize_model(model)
    built = timm.create_model("riformerv2_n12", num_classes=10, token_mixer="identity", fold_layer_scale=True)
    for m in (deploy, built):
        norms = [b.norm1 for s in m.stages for b in s.blocks]
        assert all(n.bias is not None and n.eps == 1e-6 for n in norms)
    with pytest.raises(ValueError, match="without 'affine'"):
        timm.create_model("riformerv2_n12", token_mixer=["affine", "identity", "identity", "identity"])
