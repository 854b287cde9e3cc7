"""The resolved configuration of one training run: plain dataclasses, built from nested dicts.

Every key has a default here; params/ profiles and variants override them. Unknown keys are errors,
so a typo in params fails at once instead of being ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class DataCfg:
    path: str = "results/default/data"   # prepared dataset folder (prepare-data output)
    img_size: int = 32
    batch_size: int = 128
    eval_batch_size: int = 256
    augment: bool = True                 # small data: random 2 px shift + flip; folders: timm's create_transform
    auto_augment: str | None = None      # e.g. rand-m9-mstd0.5-inc1 (image folders only)
    re_prob: float = 0.0                 # random erasing (image folders only)
    mixup: float = 0.0
    cutmix: float = 0.0
    workers: int = 0
    train_limit: int | None = None       # use only the first N training images (one-batch checks)
    test_limit: int | None = None


@dataclass
class OptimCfg:
    """AdamW with warm-up + cosine (timm's optimizer and scheduler factories)."""
    epochs: int = 10
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 1
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    label_smoothing: float = 0.1
    grad_clip: float | None = None


@dataclass
class KDCfg:
    """Logit distillation, DeiT's formulation (riformer.md Sec. 3)."""
    type: str = "none"                   # none | hard | soft
    labels: bool = True                  # False drops the CE term (alpha = 1)
    alpha: float = 0.5                   # weight of the KD term when labels are used (DeiT default)
    tau: float = 1.0                     # soft-KD temperature (DeiT default)
    teacher: str | None = None           # teacher checkpoint (train output), logits only


@dataclass
class MICfg:
    """Module imitation (riformer.md Sec. 3): L'_in, L_out, L_rel with weights and epoch windows."""
    teacher: str | None = None           # same-shape PoolFormer teacher checkpoint
    lambda_in: float = 0.0               # L'_in: block outputs
    lambda_out: float = 0.0              # L_out: token-mixer outputs (each with its "- input" term)
    lambda_rel: float = 0.0              # L_rel: token-relation matrices of the token-mixer outputs
    feat_frac: float = 80 / 120          # L'_in and L_out run for the first feat_frac of the training steps
    rel_frac: float = 20 / 120           # L_rel runs for the first rel_frac of the training steps
    layers: int = 4                      # 4: last block of each stage; 6: every second block
    blocks: list[int] | None = None      # explicit block indices, overriding `layers`
    feature_reduction: str = "sample_sum"  # L'_in, L_out: sum over C,H,W, mean over batch (Table 10 reading)
    rel_reduction: str = "mean"          # L_rel: 1/(N*H^2*W^2), the stated normaliser


@dataclass
class UsageCfg:
    """AdaViT's usage loss (pipeline/losses.py:UsageLoss): targets of the kept fractions and their weights;
    applies only to a model that makes AdaViT decisions."""
    head_target: float = 0.5
    block_target: float = 0.5
    patch_target: float = 0.5
    head_weight: float = 2.0
    block_weight: float = 2.0
    patch_weight: float = 2.0


@dataclass
class TrainConfig:
    name: str = "run"                    # the run: its variant, with a -seed<N> suffix beyond the first seed
    variant: str | None = None           # the study variant (the same for all seeds; None: the name)
    role: str = "student"                # teacher | student
    tables: list[str] = field(default_factory=list)
    model: str = "riformer_nano"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # token_mixer, affine_init, drop_path_rate...
    init: str | None = None              # fine-tune from: a checkpoint / state-dict file (new head if needed)
    partial_init: str | None = None      # PL: copy every key but the affine from this PoolFormer checkpoint
    seed: int = 0
    deterministic: bool = True
    threads: int = 2
    device: str = "auto"                 # auto | cpu | cuda
    amp: bool = True                     # on CUDA only: bf16 autocast and channels_last
    eval_every: int = 1
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    kd: KDCfg = field(default_factory=KDCfg)
    mi: MICfg = field(default_factory=MICfg)
    usage: UsageCfg = field(default_factory=UsageCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        sub = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value, f"{where}.{name}")
        elif name == "betas":
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = _coerce(value, fields[name], f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value, f: dataclasses.Field, where: str):
    """Numbers given as strings (YAML 1.1 reads `3e-3` as a string) become numbers; other strings are errors."""
    numeric = "float" in f.type or f.type.startswith("int")
    if numeric and isinstance(value, str):
        try:
            return float(value) if "float" in f.type else int(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if numeric and isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return value


def config_from_dict(values: dict) -> TrainConfig:
    cfg = _build(TrainConfig, values, "config")
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    errors = []
    if cfg.role not in ("teacher", "student"):
        errors.append(f"role must be teacher or student, got {cfg.role!r}")
    if cfg.optim.epochs < 1:
        errors.append(f"optim.epochs must be >= 1, got {cfg.optim.epochs}")
    if cfg.kd.type not in ("none", "hard", "soft"):
        errors.append(f"kd.type must be none, hard or soft, got {cfg.kd.type!r}")
    if cfg.kd.type != "none" and not cfg.kd.teacher:
        errors.append(f"kd.type={cfg.kd.type} needs kd.teacher (a teacher checkpoint)")
    if cfg.kd.type == "none" and not cfg.kd.labels:
        errors.append("kd.labels=false with kd.type=none leaves no loss on the logits")
    if not 0 <= cfg.kd.alpha <= 1 or cfg.kd.tau <= 0:
        errors.append(f"kd.alpha must be in [0, 1] and kd.tau > 0, got {cfg.kd.alpha}, {cfg.kd.tau}")
    mi_on = any(v > 0 for v in (cfg.mi.lambda_in, cfg.mi.lambda_out, cfg.mi.lambda_rel))
    if mi_on and not cfg.mi.teacher:
        errors.append("module imitation (a lambda > 0) needs mi.teacher (a same-shape PoolFormer checkpoint)")
    if not (0 <= cfg.mi.feat_frac <= 1 and 0 <= cfg.mi.rel_frac <= 1):
        errors.append("mi.feat_frac and mi.rel_frac must be fractions of the run in [0, 1]")
    if cfg.mi.layers not in (4, 6) and cfg.mi.blocks is None:
        errors.append(f"mi.layers must be 4 or 6 (or give mi.blocks), got {cfg.mi.layers}")
    for key in ("feature_reduction", "rel_reduction"):
        if getattr(cfg.mi, key) not in ("mean", "sample_sum"):
            errors.append(f"mi.{key} must be mean or sample_sum")
    u = cfg.usage
    if not all(0 <= t <= 1 for t in (u.head_target, u.block_target, u.patch_target)):
        errors.append("usage targets must be kept fractions in [0, 1]")
    if min(u.head_weight, u.block_weight, u.patch_weight) < 0:
        errors.append("usage weights must be >= 0")
    if cfg.device not in ("auto", "cpu", "cuda"):
        errors.append(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    if errors:
        raise ValueError(f"invalid training config {cfg.name!r}:\n  " + "\n  ".join(errors))


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """`a.b=value` strings (value parsed as YAML) applied to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return values
