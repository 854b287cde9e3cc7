"""Model registry, exact parameter counts, token-mixer choice and the nano shapes (issue 2, Sec. 2)."""
import pytest
import timm
import torch

import pipeline.models  # noqa: F401
from pipeline.measure import count_params
from pipeline.models import Affine, metaformer_blocks

# riformer.md Sec. 1: deploy RIFormer = PoolFormer; training form adds 2*C per block. Our deploy form also folds
# the first layer scale (C per block, i.e. AFFINE_PARAMS / 2) into the merged norm.
DEPLOY_PARAMS = {"s12": 11_915_176, "s24": 21_388_968, "s36": 30_862_760, "m36": 56_172_520, "m48": 73_473_448}
AFFINE_PARAMS = {"s12": 6_656, "s24": 13_312, "s36": 19_968, "m36": 26_496, "m48": 35_328}
# Our GFNet implementation at 1000 classes, 224, 3 channels (paper: 15M / 32M / 54M / 43M).
GFNET_PARAMS = {"gfnet_h_ti": 15_085_096, "gfnet_h_s": 32_162_632, "gfnet_h_b": 53_744_200,
                "gfnet_b": 43_120_616}


@pytest.mark.parametrize("size", DEPLOY_PARAMS)
def test_riformer_and_poolformer_parameter_counts(size):
    poolformer = timm.create_model(f"poolformer_{size}")
    riformer = timm.create_model(f"riformer_{size}")
    identity = timm.create_model(f"riformer_{size}", token_mixer="identity")
    assert count_params(poolformer) == DEPLOY_PARAMS[size]
    assert count_params(identity) == DEPLOY_PARAMS[size]
    assert count_params(riformer) == DEPLOY_PARAMS[size] + AFFINE_PARAMS[size]
    deploy = timm.utils.reparameterize_model(riformer)
    assert count_params(deploy) == DEPLOY_PARAMS[size] - AFFINE_PARAMS[size] // 2
    # PoolFormer and RIFormer share every key except the affine token mixer
    extra = set(riformer.state_dict()) - set(poolformer.state_dict())
    assert extra and all(".token_mixer.affine." in k for k in extra)
    assert set(poolformer.state_dict()) <= set(riformer.state_dict())
    assert set(deploy.state_dict()) == {k for k in poolformer.state_dict() if ".layer_scale1." not in k}


@pytest.mark.parametrize("name", GFNET_PARAMS)
def test_gfnet_parameter_counts(name):
    assert count_params(timm.create_model(name)) == GFNET_PARAMS[name]


def test_gfnet_rejects_input_size_its_filters_do_not_fit():
    model = timm.create_model("gfnet_nano", num_classes=10)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"built for a 32x32 input but got 28x28"):
        model(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="divisible"):
        timm.create_model("gfnet_h_ti", img_size=100)


@pytest.mark.parametrize("mixer,cls", [("pooling", "Pooling"), ("identity", "IdentityMixer"), ("affine", "Affine")])
def test_token_mixer_choice(mixer, cls):
    model = timm.create_model("riformer_nano", token_mixer=mixer)
    mixers = {type(b.token_mixer).__name__ for b in metaformer_blocks(model)}
    assert mixers == {cls}
    with pytest.raises(ValueError, match="token_mixer must be one of"):
        timm.create_model("riformer_nano", token_mixer="attention")


def test_affine_initialisation_choice():
    identity_init = timm.create_model("riformer_nano")
    for m in identity_init.modules():
        if isinstance(m, Affine):
            assert torch.equal(m.affine.weight, torch.ones_like(m.affine.weight))
            assert torch.equal(m.affine.bias, torch.zeros_like(m.affine.bias))
    official = timm.create_model("riformer_nano", affine_init="trunc_normal")  # mmpretrain's TruncNormal(.02)
    weights = torch.cat([m.affine.weight.flatten() for m in official.modules() if isinstance(m, Affine)])
    biases = torch.cat([m.affine.bias for m in official.modules() if isinstance(m, Affine)])
    assert weights.abs().max() < 0.1 and 0.01 < weights.std() < 0.03 and not biases.any()


@pytest.mark.parametrize("name", ["riformer_nano", "poolformer_nano"])
@pytest.mark.parametrize("in_chans,size", [(1, 28), (1, 32), (3, 32)])
def test_nano_shapes_keep_a_grid_of_at_least_2x2(name, in_chans, size):
    model = timm.create_model(name, num_classes=10, in_chans=in_chans).eval()
    assert [len(s.blocks) for s in model.stages] == [2, 2, 6, 2]
    feats = model.forward_intermediates(torch.randn(2, in_chans, size, size), intermediates_only=True)
    grids = [tuple(f.shape[-2:]) for f in feats]
    assert all(h >= 2 and w >= 2 for h, w in grids), grids
    expected = {28: [(14, 14), (7, 7), (4, 4), (2, 2)], 32: [(16, 16), (8, 8), (4, 4), (2, 2)]}[size]
    assert grids == expected
    assert model(torch.randn(2, in_chans, size, size)).shape == (2, 10)


def test_poolformer_nano_has_timm_poolformer_keys():
    nano = timm.create_model("poolformer_nano")
    s12 = timm.create_model("poolformer_s12")
    assert set(nano.state_dict()) == set(s12.state_dict())  # same 2/2/6/2 structure, same key names


def test_gfnet_nano_four_stages_at_32():
    model = timm.create_model("gfnet_nano", num_classes=10)
    assert [len(s) for s in model.stages] == [2, 2, 6, 2]
    assert [blk[0].filter.size for blk in model.stages] == [(16, 16), (8, 8), (4, 4), (2, 2)]
