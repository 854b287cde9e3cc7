"""Measurement stages write the fields the reports read (issue 2, Sec. 4)."""
import json

import timm
import torch

import pipeline.models  # noqa: F401
from pipeline.__main__ import STAGES, main
from pipeline.measure import count_macs
from pipeline.models import metaformer_blocks


def test_cli_lists_every_stage(capsys):
    try:
        main(["--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    assert all(stage in out for stage in STAGES)


def test_macs_match_the_published_figures():
    # paper: PoolFormer-S12 1.82 G (pooling is element-wise, not counted), GFNet-H-Ti 2.1 G with its FFTs
    assert abs(count_macs(timm.create_model("poolformer_s12"), (3, 224, 224)) / 1e9 - 1.82) < 0.02
    gfnet = timm.create_model("gfnet_h_ti")
    macs = count_macs(gfnet, (3, 224, 224))
    assert 1.95e9 < macs < 2.15e9
    assert count_macs(timm.utils.reparameterize_model(timm.create_model("riformer_s12")), (3, 224, 224)) \
        <= count_macs(timm.create_model("poolformer_s12"), (3, 224, 224))


def test_benchmark_json_fields(tmp_path):
    out = tmp_path / "bench.json"
    main(["benchmark", "--models", "poolformer_nano", "riformer_nano:deploy", "riformer_nano:train",
          "--img-size", "32", "--in-chans", "1", "--num-classes", "10", "--batch-size", "4", "--repeats", "3",
          "--iters", "1", "--warmup", "1", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    for key in ("device", "device_name", "dtype", "batch_size", "input_shape", "threads", "repeats", "reference"):
        assert key in result
    assert result["batch_size"] == 4 and result["input_shape"] == [1, 32, 32] and result["threads"] == 1
    assert result["dtype"] == "float32" and result["reference"] == "poolformer_nano"
    rows = result["models"]
    assert set(rows) == {"poolformer_nano", "riformer_nano:deploy", "riformer_nano:train"}
    for row in rows.values():
        t = row["throughput"]
        assert len(t["samples"]) == 3 and t["min"] <= t["median"] <= t["max"] and t["min"] > 0
        assert row["params"] > 0 and row["macs"] > 0
    assert rows["poolformer_nano"]["ratio_to_reference"]["median"] == 1.0
    # deploy = PoolFormer less the first layer scale of each block (folded into the merged norm)
    ls1 = sum(b.norm1.weight.numel() for b in metaformer_blocks(timm.create_model("poolformer_nano")))
    assert rows["riformer_nano:train"]["params"] > rows["poolformer_nano"]["params"] \
        == rows["riformer_nano:deploy"]["params"] + ls1


def test_latency_breakdown_json_fields(tmp_path):
    from pipeline.latency import STEPS, latency_breakdown

    result = latency_breakdown(batch_size=1, img_size=32, device=torch.device("cpu"), dtype=torch.float32,
                               warmup=1, repeats=2, iters=1, depth=2)
    assert [s["step"] for s in result["steps"]] == STEPS
    assert all(s["min_ms"] <= s["cumulative_ms"] <= s["max_ms"] for s in result["steps"])
    assert -1 < result["token_mixer_share"]["median"] < 1
    main(["latency-breakdown", "--batch-size", "1", "--img-size", "32", "--repeats", "1", "--warmup", "0",
          "--out", str(tmp_path / "lat.json")])
    assert json.loads((tmp_path / "lat.json").read_text())["depth"] == 12


def test_bench_train_measures_every_trained_architecture_once(tmp_path):
    """bench-train: one row per distinct architecture of the profile, training FLOPs about 3x the forward's
    (the backward pass computes two products per forward one), a share of the measured GEMM rate."""
    from pipeline.bench_train import bench_train
    from pipeline.measure import count_macs
    from pipeline.study import load_study

    study = load_study("smoke", check_data=False)
    result = bench_train(study, threads=1, batch_size=8, warmup=1, repeats=1, iters=1, progress=False)
    rows = result["models"]
    # affine is riformer_nano's default mixer: the plain and the explicit one are the same architecture
    (affine,) = {"riformer_nano", "riformer_nano token_mixer=affine"} & set(rows)
    kinds = {"gfnet_nano", "lightvit_nano", "deit_nano", "ada_deit_nano", "riformer_nano token_mixer=pooling"}
    assert kinds <= set(rows)
    forward = 2 * count_macs(timm.create_model("riformer_nano", num_classes=10, in_chans=1), (1, 32, 32))
    assert 2.0 < rows[affine]["train_flops_per_image"] / forward < 3.2
    assert result["matmul_flops_per_s"]["median"] > 1e9
    for row in rows.values():
        assert row["train_images_per_s"]["median"] > 0 and 0 < row["fraction_of_matmul"]["median"] < 1
