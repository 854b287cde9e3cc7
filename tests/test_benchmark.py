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
    for key in ("device", "device_name", "precision", "batch_size", "input_shape", "threads", "repeats", "reference"):
        assert key in result
    assert result["batch_size"] == 4 and result["input_shape"] == [1, 32, 32] and result["threads"] == 1
    assert result["precision"]["policy"] == "fp32" and result["reference"] == "poolformer_nano"
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

    result = latency_breakdown(batch_size=1, img_size=32, device=torch.device("cpu"), precision="fp32",
                               warmup=1, repeats=2, iters=1, depth=2)
    assert result["precision"] == {"policy": "fp32", "autocast": None, "matmul_tf32": None, "cudnn_tf32": None,
                                   "cudnn_benchmark": None}  # the CUDA flags: null on the CPU
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


class _FlagProbe(torch.nn.Module):
    """Records the precision flags in effect at each forward pass."""

    def __init__(self):
        super().__init__()
        self.conv, self.seen = torch.nn.Conv2d(1, 2, 3), []

    def forward(self, x):
        y = self.conv(x)
        self.seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                          torch.backends.cudnn.benchmark, torch.is_autocast_enabled("cpu") and y.dtype))
        return y


def test_precision_policy_is_in_force_while_models_run_and_restored_after():
    """Every model of a run sees the policy's flags (fp32: TF32 off for matmul and cuDNN, the autotuner on; bf16 on
    the CPU: under autocast, TF32 off); torch's flags are back after, an error too; tf32 on the CPU is refused."""
    import pytest

    from pipeline.measure import measure_throughput, precision_policy

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    batch = torch.randn(2, 1, 8, 8)
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True  # not torch's defaults
        torch.backends.cudnn.benchmark = False
        before = (True, True, False)
        policies = {"fp32": (False, False, True, False), "bf16": (False, False, True, torch.bfloat16)}
        for precision, expected in policies.items():
            models = {"a": _FlagProbe(), "b": _FlagProbe()}
            measure_throughput(models, batch, warmup=1, repeats=2, iters=1, progress=False, precision=precision)
            for m in models.values():
                assert len(m.seen) == 3 and set(m.seen) == {expected}, (precision, m.seen)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                    torch.backends.cudnn.benchmark) == before
            assert not torch.is_autocast_enabled("cpu")
        with pytest.raises(RuntimeError), precision_policy("fp32", torch.device("cpu")):
            raise RuntimeError("a model failed")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark) == before
        with pytest.raises(ValueError, match="tf32 on cpu"):
            measure_throughput({"a": _FlagProbe()}, batch, progress=False, precision="tf32")
        with pytest.raises(ValueError, match="one of fp32, tf32, bf16, fp16"):
            measure_throughput({"a": _FlagProbe()}, batch, progress=False, precision="float32")
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def test_benchmark_record_carries_the_precision_policy():
    """benchmark_models' record (the study's benchmark and T6 at every size) names the policy and its flags, and its
    machine record carries the policy, which compare requires to be the same."""
    import pytest

    from pipeline.measure import benchmark_models

    probe = _FlagProbe()
    result = benchmark_models({"probe": probe}, (1, 8, 8), 2, torch.device("cpu"), "bf16", warmup=1, repeats=1,
                              iters=1, progress=False)
    assert result["precision"] == {"policy": "bf16", "autocast": "bfloat16", "matmul_tf32": None,
                                   "cudnn_tf32": None, "cudnn_benchmark": None}
    assert result["machine"]["precision"] == "bf16" and "dtype" not in result
    assert probe.seen[-1][3] == torch.bfloat16  # ran under autocast, on fp32 weights
    assert probe.conv.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="tf32 on cpu"):
        benchmark_models({"probe": probe}, (1, 8, 8), 2, torch.device("cpu"), "tf32", progress=False)


def test_compare_reads_a_report_without_the_precision_as_fp32():
    """A report from before the precision policy (its machine has no precision: CPU float32) reads as fp32, so that it
    compares with a fresh fp32 report as before, and not with a bf16 one; a GPU record from before the policy is no
    policy's."""
    from pipeline.compare import machine_difference
    from pipeline.io import read_json
    from pipeline.measure import throughput_precision
    from pipeline.publish import REPORTS

    committed = read_json(REPORTS / "default" / "summary.json")["machine"]
    assert committed.get("precision", "fp32") == "fp32"
    old = {k: v for k, v in committed.items() if k != "precision"}  # as an older report records it
    assert throughput_precision(old) == "fp32"
    assert machine_difference({**old, "precision": "fp32"}, old) is None
    assert machine_difference({**old, "precision": "bf16"}, old) == "precision fp32 vs bf16"
    gpu = {**old, "gpu": "NVIDIA A100"}
    assert "precision" in machine_difference({**gpu, "precision": "fp32"}, gpu)


def test_evaluate_device_setting(monkeypatch):
    """evaluate.device: cuda on a machine without CUDA is an error naming the setting; auto falls back to cpu."""
    import pytest

    from pipeline.measure import setting_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="evaluate.device is cuda, but torch sees no CUDA device"):
        setting_device("cuda", "evaluate.device")
    with pytest.raises(SystemExit, match="latency.device is 'gpu'"):
        setting_device("gpu", "latency.device")
    assert setting_device("auto", "x") == setting_device("cpu", "x") == torch.device("cpu")


def test_paper_profile_evaluates_on_a_gpu_and_times_in_tf32():
    """The paper profile's evaluate jobs ask for a GPU (and get one through pipeline.gpus), with data workers; its
    throughputs are timed in tf32. The default profile's stay on the CPU, in fp32."""
    from pipeline.stages import evaluate_stages
    from pipeline.study import load_study

    paper, default = load_study("paper", check_data=False), load_study("default", check_data=False)
    stages = evaluate_stages(paper)
    assert stages and all(s.resources == {"gpu": 1} and "pipeline.gpus" in s.launcher for s in stages)
    assert paper.settings["evaluate"]["device"] == "cuda" and paper.settings["evaluate"]["workers"] > 0
    assert paper.settings["evaluate"]["benchmark"]["precision"] == paper.settings["latency"]["precision"] == "tf32"
    assert all(s.resources == {} and s.launcher == "python -m pipeline" for s in evaluate_stages(default))
    assert default.settings["evaluate"]["device"] == "cpu" and default.settings["evaluate"]["workers"] == 0
    assert default.settings["evaluate"]["benchmark"]["precision"] == default.settings["latency"]["precision"] == "fp32"
