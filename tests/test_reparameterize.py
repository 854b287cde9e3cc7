"""Structural re-parameterization is exact (issue 2, Sec. 3)."""
import json

import pytest
import timm
import torch
from timm.models.metaformer import Scale

import pipeline.models  # noqa: F401
from pipeline.io import load_checkpoint, model_from_checkpoint, save_checkpoint
from pipeline.models import Affine, RIFormerBlock, metaformer_blocks
from pipeline.models.riformer import IdentityMixer


def randomize(model, seed=0):
    """Random affine, norm and LayerScale parameters: initial values (s=1, t=0, gamma=1) hide wrong formulas."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("token_mixer", "norm", "layer_scale", "res_scale")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (0.5 if name.endswith("weight") else 0.0))
    return model


@pytest.mark.parametrize("name", ["riformer_s12", "riformer_s24", "riformer_s36", "riformer_m36", "riformer_m48",
                                  "riformer_nano", "riformerv2_s12", "riformerv2_n12", "riformerv2_n18"])
def test_randomized_equivalence(name):
    """Also for the MetaFormer-baseline students (T9): no layer scale, res-scale, norms without bias (the merged
    norm gets one)."""
    model = randomize(timm.create_model(name, num_classes=10)).eval()
    deploy = timm.utils.reparameterize_model(model)
    assert not any(isinstance(m, Affine) for m in deploy.modules())
    assert any(isinstance(m, Affine) for m in model.modules())  # the original is left untouched
    size = 32 if model.in_chans == 1 else 64
    x = torch.randn(4, model.in_chans, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(x), deploy(x)
    assert ref.abs().max() > 1e-2  # the randomized model gives non-trivial logits
    assert (ref - out).abs().max().item() <= 1e-4
    # the deploy block is x + GN''(x) then the MLP branch: no mixer, no first layer scale
    assert all(isinstance(b.token_mixer, IdentityMixer) and isinstance(b.layer_scale1, torch.nn.Identity)
               and isinstance(b.layer_scale2, Scale) == ("v2" not in name) and b.norm1.bias is not None
               for b in metaformer_blocks(deploy))
    # the deploy state dict loads (strictly) into the folded identity-mixer model and gives the same logits
    folded = timm.create_model(name, num_classes=10, token_mixer="identity", fold_layer_scale=True).eval()
    folded.load_state_dict(deploy.state_dict())
    with torch.no_grad():
        assert (folded(x) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unfolded_deploy_model_folds_exactly(seed):
    """A deploy model of the official layout (identity mixer, separate ls1: mmpretrain's deploy checkpoints) folds
    its layer scale into the norm without changing the logits, whatever the (random) scales' signs."""
    model = randomize(timm.create_model("riformer_nano", num_classes=10, token_mixer="identity"), seed).eval()
    folded = timm.utils.reparameterize_model(model)
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in folded.parameters()) == sum(
        b.norm1.weight.numel() for b in metaformer_blocks(model))
    x = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(seed + 10))
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert ref.abs().max() > 1e-2
    assert (ref - out).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="fold_layer_scale=True is the deploy form"):
        timm.create_model("riformer_nano", fold_layer_scale=True)


def test_merge_formula_on_one_block():
    block = metaformer_blocks(randomize(timm.create_model("riformer_nano")))[0]
    assert isinstance(block, RIFormerBlock)
    gamma, beta = block.norm1.weight.clone(), block.norm1.bias.clone()
    s, t = block.token_mixer.affine.weight.flatten().clone(), block.token_mixer.affine.bias.clone()
    ls = block.layer_scale1.scale.flatten().clone()
    block.reparameterize()
    torch.testing.assert_close(block.norm1.weight, ls * gamma * (s - 1))
    torch.testing.assert_close(block.norm1.bias, ls * (beta * (s - 1) + t))


def test_reparameterize_stage_on_real_images(small_fashion_mnist, tmp_path):
    from pipeline.__main__ import main

    model = randomize(timm.create_model("riformer_nano", num_classes=10, in_chans=1))
    ckpt = tmp_path / "train.pt"
    save_checkpoint(ckpt, {"model": "riformer_nano", "model_kwargs": {"num_classes": 10, "in_chans": 1},
                           "state_dict": model.state_dict(), "config": {"img_size": 32}})
    main(["reparameterize", "--checkpoint", str(ckpt), "--data", str(small_fashion_mnist),
          "--out", str(tmp_path / "deploy.pt"), "--report", str(tmp_path / "reparam.json")])
    report = json.loads((tmp_path / "reparam.json").read_text())
    assert report["num_images"] == 200
    assert 0 <= report["max_abs_logit_diff"] <= 1e-4
    assert report["params_train"] - report["params_deploy"] == 3 * sum(
        b.norm1.weight.numel() for b in metaformer_blocks(model))
    assert report["affine_modules_left"] == 0
    deploy = load_checkpoint(tmp_path / "deploy.pt")
    assert deploy["model_kwargs"]["token_mixer"] == "identity" and deploy["model_kwargs"]["fold_layer_scale"]
    assert not any(isinstance(m, Affine) for m in model_from_checkpoint(deploy).modules())


def test_broken_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(bad)
