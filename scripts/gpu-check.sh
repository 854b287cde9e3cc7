#!/usr/bin/env bash
# What only a GPU can measure of the GPU path (docs/gpu.md), in about 10 minutes on one H100/H200:
#  (a) RIFormer-S12 with soft distillation from GFNet-H-B and module imitation of PoolFormer-S12 at 224 under bf16
#      autocast, 2 epochs of 150 steps (the second timed): training images/s and peak memory, with deterministic
#      kernels on and off and channels_last on and off;
#  (b) the training loader alone (uint8 against float32 hand-over, batches delivered on the GPU) on a synthetic
#      ImageNet-shaped folder of 400 px JPEGs, beside (a): is the loader the limit?
#  (c) PoolFormer-S12, deploy RIFormer-S12, DeiT-S and GFNet-H-B in one interleaved benchmark under each precision
#      policy (fp32, tf32, bf16), to set beside the paper's A100 figures (T6, T8);
#  (d) the gpu profile for the seconds given (when the Fashion-MNIST IDX files are on the machine).
# Every figure lands as JSON under OUT; summary.md is rewritten at the end, also after a failed or timed-out part.
# PARTS chooses the parts and their order (default "b a c d"; a and d read the folder b makes): a device call of at
# most 10 minutes can run "b a", then "c d" on the same OUT. GPU_CHECK_TINY=1 runs every part on the CPU at toy sizes
# (a couple of minutes): the check that the script works before a GPU's minutes are spent on it.
#
#   . .venv/bin/activate; scripts/gpu-check.sh OUT [SECONDS_FOR_D]     (the jobs of (d) run `python`: the venv's)
set -euo pipefail
OUT=${1:?usage: scripts/gpu-check.sh OUT [SECONDS_FOR_D]}
D_SECONDS=${2:-120}
PY=${PYTHON:-python}
PARTS=${PARTS:-b a c d}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db" PYTHONUNBUFFERED=1

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  DEVICE=cpu IMG=64 BATCH=4 STEPS=3 IMAGES=400 SIZE=64 CLASSES=10 WORKERS=2 BENCH_BATCH=2 ROUNDS="1 2 1"
  PRECISIONS="fp32 bf16"
else  # 400 px JPEGs: about ImageNet's pixels per image, so that decoding costs what it does there
  DEVICE=cuda IMG=224 BATCH=128 STEPS=150 IMAGES=20000 SIZE=400 CLASSES=100 WORKERS=14 BENCH_BATCH=256
  ROUNDS="3 5 10" PRECISIONS="fp32 tf32 bf16"
fi
DATA="$OUT/imagefolder-prepared"   # prepared by bench-data (part b)
step() { echo "== $(date +%T) $*"; }

part_b() {
  step "(b) synthetic folder and the loader alone"
  $PY -m pipeline bench-data --root "$OUT/imagefolder" --images "$IMAGES" --classes "$CLASSES" --size "$SIZE" --modes \
    --loader-images $((BATCH * 20)) --loader-workers "$WORKERS" --loader-batch-size "$BATCH" \
    --loader-img-size "$IMG" --loader-device "$DEVICE" --repeats 3 --out "$OUT/loader.json"
}

config() {  # config NAME MODEL STEPS [YAML LINE ...]: a training config at the check's sizes
  local name=$1 model=$2 steps=$3
  shift 3
  {
    echo "name: $name"
    echo "model: $model"
    echo "device: $DEVICE"
    echo "threads: 8"
    echo "data: {path: '$DATA', img_size: $IMG, batch_size: $BATCH, eval_batch_size: $BATCH, workers: $WORKERS,"
    echo "       train_limit: $((BATCH * steps)), test_limit: $BATCH, auto_augment: rand-m9-mstd0.5-inc1, re_prob: 0.25}"
    echo "optim: {epochs: 2, warmup_epochs: 0, lr: 5.0e-4}   # the second epoch is timed: no start-up in it"
    printf '%s\n' "$@"
  } > "$OUT/$name.yaml"
}
train() { $PY -m pipeline train --config "$OUT/$1.yaml" --out "$OUT/runs/$1" --no-progress --experiment gpu-check; }

