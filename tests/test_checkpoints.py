"""Official RIFormer / PoolFormer checkpoints load through timm's local-file route and give the official outputs.

The reference below is a minimal re-implementation, written for this test, of the module tree and forward of
mmpretrain's RIFormer backbone (mmpretrain/models/backbones/riformer.py at ee7f2e8: `patch_embed.proj`, one list
`network` of stages and downsamplings, `layer_scale_{1,2}`, `norm_reparam` in the deploy form, the output norm
`norm6`) inside its ImageClassifier (`backbone.`, a global-average-pooling neck, `head.fc`); with a pooling mixer
and the keys `norm` / `head` it is the original PoolFormer code's layout.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import pipeline.models  # noqa: F401


class RefAffine(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.affine = nn.Conv2d(dim, dim, 1, groups=dim, bias=True)

    def forward(self, x):
        return self.affine(x) - x


class RefPooling(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x):
        return self.pool(x) - x


class RefMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Conv2d(dim, 4 * dim, 1), nn.GELU(), nn.Conv2d(4 * dim, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, mixer, deploy):
        super().__init__()
        if deploy:
            self.norm_reparam = nn.GroupNorm(1, dim)
        else:
            self.norm1, self.token_mixer = nn.GroupNorm(1, dim), mixer(dim)
        self.norm2, self.mlp = nn.GroupNorm(1, dim), RefMlp(dim)
        self.layer_scale_1 = nn.Parameter(torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = self.norm_reparam(x) if hasattr(self, "norm_reparam") else self.token_mixer(self.norm1(x))
        x = x + self.layer_scale_1[:, None, None] * y
        return x + self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, cin, cout, k, s, p):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, k, s, p)

    def forward(self, x):
        return self.proj(x)


class RefBackbone(nn.Module):
    def __init__(self, depths, dims, mixer, deploy, in_chans=3, stem=(7, 4, 2), norm_name="norm6"):
        super().__init__()
        self.patch_embed = RefPatchEmbed(in_chans, dims[0], *stem)
        network = []
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            network.append(nn.Sequential(*[RefBlock(dim, mixer, deploy) for _ in range(depth)]))
            if i < len(depths) - 1:
                network.append(RefPatchEmbed(dim, dims[i + 1], 3, 2, 1))
        self.network = nn.ModuleList(network)
        self.norm_name = norm_name
        self.add_module(norm_name, nn.GroupNorm(1, dims[-1]))

    def forward(self, x):
        x = self.patch_embed(x)
        for m in self.network:
            x = m(x)
        return getattr(self, self.norm_name)(x)


class RefClassifier(nn.Module):
    """mmpretrain's ImageClassifier: backbone, GlobalAveragePooling neck, LinearClsHead."""

    def __init__(self, num_classes=1000, **kwargs):
        super().__init__()
        self.backbone = RefBackbone(**kwargs)
        self.head = nn.Module()
        self.head.fc = nn.Linear(kwargs["dims"][-1], num_classes)

    def forward(self, x):
        return self.head.fc(self.backbone(x).mean((2, 3)))


S12 = dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights far from any init, so that a wrong mapping or a wrong head shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "layer_scale" in name else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("weight") and p.ndim == 1
                                                                else 0.0))
    return model.eval()


def save(tmp_path, state_dict, wrap="state_dict"):
    path = tmp_path / "official.pth"
    torch.save({wrap: state_dict, "meta": {}} if wrap else state_dict, path)
    return str(path)


def load(name, path, **kwargs):
    """timm's local-file route; the overlay's class count says the checkpoint's head fits (else timm drops it)."""
    overlay = dict(file=path, num_classes=kwargs.get("num_classes", 1000))
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


@pytest.mark.parametrize("deploy", [False, True], ids=["training", "deploy"])
def test_mmpretrain_riformer_s12_loads_and_matches(tmp_path, deploy):
    ref = randomize(RefClassifier(mixer=RefAffine, deploy=deploy, **S12))
    model = load("riformer_s12", save(tmp_path, ref.state_dict()), token_mixer="identity" if deploy else "affine")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        scale = ref(x).abs().mean().item()
    assert max_diff(model, ref, x) < 1e-5 * max(1.0, scale)


