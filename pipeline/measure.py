"""Measurement primitives, the same for every model and every stage: params and MACs, throughput from one
interleaved run, ONNX Runtime twins, logit differences and the test-set evaluation loop.

MACs: one counter for every model, torch's FlopCounterMode (matmul, conv, bmm, addmm, attention; FLOPs/2),
plus GFNet's FFTs with the usual real-FFT cost of 2.5 N log2 N FLOPs per transform of N points.
Element-wise work (norms, activations, GFNet's complex filter product, pooling) is not counted, as in
fvcore and the papers' tables.

Throughput: warm-up, then `repeats` rounds; in each round every model runs `iters` batches, in an order
rotated from round to round, so that all models see the same machine state. Each model's images/s is
reported as median, min and max over rounds, and each ratio to the reference model is taken per round
(the two timings of a round are adjacent) and summarised the same way.

Precision: every timing runs under one policy (`precision_policy`), the same for every model of a run, written in
its record. torch's defaults would mix precisions on CUDA (cuDNN's TF32 on, matmul's off): the 1x1-conv MLPs of
PoolFormer / RIFormer / ConvFormer on TF32 tensor cores, the Linear layers of DeiT, AdaViT, LightViT, Swin, GFNet
and CAFormer in strict fp32. `fp32`: TF32 off for both (strict); `tf32`: on for both; `bf16` / `fp16`: autocast
(AMP) over fp32 weights, TF32 off for what autocast leaves in fp32. Every policy turns cuDNN's autotuner on
(`cudnn.benchmark`, as timm's benchmark.py does) and restores torch's flags after. TF32 is a CUDA tensor-core mode:
`tf32` on the CPU is refused (it would be an fp32 timing under another name).
"""
from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.utils import accuracy
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from pipeline.io import atomic_path

aten = torch.ops.aten
ORT = " [onnxruntime]"  # suffix of a model's ONNX Runtime twin in a benchmark


