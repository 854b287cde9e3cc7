"""ONNX export of deploy models: ONNX Runtime computes torch's logits; the benchmark times both runtimes (issue 16)."""
import json

import pytest
import timm
import torch
from test_reparameterize import randomize

import pipeline.models  # noqa: F401
from pipeline.measure import ORT, OrtModel, export_onnx, max_logit_difference, ort_session


@pytest.mark.parametrize("name,kwargs", [("riformer_nano", {}), ("poolformer_nano", {})])
def test_onnx_runtime_matches_torch_on_the_deploy_model(tmp_path, name, kwargs):
    model = timm.utils.reparameterize_model(randomize(timm.create_model(name, num_classes=10, in_chans=1, **kwargs)))
    g = torch.Generator().manual_seed(0)
    export_onnx(model, torch.randn(2, 1, 32, 32, generator=g), tmp_path / "m.onnx")
    session = OrtModel(ort_session(tmp_path / "m.onnx", threads=1))
    # the batch axis is dynamic: other batch sizes than the example's run and agree
    batches = [(torch.randn(n, 1, 32, 32, generator=g), None) for n in (1, 5, 16)]
    check = max_logit_difference(model.eval(), session, batches)
    assert check["num_images"] == 22 and check["max_abs_logit"] > 1e-2
    assert check["max_abs_logit_diff"] <= 1e-4
    # a different model's logits are not mistaken for agreement
    other = timm.utils.reparameterize_model(randomize(timm.create_model(name, num_classes=10, in_chans=1, **kwargs),
                                                      seed=1))
    assert max_logit_difference(other.eval(), session, batches)["max_abs_logit_diff"] > 1e-2
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_benchmark_times_torch_and_onnx_runtime_in_one_run(tmp_path):
    from pipeline.__main__ import main

    out = tmp_path / "bench.json"
    main(["benchmark", "--models", "poolformer_nano", "riformer_nano:deploy", "--in-chans", "1", "--img-size", "32",
          "--num-classes", "10", "--batch-size", "4", "--repeats", "3", "--iters", "1", "--warmup", "1",
          "--threads", "1", "--device", "cpu", "--onnxruntime", "--out", str(out)])
    rows = json.loads(out.read_text())["models"]
    assert set(rows) == {"poolformer_nano", "riformer_nano:deploy", "poolformer_nano" + ORT,
                         "riformer_nano:deploy" + ORT}
    for name, row in rows.items():
        assert len(row["throughput"]["samples"]) == 3 and row["throughput"]["min"] > 0
        assert row["params"] == rows[name.removesuffix(ORT)]["params"]
    # each runtime's ratios are against the reference in the same runtime
    assert rows["poolformer_nano" + ORT]["ratio_to_reference"]["samples"] == [1.0, 1.0, 1.0]
    ort_ratio = rows["riformer_nano:deploy" + ORT]["ratio_to_reference"]["median"]
    ort_speeds = [rows[n + ORT]["throughput"]["samples"] for n in ("riformer_nano:deploy", "poolformer_nano")]
    assert ort_ratio == pytest.approx(sorted(a / b for a, b in zip(*ort_speeds, strict=True))[1])
