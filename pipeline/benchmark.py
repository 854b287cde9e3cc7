"""`python -m pipeline benchmark`: params, MACs and interleaved throughput of registry models (a command line over
pipeline.measure); with `--profile`, the study's benchmark (Table 6 and its siblings: the benchmark stage, alone on
the machine once the first seed's deploy models exist).

Models are named by spec strings, `name[:form]` or a checkpoint file (build_model). The paper's protocol is batch
2048 at 224 on an A100, repeated and summarised by the median (riformer.md Sec. 4); `--protocol paper` sets it,
with the paper profile's precision policy, tf32 (params/paper.yaml says why).
"""
from __future__ import annotations

import argparse

import timm
import torch

from pipeline import tracking
from pipeline.adaptive import adaptive_speedup
from pipeline.data import load_prepared, test_images
from pipeline.io import load_checkpoint, model_from_checkpoint, write_json
from pipeline.measure import PRECISIONS, benchmark_models, print_benchmark, setting_device
from pipeline.models import create_model
from pipeline.models.adavit import FastPath, fast_path_label
from pipeline.study import load_study


def build_model(spec: str, num_classes: int, in_chans: int, img_size: int,
                decision_bias: float | None = None) -> torch.nn.Module:
    """`name[:form]` from the registry, or a checkpoint path. Forms: train | deploy | identity | pooling
    (RIFormer), masked | fast (AdaViT's two inference paths; `decision_bias` sets its decision heads' bias).
    Weights are initialised from seed 0, so the same name gives the same model in both forms."""
    if spec.endswith((".pt", ".pth")):
        model = model_from_checkpoint(load_checkpoint(spec))
        return timm.utils.reparameterize_model(model)
    name, _, form = spec.partition(":")
    kwargs = {}
    if name.startswith("ada_") and decision_bias is not None:
        kwargs["decision_bias"] = decision_bias
    if form in ("identity", "pooling"):
        kwargs["token_mixer"] = form
    elif form not in ("", "train", "deploy", "masked", "fast"):
        raise ValueError(f"{spec}: unknown form {form!r} (train | deploy | identity | pooling | masked | fast)")
    if name not in timm.list_models():
        raise ValueError(f"{spec}: unknown model {name!r}; see timm.list_models()")
    if form == "fast" and not name.startswith("ada_"):
        raise ValueError(f"{spec}: only AdaViT models (ada_*) have a fast path")
    torch.manual_seed(0)
    model = create_model(name, num_classes, in_chans, img_size, **kwargs)
    if form == "fast":
        return FastPath(model)
    return timm.utils.reparameterize_model(model) if form == "deploy" else model


# model_kwargs that do not change the deploy architecture
_NOT_ARCH = ("drop_path_rate", "affine_init", "drop_rate", "dropcls", "decision_bias")


def architecture_label(model: str, kwargs: dict) -> str:
    extra = " ".join(f"{k}={v}" for k, v in sorted(kwargs.items())
                     if k not in _NOT_ARCH + ("num_classes", "in_chans", "img_size"))
    return f"{model} {extra}".strip()


def study_benchmark(study, threads: int | None = None) -> dict:
    """One interleaved run over every distinct deploy architecture of the study (first seed), plus the
    training-time (affine) form of the student, AdaViT's fast paths and T6's ONNX Runtime twins; `runs` maps each
    run to its architecture. Then T6 at every size, and AdaViT's speed-up over its dense DeiT."""
    models, runs = _study_models(study)
    adaptive = [r for r in runs if study.is_adaptive(r)]
    t6 = study.tables["T6"]
    reference_run = next(r["run"] for r in t6["rows"] if r["row"] == t6["reference"])
    b = study.settings["evaluate"]["benchmark"]
    torch.set_num_threads(threads or b["threads"])
    prepared = load_prepared(study.data_dir)
    in_chans = prepared.meta["in_chans"]
    img = study.settings["train"]["data"]["img_size"]
    images = test_images(prepared, max(b["batch_size"], b["adaptive"]["images"] if adaptive else 0), img)[0]
    device, precision = setting_device(b["device"], "evaluate.benchmark.device"), b["precision"]
    result = benchmark_models(models, (in_chans, img, img), b["batch_size"], device, precision, b["warmup"],
                              b["repeats"], b["iters"], reference=runs[reference_run], images=images,
                              onnxruntime=_onnx_twins(study, runs, reference_run))
    result.update(profile=study.profile, runs=runs, protocol="study", adaptive={})
    sizes = study.settings["evaluate"].get("sizes") or {}
    if sizes.get("names"):
        result["sizes"] = size_benchmark(sizes, device, precision)
    for run in adaptive:  # speed-up over the dense DeiT it was initialised from, at batch 1 and grouped
        dense = runs[study.init_source(run)]
        a = b["adaptive"]
        result["adaptive"][run] = {"dense": dense, **adaptive_speedup(
            models[dense].to(device), models[runs[run]].to(device), images.to(device), b["batch_size"],
            a["batch_1_images"], b["warmup"], b["repeats"], b["iters"], precision)}
    return result