# ------------------------------------------------------------------------------------------- params, MACs
def _fft_flops(in_shape, dim, *args, out_shape=None, **kwargs) -> int:
    real = max(in_shape, out_shape, key=math.prod)  # the real side of an r2c / c2r transform is the longer
    n_points = math.prod(real[d] for d in dim)
    return int(2.5 * n_points * math.log2(max(n_points, 2)) * (math.prod(real) // n_points))


FFT_FLOPS = {aten._fft_r2c.default: _fft_flops, aten._fft_c2r.default: _fft_flops,
             aten._fft_c2c.default: _fft_flops}


def count_params(model: nn.Module) -> int:
    """Parameters, plus the fixed tensors the reference code holds as frozen Parameters (and counts) and we hold as
    buffers, so that every parameter gets a gradient (timm's model tests): AdaViT's position embedding
    (pipeline/models/adavit.py) and RandFormer's random token-mixing matrices (pipeline/models/metaformer_v2.py)."""
    fixed = sum(b.numel() for name, b in model.named_buffers()
                if name.split(".")[-1] in ("pos_embed", "random_matrix"))
    return sum(p.numel() for p in model.parameters()) + fixed


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one image of `input_shape` (C, H, W)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False, custom_mapping=FFT_FLOPS)
    with counter:
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2


# ------------------------------------------------------------------------------------------- throughput
def summarize(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


# The CPU features that decide which kernels torch, oneDNN and ONNX Runtime run.
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
# What makes two throughput measurements comparable: the same of each (pipeline.compare): the machine, and the
# precision policy its benchmark record adds (`throughput_precision` reads a record from before the key).
MACHINE_KEYS = ("cpu", "isa", "cpu_capability", "threads", "gpu", "torch", "onednn", "onnxruntime", "precision")
# precision policy -> autocast dtype (None: fp32 kernels); see the module docstring
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def machine_record(device: torch.device) -> dict:
    """The machine a throughput was measured on: CPU model and its kernel-relevant flags, torch's dispatch level,
    threads, GPU, and the versions of the libraries whose kernels ran."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux
        pass
    flags = set((info.get("flags") or info.get("Features") or "").split())
    onednn = re.search(r"(?:oneDNN|MKL-DNN) v([\d.]+)", torch.__config__.show())
    try:
        ort = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        ort = None
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "isa": [f for f in ISA_FLAGS if f in flags], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "onednn": onednn.group(1) if onednn else None, "onnxruntime": ort,
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}"}


def throughput_precision(machine: dict) -> str:
    """The precision policy of a benchmark's machine record. A record written before the policy existed timed
    float32 tensors under torch's defaults: fp32 on the CPU (no TF32 there: the committed CPU reports), cuDNN's TF32
    with fp32 matmuls on a GPU, which is no policy's."""
    return machine.get("precision") or ("fp32" if not machine.get("gpu") else "torch defaults (cuDNN TF32 only)")


def precision_flags(precision: str, device: torch.device) -> dict:
    """What `precision_policy` sets, as a throughput record carries it: the policy, its autocast dtype and the CUDA
    flags (null on the CPU, where no CUDA kernel runs). A ValueError for an unknown policy, or tf32 off CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError(f"precision tf32 on {device.type}: TF32 is a CUDA tensor-core mode, and a {device.type} "
                         f"timing under it would be an fp32 one under another name; use fp32 (or bf16 / fp16)")
    amp, cuda = PRECISIONS[precision], device.type == "cuda"
    return {"policy": precision, "autocast": str(amp).removeprefix("torch.") if amp else None,
            "matmul_tf32": precision == "tf32" if cuda else None, "cudnn_tf32": precision == "tf32" if cuda else None,
            "cudnn_benchmark": True if cuda else None}


@contextmanager
def precision_policy(precision: str, device: torch.device):
    """Run the block under a precision policy (module docstring) and restore torch's flags after; yields
    `precision_flags`."""
    flags = precision_flags(precision, device)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    amp = PRECISIONS[precision]
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.benchmark = True
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            yield flags
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def setting_device(setting: str, key: str) -> torch.device:
    """A profile's device setting (`key`, e.g. evaluate.device) as a torch device: cpu, cuda, or auto (cuda when
    torch sees one); cuda on a machine without one is an error that names the setting."""
    if setting not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"{key} is {setting!r}; one of auto, cpu, cuda")
    if setting == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{key} is cuda, but torch sees no CUDA device on this machine; run this job on a GPU, or "
                         f"set {key}: cpu (or auto) in the profile")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_throughput(models: dict[str, nn.Module], batch: torch.Tensor | list[torch.Tensor],
                       warmup: int = 2, repeats: int = 7, iters: int = 3,
                       progress: bool = True, precision: str = "fp32") -> dict[str, list[float]]:
    """Images/s of each model per round, from one interleaved run under one precision policy (see module
    docstring). `batch` may be a list of batches (e.g. single images): one iteration then runs them all."""
    batches = batch if isinstance(batch, list) else [batch]
    device = batches[0].device
    n_images = sum(len(b) for b in batches)
    names = list(models)
    for model in models.values():
        model.eval()

    def run(name: str, times: int) -> None:
        for _ in range(times):
            for b in batches:
                models[name](b)

    with precision_policy(precision, device):
        for name in tqdm(names, desc="warm-up", disable=not progress, leave=False):
            run(name, warmup)
        _sync(device)
        samples = {name: [] for name in names}
        for r in tqdm(range(repeats), desc="throughput rounds", disable=not progress, leave=False):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                _sync(device)
                start = time.perf_counter()
                run(name, iters)
                _sync(device)
                samples[name].append(iters * n_images / (time.perf_counter() - start))
    return samples


def ratios(samples: dict[str, list[float]], reference: str) -> dict[str, dict]:
    """Per-round images/s ratio of each model to the reference of its own runtime (torch, or ONNX Runtime for the
    `ORT`-suffixed twins); the two timings of a round are adjacent."""
    return {name: summarize([a / b for a, b in zip(s, samples[reference + ORT if name.endswith(ORT) else reference],
                                                   strict=True)])
            for name, s in samples.items()}


def benchmark_models(models: dict[str, nn.Module], input_shape: tuple[int, int, int], batch_size: int,
                     device: torch.device, precision: str = "fp32", warmup: int = 2,
                     repeats: int = 7, iters: int = 3, reference: str | None = None,
                     progress: bool = True, images: torch.Tensor | None = None,
                     onnxruntime: bool | list[str] = False) -> dict:
    """Params, MACs and interleaved throughput of several models, as one JSON-ready record. The batch is
    `images` (real test images: input-dependent models such as AdaViT need them) or random numbers.
    `onnxruntime` (True: every model; or a list of names): those models are also exported to ONNX and timed in
    ONNX Runtime in the same rounds (CPU, fp32), as `name [onnxruntime]`. `precision`: the policy every model
    runs under (module docstring); the batch stays fp32, as are the weights."""
    flags = precision_flags(precision, device)  # an unknown policy or tf32 on the CPU fails before the MACs
    rows = {name: {"params": count_params(m), "macs": count_macs(m, input_shape)} for name, m in models.items()}
    models = {name: m.to(device) for name, m in models.items()}
    if device.type == "cuda":
        models = {name: m.to(memory_format=torch.channels_last) for name, m in models.items()}
    batch = (images[:batch_size].to(device, torch.float32) if images is not None
             else torch.randn(batch_size, *input_shape, device=device))
    with tempfile.TemporaryDirectory() as tmp:
        if onnxruntime:
            if device.type != "cpu" or precision != "fp32":
                raise ValueError("onnxruntime: CPU and precision fp32 only")
            names = list(models) if onnxruntime is True else onnxruntime
            models.update(onnx_pair({n: models[n] for n in names}, batch[:2], Path(tmp), torch.get_num_threads()))
            rows.update({name + ORT: dict(rows[name]) for name in names})
        samples = measure_throughput(models, batch, warmup, repeats, iters, progress, precision)
    for name, s in samples.items():
        rows[name]["throughput"] = summarize(s)
    if reference is not None:
        for name, r in ratios(samples, reference).items():
            rows[name]["ratio_to_reference"] = r
    return {
        "device": str(device), "device_name": device_name(device),
        "machine": {**machine_record(device), "precision": precision}, "precision": flags,
        "batch_size": batch_size, "input_shape": list(input_shape), "threads": torch.get_num_threads(),
        "warmup": warmup, "repeats": repeats, "iters_per_repeat": iters, "reference": reference,
        "torch": torch.__version__, "timm": timm.__version__, "models": rows,
    }


def print_benchmark(result: dict) -> None:
    reference = result["reference"]
    for name, row in result["models"].items():
        t, r = row["throughput"], row.get("ratio_to_reference")
        print(f"{name:28s} params {row['params']:>11,d}  MACs {row['macs'] / 1e9:7.3f} G  "
              f"img/s median {t['median']:9.2f} [{t['min']:.2f}, {t['max']:.2f}]"
              + (f"  x{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}] vs {reference}"
                 + (ORT if name.endswith(ORT) else "") if r else ""))


# ------------------------------------------------------------------------------------------- ONNX Runtime
def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = 17) -> None:
    """The model as ONNX (input `images`, output `logits`, dynamic batch), written atomically. The TorchScript
    exporter (deprecated in torch 2.15, which warns that it will be removed): ~0.3-0.5 s for a nano model against
    ~9 s for the dynamo exporter, 81 models per default study. Both give logits within 1e-7 of torch's here."""
    model.eval()
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # group_norm's "batch of one" check is a Python branch: traced as the constant it is for the example
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's: see the docstring
        torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})


