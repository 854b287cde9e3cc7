"""Params, MACs and throughput, measured the same way for every model.

MACs: one counter for every model, torch's FlopCounterMode (matmul, conv, bmm, addmm, attention; FLOPs/2),
plus GFNet's FFTs with the usual real-FFT cost of 2.5 N log2 N FLOPs per transform of N points.
Element-wise work (norms, activations, GFNet's complex filter product, pooling) is not counted, as in
fvcore and the papers' tables.

Throughput: warm-up, then `repeats` rounds; in each round every model runs `iters` batches, in an order
rotated from round to round, so that all models see the same machine state. Each model's images/s is
reported as median, min and max over rounds, and each ratio to the reference model is taken per round
(the two timings of a round are adjacent) and summarised the same way. The paper's protocol is batch 2048
at 224 on an A100, repeated and summarised by the median (riformer.md Sec. 4); `--protocol paper` sets it.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from pipeline.io import load_checkpoint, model_from_checkpoint, write_json

aten = torch.ops.aten


def _fft_flops(in_shape, dim, *args, out_shape=None, **kwargs) -> int:
    real = max(in_shape, out_shape, key=math.prod)  # the real side of an r2c / c2r transform is the longer
    n_points = math.prod(real[d] for d in dim)
    return int(2.5 * n_points * math.log2(max(n_points, 2)) * (math.prod(real) // n_points))


FFT_FLOPS = {aten._fft_r2c.default: _fft_flops, aten._fft_c2r.default: _fft_flops,
             aten._fft_c2c.default: _fft_flops}


def count_params(model: torch.nn.Module) -> int:
    """Parameters, plus the fixed tensors the reference code holds as frozen Parameters (and counts) and we hold as
    buffers, so that every parameter gets a gradient (timm's model tests): AdaViT's position embedding
    (pipeline/models/adavit.py) and RandFormer's random token-mixing matrices (pipeline/models/metaformer_v2.py)."""
    fixed = sum(b.numel() for name, b in model.named_buffers()
                if name.split(".")[-1] in ("pos_embed", "random_matrix"))
    return sum(p.numel() for p in model.parameters()) + fixed


@torch.no_grad()
def count_macs(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one image of `input_shape` (C, H, W)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False, custom_mapping=FFT_FLOPS)
    with counter:
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2


def summarize(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_throughput(models: dict[str, torch.nn.Module], batch: torch.Tensor | list[torch.Tensor],
                       warmup: int = 2, repeats: int = 7, iters: int = 3,
                       progress: bool = True) -> dict[str, list[float]]:
    """Images/s of each model per round, from one interleaved run (see module docstring). `batch` may be a
    list of batches (e.g. single images): one iteration then runs them all."""
    batches = batch if isinstance(batch, list) else [batch]
    device, dtype = batches[0].device, batches[0].dtype
    n_images = sum(len(b) for b in batches)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    names = list(models)
    for model in models.values():
        model.eval()
    with autocast:
        for name in tqdm(names, desc="warm-up", disable=not progress, leave=False):
            for _ in range(warmup):
                for b in batches:
                    models[name](b)
        _sync(device)
        samples = {name: [] for name in names}
        for r in tqdm(range(repeats), desc="throughput rounds", disable=not progress, leave=False):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                _sync(device)
                start = time.perf_counter()
                for _ in range(iters):
                    for b in batches:
                        models[name](b)
                _sync(device)
                samples[name].append(iters * n_images / (time.perf_counter() - start))
    return samples


ORT = " [onnxruntime]"  # suffix of a model's ONNX Runtime twin in a benchmark


def ratios(samples: dict[str, list[float]], reference: str) -> dict[str, dict]:
    """Per-round images/s ratio of each model to the reference of its own runtime (torch, or ONNX Runtime for the
    `ORT`-suffixed twins); the two timings of a round are adjacent."""
    return {name: summarize([a / b for a, b in zip(s, samples[reference + ORT if name.endswith(ORT) else reference],
                                                   strict=True)])
            for name, s in samples.items()}


def benchmark_models(models: dict[str, torch.nn.Module], input_shape: tuple[int, int, int], batch_size: int,
                     device: torch.device, dtype: torch.dtype = torch.float32, warmup: int = 2,
                     repeats: int = 7, iters: int = 3, reference: str | None = None,
                     progress: bool = True, images: torch.Tensor | None = None,
                     onnxruntime: bool | list[str] = False) -> dict:
    """Params, MACs and interleaved throughput of several models, as one JSON-ready record. The batch is
    `images` (real test images: input-dependent models such as AdaViT need them) or random numbers.
    `onnxruntime` (True: every model; or a list of names): those models are also exported to ONNX and timed in
    ONNX Runtime in the same rounds (CPU, fp32), as `name [onnxruntime]`."""
    rows = {name: {"params": count_params(m), "macs": count_macs(m, input_shape)} for name, m in models.items()}
    models = {name: m.to(device) for name, m in models.items()}
    if device.type == "cuda":
        models = {name: m.to(memory_format=torch.channels_last) for name, m in models.items()}
    batch = (images[:batch_size].to(device, dtype) if images is not None
             else torch.randn(batch_size, *input_shape, device=device, dtype=dtype))
    with tempfile.TemporaryDirectory() as tmp:
        if onnxruntime:
            if device.type != "cpu" or dtype != torch.float32:
                raise ValueError("onnxruntime: CPU and float32 only")
            from pipeline.export import onnx_pair
            names = list(models) if onnxruntime is True else onnxruntime
            models.update(onnx_pair({n: models[n] for n in names}, batch[:2], Path(tmp), torch.get_num_threads()))
            rows.update({name + ORT: dict(rows[name]) for name in names})
        samples = measure_throughput(models, batch, warmup, repeats, iters, progress)
    for name, s in samples.items():
        rows[name]["throughput"] = summarize(s)
    if reference is not None:
        for name, r in ratios(samples, reference).items():
            rows[name]["ratio_to_reference"] = r
    return {
        "device": str(device), "device_name": device_name(device), "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size, "input_shape": list(input_shape), "threads": torch.get_num_threads(),
        "warmup": warmup, "repeats": repeats, "iters_per_repeat": iters, "reference": reference,
        "torch": torch.__version__, "timm": timm.__version__, "models": rows,
    }


def build_model(spec: str, num_classes: int, in_chans: int, img_size: int,
                decision_bias: float | None = None) -> torch.nn.Module:
    """`name[:form]` from the registry, or a checkpoint path. Forms: train | deploy | identity | pooling
    (RIFormer), masked | fast (AdaViT's two inference paths; `decision_bias` sets its decision heads' bias).
    Weights are initialised from seed 0, so the same name gives the same model in both forms."""
    if spec.endswith((".pt", ".pth")):
        model = model_from_checkpoint(load_checkpoint(spec))
        return timm.utils.reparameterize_model(model)
    name, _, form = spec.partition(":")
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    if name.startswith("gfnet"):
        kwargs["img_size"] = img_size
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
    model = timm.create_model(name, **kwargs)
    if form == "fast":
        from pipeline.adaptive import FastPath
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
    training-time (affine) form of the student; `runs` maps each run to its architecture."""
    models, runs = {}, {}
    affine_run = None
    first_seed = study.settings["seeds"][0]
    for run in study.runs:
        if study.run_specs[run][2] != first_seed:
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
    from pipeline.adaptive import FastPath, adaptive_speedup

    adaptive = [r for r in runs if study.is_adaptive(r)]
    for run in adaptive:  # AdaViT: its fast path beside its masked path
        models[fast_path_label(runs[run])] = FastPath(models[runs[run]])
    t6 = study.tables["T6"]
    reference_run = next(r["run"] for r in t6["rows"] if r["row"] == t6["reference"])
    b = study.settings["evaluate"]["benchmark"]
    torch.set_num_threads(threads or b["threads"])
    # T6's PoolFormer (its reference) and RIFormer deploy models also run in ONNX Runtime (the export stage's
    # runtime), on the CPU in fp32, when both are students the export stage exports (not a GFNet, whose FFTs
    # the TorchScript exporter cannot write, as in a trimmed T6)
    pair = [reference_run] + [r["run"] for r in t6["rows"] if r["row"] == "riformer_s12"][:1]
    exportable = len(pair) == 2 and all(r in study.export_runs for r in pair)
    onnx = [runs[r] for r in pair] if exportable and b["device"] == "cpu" and b["dtype"] == "float32" else []
    from pipeline.data import build_loader, load_prepared
    prepared = load_prepared(study.data_dir)
    in_chans = prepared.meta["in_chans"]
    img = study.settings["train"]["data"]["img_size"]
    n_images = max(b["batch_size"], b["adaptive"]["images"] if adaptive else 0)
    images = next(iter(build_loader(prepared, "test", n_images, img, train=False)))[0]
    device, dtype = torch.device(b["device"]), getattr(torch, b["dtype"])
    result = benchmark_models(models, (in_chans, img, img), b["batch_size"], device, dtype, b["warmup"],
                              b["repeats"], b["iters"], reference=runs[reference_run], images=images,
                              onnxruntime=onnx)
    result.update(profile=study.profile, runs=runs, protocol="study", adaptive={})
    sizes = study.settings["evaluate"].get("sizes") or {}
    if sizes.get("names"):
        result["sizes"] = size_benchmark(sizes, device, dtype)
    for run in adaptive:  # speed-up over the dense DeiT it was initialised from, at batch 1 and grouped
        dense = runs[study.init_source(run)]
        a = b["adaptive"]
        result["adaptive"][run] = {"dense": dense, **adaptive_speedup(
            models[dense].to(device), models[runs[run]].to(device), images.to(device, dtype), b["batch_size"],
            a["batch_1_images"], b["warmup"], b["repeats"], b["iters"])}
    return result


def size_benchmark(s: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """T6 at every size: PoolFormer-X and deploy RIFormer-X for each size X of `s["names"]` (s12 ... m48) at
    ImageNet shape (3 x img_size^2, 1000 classes), untrained weights, in one interleaved run; each RIFormer's
    per-round ratio to its PoolFormer is the report's (`ratio_to_reference` here is to the first PoolFormer).
    The PoolFormers are `riformer_X:pooling`: the same backbone and head (the official PoolFormer's: norm, then
    pool) with the pooling mixer, so that a pair differs by the token mixer only."""
    img = s["img_size"]
    models = {spec: build_model(spec, 1000, 3, img) for size in s["names"]
              for spec in (f"riformer_{size}:pooling", f"riformer_{size}:deploy")}
    return benchmark_models(models, (3, img, img), s["batch_size"], device, dtype, s["warmup"], s["repeats"],
                            s["iters"], reference=f"riformer_{s['names'][0]}:pooling")


def fast_path_label(label: str) -> str:
    return label + " (fast path)"


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.protocol == "paper":
        args.batch_size, args.img_size, args.iters, args.repeats = 2048, 224, 30, 3
    device = torch.device(args.device)
    models = {spec: build_model(spec, args.num_classes, args.in_chans, args.img_size, args.decision_bias)
              for spec in args.models}
    reference = args.reference or args.models[0]
    if reference not in models:
        raise ValueError(f"--reference {reference!r} is not one of --models")
    result = benchmark_models(models, (args.in_chans, args.img_size, args.img_size), args.batch_size, device,
                              getattr(torch, args.dtype), args.warmup, args.repeats, args.iters, reference,
                              onnxruntime=args.onnxruntime)
    result["protocol"] = args.protocol
    write_json(args.out, result)
    print_benchmark(result)
    return result


def print_benchmark(result: dict) -> None:
    reference = result["reference"]
    for name, row in result["models"].items():
        t, r = row["throughput"], row.get("ratio_to_reference")
        print(f"{name:28s} params {row['params']:>11,d}  MACs {row['macs'] / 1e9:7.3f} G  "
              f"img/s median {t['median']:9.2f} [{t['min']:.2f}, {t['max']:.2f}]"
              + (f"  x{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}] vs {reference}"
                 + (ORT if name.endswith(ORT) else "") if r else ""))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", required=True,
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
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="the paper does not say fp16 or fp32 (riformer.md Sec. 8); fp32 by default")
    p.add_argument("--onnxruntime", action="store_true",
                   help="also time each model exported to ONNX, in ONNX Runtime, in the same rounds (CPU, fp32)")
    p.add_argument("--threads", type=int, help="torch threads (default: the profile's, or torch's default)")
    p.add_argument("--protocol", choices=["custom", "paper"], default="custom",
                   help="paper: batch 2048 at 224, 3 rounds of 30 batches (A100-sized)")
    p.add_argument("--out", required=True, help="JSON file to write")