def _study_models(study) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """(architecture label -> deploy model, run -> label) over the first seed's runs, with the student's
    training-time (affine) form and each AdaViT's fast path beside its masked path."""
    models, runs, affine_run = {}, {}, None
    for run in study.runs:
        if study.run_specs[run][2] != study.settings["seeds"][0]:
            continue
        ckpt = load_checkpoint(study.deployed_model(run))
        label = architecture_label(ckpt["model"], ckpt.get("model_kwargs", {}))
        runs[run] = label
        if label not in models:
            models[label] = model_from_checkpoint(ckpt)
        if affine_run is None and study.needs_reparameterize(run):
            affine_run = run
    if affine_run is not None:
        ckpt = load_checkpoint(study.model_path(affine_run))
        models[architecture_label(ckpt["model"], ckpt["model_kwargs"]) + " (training form)"] = \
            model_from_checkpoint(ckpt)
    for run in runs:
        if study.is_adaptive(run):
            models[fast_path_label(runs[run])] = FastPath(models[runs[run]])
    return models, runs


def _onnx_twins(study, runs: dict[str, str], reference_run: str) -> list[str]:
    """T6's PoolFormer (its reference) and RIFormer deploy models also run in ONNX Runtime (the export stage's
    runtime), on the CPU in fp32, when both are students the export stage exports (not a GFNet, whose FFTs
    the TorchScript exporter cannot write, as in a trimmed T6)."""
    b = study.settings["evaluate"]["benchmark"]
    pair = [reference_run] + [r["run"] for r in study.tables["T6"]["rows"] if r["row"] == "riformer_s12"][:1]
    exportable = len(pair) == 2 and all(r in study.export_runs for r in pair)
    return [runs[r] for r in pair] if exportable and b["device"] == "cpu" and b["precision"] == "fp32" else []


def size_benchmark(s: dict, device: torch.device, precision: str) -> dict:
    """T6 at every size: PoolFormer-X and deploy RIFormer-X for each size X of `s["names"]` (s12 ... m48) at
    ImageNet shape (3 x img_size^2, 1000 classes), untrained weights, in one interleaved run; each RIFormer's
    per-round ratio to its PoolFormer is the report's (`ratio_to_reference` here is to the first PoolFormer).
    The PoolFormers are `riformer_X:pooling`: the same backbone and head (the official PoolFormer's: norm, then
    pool) with the pooling mixer, so that a pair differs by the token mixer only."""
    img = s["img_size"]
    models = {spec: build_model(spec, 1000, 3, img) for size in s["names"]
              for spec in (f"riformer_{size}:pooling", f"riformer_{size}:deploy")}
    return benchmark_models(models, (3, img, img), s["batch_size"], device, precision, s["warmup"], s["repeats"],
                            s["iters"], reference=f"riformer_{s['names'][0]}:pooling")


def run_study(profile: str, threads: int | None) -> dict:
    """The study's benchmark (`benchmark --profile P`): written to its benchmark.json and logged to MLflow."""
    study = load_study(profile, check_data=False)
    with tracking.stage_run(study.profile, "benchmark", "all") as (mlflow, _):
        bench = study_benchmark(study, threads)
        write_json(study.benchmark_path, bench)
        for label, row in bench["models"].items():
            mlflow.log_metric(f"throughput/{_metric_name(label)}", row["throughput"]["median"])
        mlflow.log_dict(bench, "benchmark.json")
    print_benchmark(bench)
    return bench


def _metric_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in label)[:250]


def run(args: argparse.Namespace) -> dict:
    if args.profile:
        if args.models or args.out:
            raise SystemExit("benchmark: --profile runs the study's benchmark; --models and --out are for registry "
                             "models")
        return run_study(args.profile, args.threads)
    if not (args.models and args.out):
        raise SystemExit("benchmark: give --models and --out (registry models), or --profile (the study's)")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.protocol == "paper":
        args.batch_size, args.img_size, args.iters, args.repeats = 2048, 224, 30, 3
    precision = args.precision or ("tf32" if args.protocol == "paper" else "fp32")
    device = setting_device(args.device, "--device")
    models = {spec: build_model(spec, args.num_classes, args.in_chans, args.img_size, args.decision_bias)
              for spec in args.models}
    reference = args.reference or args.models[0]
    if reference not in models:
        raise ValueError(f"--reference {reference!r} is not one of --models")
    result = benchmark_models(models, (args.in_chans, args.img_size, args.img_size), args.batch_size, device,
                              precision, args.warmup, args.repeats, args.iters, reference,
                              onnxruntime=args.onnxruntime)
    result["protocol"] = args.protocol
    write_json(args.out, result)
    print_benchmark(result)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help="the study's benchmark of this profile (its deploy models, written to "
                                     "results/<profile>/benchmark.json); not with --models")
    p.add_argument("--models", nargs="+",
                   help="registry names with an optional form, e.g. poolformer_s12 riformer_s12:deploy "
                        "riformer_s12:train, or checkpoint files (re-parameterized before timing)")
    p.add_argument("--reference", help="model the throughput ratios are taken against (default: the first)")
    p.add_argument("--decision-bias", type=float,
                   help="AdaViT (ada_*): initial bias of every decision head, to benchmark a chosen keep rate")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--iters", type=int, default=2, help="batches per model per round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="fp32 (strict: no TF32), tf32 (TF32 for matmuls and convolutions; CUDA only), bf16 / fp16 "
                        "(autocast over fp32 weights); default fp32, or tf32 with --protocol paper")
    p.add_argument("--onnxruntime", action="store_true",
                   help="also time each model exported to ONNX, in ONNX Runtime, in the same rounds (CPU, fp32)")
    p.add_argument("--threads", type=int, help="torch threads (default: the profile's, or torch's default)")
    p.add_argument("--protocol", choices=["custom", "paper"], default="custom",
                   help="paper: batch 2048 at 224, 3 rounds of 30 batches (A100-sized), precision tf32")
    p.add_argument("--out", help="JSON file to write (with --models)")