def ort_session(path: str | Path, threads: int):
    import onnxruntime as ort  # deferred: ~0.3 s, and only ONNX checks and twins need it

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # ONNX Runtime's pool threads spin after each call by default: in an interleaved benchmark they would take the
    # CPU from the model timed next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtModel(nn.Module):
    """An ONNX Runtime session behind a torch module's call, so that it is timed like the others."""

    def __init__(self, session):
        super().__init__()
        self.session, self.input = session, session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: images.numpy()})[0])


def onnx_pair(models: dict[str, nn.Module], example: torch.Tensor, folder: Path,
              threads: int) -> dict[str, nn.Module]:
    """Each torch model beside its ONNX Runtime twin (`name [onnxruntime]`), exported into `folder`."""
    out = {}
    for i, (name, model) in enumerate(models.items()):
        path = folder / f"model{i}.onnx"
        export_onnx(model, example, path)
        out[name], out[name + ORT] = model, OrtModel(ort_session(path, threads))
    return out


# ------------------------------------------------------------------------------------------- outputs
@torch.no_grad()
def max_logit_difference(a: nn.Module, b: nn.Module, batches) -> dict:
    """The largest |logit difference| between two models over `batches` of (images, labels)."""
    a.eval()
    b.eval()
    diff, scale, n = 0.0, 0.0, 0
    for images, _ in batches:
        la, lb = a(images), b(images)
        diff = max(diff, (la - lb).abs().max().item())
        scale = max(scale, la.abs().max().item())
        n += len(images)
    return {"max_abs_logit_diff": diff, "max_abs_logit": scale, "num_images": n}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast=nullcontext,
             fmt: torch.memory_format = torch.contiguous_format) -> dict:
    """Top-1 and top-5 (%), mean cross-entropy, each image's predicted class and label (`pred`, `label`), and the
    sums they are made of (`sums`: images x top-1 %, images x top-5 %, cross-entropy, images; what ranks add up under
    torchrun). `fmt`: the batches' memory format (the model's: channels_last is faster on CPU too). The sums stay on
    the device until the end: no wait for it per batch. Each batch's accuracy is timm's (a float32 percentage),
    weighted by its size, as it always was: the same numbers to the last bit."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    preds, targets = [], []
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        images = images.contiguous(memory_format=fmt)
        with autocast():
            logits = model(images)
        logits = logits.float()
        b = len(labels)
        a1, a5 = accuracy(logits, labels, topk=(1, min(5, logits.shape[1])))
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        sums += torch.stack([a1.double() * b, a5.double() * b, loss.double(), sums.new_tensor(b)])
        preds.append(logits.argmax(1))
        targets.append(labels)
    pred = torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.long)  # a rank's slice may be empty
    label = torch.cat(targets).cpu() if targets else torch.zeros(0, dtype=torch.long)
    top1, top5, loss, n = sums.tolist()
    n = n or float("nan")
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "pred": pred, "label": label, "sums": sums}