def test_original_poolformer_layout_loads_and_matches(tmp_path):
    ref = randomize(RefClassifier(mixer=RefPooling, deploy=False, norm_name="norm", **S12))
    state = {k.removeprefix("backbone.").replace("head.fc.", "head."): v for k, v in ref.state_dict().items()}
    model = load("riformer_s12", save(tmp_path, state, wrap="model"), token_mixer="pooling")
    assert max_diff(model, ref, torch.randn(2, 3, 64, 64)) < 1e-4


def test_timm_head_differs_from_the_official_one(tmp_path):
    """The point of head_norm_first: pooling before the norm is another function of the same weights."""
    ref = randomize(RefClassifier(mixer=RefAffine, deploy=False, **S12))
    path = save(tmp_path, ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert max_diff(load("riformer_s12", path), ref, x) < 1e-4
    timm_head = timm.create_model("riformer_s12", head_norm_first=False).eval()
    timm_head.load_state_dict(load("riformer_s12", path).state_dict())
    assert max_diff(timm_head, ref, x) > 1e-3


def test_nano_reparameterized_equals_the_official_deploy_form(tmp_path):
    """Our re-parameterization of a loaded training checkpoint equals mmpretrain's switch_to_deploy arithmetic:
    loading the reference's deploy weights gives the same logits."""
    nano = dict(depths=(2, 2, 6, 2), dims=(16, 32, 64, 128), in_chans=1, stem=(3, 2, 1), num_classes=10)
    ref = randomize(RefClassifier(mixer=RefAffine, deploy=False, **nano))
    model = load("riformer_nano", save(tmp_path, ref.state_dict()), num_classes=10)
    deploy = timm.utils.reparameterize_model(model)
    ref_deploy = RefClassifier(mixer=RefAffine, deploy=True, **nano).eval()
    with torch.no_grad():  # mmpretrain's fuse_affine: gamma * (s - 1), beta * (s - 1) + t
        state = ref.state_dict()
        for k in list(state):
            if k.endswith("norm1.weight"):
                stem = k.removesuffix("norm1.weight")
                s = state[stem + "token_mixer.affine.weight"].reshape(-1) - 1
                state[stem + "norm_reparam.weight"] = state.pop(k) * s
                state[stem + "norm_reparam.bias"] = state.pop(stem + "norm1.bias") * s + state[
                    stem + "token_mixer.affine.bias"]
                del state[stem + "token_mixer.affine.weight"], state[stem + "token_mixer.affine.bias"]
        ref_deploy.load_state_dict(state)
    x = torch.randn(4, 1, 32, 32)
    assert max_diff(deploy, ref_deploy, x) < 1e-4
    assert max_diff(load("riformer_nano", save(tmp_path, ref_deploy.state_dict()), num_classes=10,
                         token_mixer="identity"), ref_deploy, x) < 1e-5


def test_a_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    ref = RefClassifier(mixer=RefAffine, deploy=True, **S12)
    with pytest.raises(ValueError, match="token_mixer='identity'"):
        load("riformer_s12", save(tmp_path, ref.state_dict()))  # deploy weights into the training form
    state = RefClassifier(mixer=RefAffine, deploy=False, **S12).state_dict()
    state["backbone.network.0.0.extra.weight"] = torch.zeros(1)
    del state["backbone.network.4.3.mlp.fc2.bias"]
    with pytest.raises(ValueError) as e:
        load("riformer_s12", save(tmp_path, state))
    assert "stages.0.blocks.0.extra.weight" in str(e.value)
    assert "stages.2.blocks.3.mlp.fc2.bias" in str(e.value)


def test_our_own_checkpoint_round_trips(tmp_path):
    model = randomize(timm.create_model("riformer_nano", num_classes=10))
    loaded = load("riformer_nano", save(tmp_path, model.state_dict(), wrap=None), num_classes=10)
    assert max_diff(model, loaded, torch.randn(2, 1, 32, 32)) == 0