part_a() {
  step "(a) teachers: one step each, for their checkpoints"
  config gfnet gfnet_h_b 1
  config poolformer poolformer_s12 1
  train gfnet
  train poolformer
  for det in true false; do
    for cl in true false; do
      name="s12-kd-mi-det-$det-cl-$cl"
      step "(a) $name: 2 epochs of $STEPS steps"
      config "$name" riformer_s12 "$STEPS" "deterministic: $det" "channels_last: $cl" \
        "model_kwargs: {affine_init: trunc_normal, drop_path_rate: 0.1}" \
        "kd: {type: soft, teacher: '$OUT/runs/gfnet/model.pt'}" \
        "mi: {teacher: '$OUT/runs/poolformer/model.pt', lambda_in: 1.0e-4, lambda_out: 1.0e-3, lambda_rel: 1.0}"
      train "$name"
    done
  done
}

part_c() {
  local warmup repeats iters p
  read -r warmup repeats iters <<< "$ROUNDS"
  for p in $PRECISIONS; do
    step "(c) benchmark under $p"   # at 224 (DeiT-S's patch grid is fixed), the paper's shape
    $PY -m pipeline benchmark --models poolformer_s12 riformer_s12:deploy deit_small_patch16_224 gfnet_h_b \
      --img-size 224 --batch-size "$BENCH_BATCH" --warmup "$warmup" --repeats "$repeats" --iters "$iters" \
      --device "$DEVICE" --precision "$p" --out "$OUT/benchmark-$p.json"
  done
}

part_d() {
  if ! ls /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte* > /dev/null 2>&1; then
    step "(d) skipped: no Fashion-MNIST IDX files in /usr/share/datasets/fashion-mnist"
    return
  fi
  step "(d) the gpu profile for $D_SECONDS s"
  timeout "$D_SECONDS" $PY -m snakemake --cores all --config profile=gpu > "$OUT/gpu-profile.log" 2>&1 || true
  { find results/gpu/runs -name metrics.json 2>/dev/null || true; } | wc -l > "$OUT/gpu-profile-runs-done.txt"
}

summary() {
  step "summary"
  $PY - "$OUT" <<'PYTHON' || true
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
lines = ["# GPU check", ""]
if (out / "loader.json").exists():
    loader = json.loads((out / "loader.json").read_text())["loader"]
    lines += [f"(b) loader alone, {loader['workers']} workers, {loader['img_size']} px, batch {loader['batch_size']}, "
              f"on {loader['device']}: " + ", ".join(f"{k} {v['images_per_s']['median']:.0f} images/s"
                                                     for k, v in loader["rows"].items()), ""]
runs = sorted(p for p in (out / "runs").glob("s12-*") if (p / "history.json").exists())
if runs:
    lines += ["| (a) run | train images/s, epoch 2 | peak GiB |", "|---|---|---|"]
    for run in runs:
        last = json.loads((run / "history.json").read_text())[-1]
        lines.append(f"| {run.name} | {last['train/images_per_s']:.0f} | {last.get('cuda_peak_memory_gb', float('nan')):.1f} |")
    lines.append("")
benchmarks = {p.stem.removeprefix("benchmark-"): json.loads(p.read_text()) for p in sorted(out.glob("benchmark-*.json"))}
if benchmarks:
    lines += ["| (c) images/s | " + " | ".join(benchmarks) + " |", "|---|" + "---|" * len(benchmarks)]
    for name in next(iter(benchmarks.values()))["models"]:
        lines.append(f"| {name} | " + " | ".join(f"{b['models'][name]['throughput']['median']:.0f}"
                                                 for b in benchmarks.values()) + " |")
    lines.append("")
done = out / "gpu-profile-runs-done.txt"
if done.exists():
    lines.append(f"(d) gpu profile: {done.read_text().strip()} runs finished in the time given (gpu-profile.log)")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYTHON
}
trap summary EXIT

for part in $PARTS; do
  "part_$part"
done
