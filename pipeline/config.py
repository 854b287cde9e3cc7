"""The resolved configuration of one training run: plain dataclasses, built from nested dicts.

Every key has a default here; params/ profiles and variants override them. Unknown keys, values of the
wrong type and values out of range are errors, all listed in one ConfigError, so a typo in params fails at
once instead of being ignored or failing after an epoch.
"""
from __future__ import annotations

import dataclasses
import types
import typing
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
    re_mode: str = "pixel"               # random erasing fill: DeiT's recipe (timm's default is "const")
    interpolation: str | None = None     # image folders: null = the model's own (pretrained_cfg, e.g. bicubic)
    crop_pct: float | None = None        # image folders, evaluation: null = the model's own (e.g. 0.9)
    mixup: float = 0.0
    cutmix: float = 0.0
    workers: int = 0
    decoded_cache_mb: int = 1024         # image folders: hold a split's decoded pixels in memory up to this size
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
    fused: bool = True                   # torch's fused AdamW kernel (CPU and CUDA): the same update up to float
                                         # rounding, x1.07 per riformer_nano step on one CPU thread (docs/speed.md)
    label_smoothing: float = 0.1
    grad_clip: float | None = None       # max gradient norm (null: none; mmpretrain's RIFormer configs: 5.0)
    affine_weight_decay: bool = True     # the affine token mixer's scale s gets weight decay (timm's and
                                         # mmpretrain's rule: a 4-D conv weight); false exempts it like norms


@dataclass
class KDCfg:
    """Logit distillation, DeiT's formulation (riformer.md Sec. 3)."""
    type: str = "none"                   # none | hard | soft
    labels: bool = True                  # False drops the CE term (alpha = 1)
    alpha: float = 0.5                   # weight of the KD term when labels are used (DeiT default)
    tau: float = 1.0                     # soft-KD temperature (DeiT default)
    teacher: str | None = None           # teacher checkpoint (train output), logits only


MI_WEIGHTS = ("as_printed", "per_batch", "balanced")


@dataclass
class MICfg:
    """Module imitation (riformer.md Sec. 3): L'_in, L_out, L_rel with weights and epoch windows."""
    teacher: str | None = None           # same-shape PoolFormer teacher checkpoint
    lambda_in: float = 0.0               # L'_in: block outputs
    lambda_out: float = 0.0              # L_out: token-mixer outputs (each with its "- input" term)
    lambda_rel: float = 0.0              # L_rel: token-relation matrices of the token-mixer outputs
    feat_frac: float = 80 / 120          # L'_in and L_out run for the first feat_frac of the training steps
    rel_frac: float = 20 / 120           # L_rel runs for the first rel_frac of the training steps
    layers: int = 4                      # 4: one block per stage; 6: every second block
    pick: str = "last"                   # layers 4: the last (or first) block of each stage; 6: from the 2nd (1st)
    blocks: list[int] | None = None      # explicit block indices, overriding `layers`
    feature_reduction: str = "sample_sum"  # L'_in, L_out: sum over C,H,W, mean over batch (Table 10 reading)
    rel_reduction: str = "mean"          # L_rel: 1/(N*H^2*W^2), the stated normaliser
    # how the lambdas apply (Table 10 prints "lambda x batch size"): as_printed; per_batch (each lambda / the
    # global batch size; L_rel's too); balanced (each term's lambda rescaled at the first optimizer step so that
    # its weighted value equals the sum of the other terms there: soft KD, and CE where labels are used)
    weights: str = "as_printed"

    @property
    def enabled(self) -> bool:
        return any(v > 0 for v in (self.lambda_in, self.lambda_out, self.lambda_rel))


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
    amp: bool = True                     # on CUDA only: bf16 autocast
    channels_last: bool = True           # NHWC memory format for the models and their batches, on any device
    eval_every: int = 1
    eval_last: int = 2                   # ...and at each of the last N epochs: the report's last-epoch change in
                                         # test top-1 (is the run still improving?) needs the last two
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    kd: KDCfg = field(default_factory=KDCfg)
    mi: MICfg = field(default_factory=MICfg)
    usage: UsageCfg = field(default_factory=UsageCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """Every problem of one config; `problems` lists them one by one."""

    def __init__(self, name: str, problems: list[str]):
        super().__init__(f"invalid training config {name!r}:\n  " + "\n  ".join(problems))
        self.problems = problems


def _build(cls, values: dict, where: str, errors: list[str]):
    """`cls` from a nested dict, each value checked against its field's type; problems go to `errors`."""
    if not isinstance(values, dict):
        errors.append(f"{where}: expected a mapping, got {type(values).__name__}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(fields)
    if unknown:
        errors.append(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            continue
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, f"{where}.{name}", errors)
            continue
        try:
            kwargs[name] = _check_type(value, hints[name])
        except TypeError as e:
            errors.append(f"{where}.{name}: {e}")
    return cls(**kwargs)


def _check_type(value, tp):
    """`value` as type `tp`. Numbers given as strings (YAML 1.1 reads `3e-3` as a string) become numbers; a
    boolean must be true or false (the string "false" is not); anything else of the wrong type is an error."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    origin = typing.get_origin(tp) or tp
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise TypeError(f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {value!r}")
        if tp is int:
            if value != int(value):
                raise TypeError(f"expected an integer, got {value!r}")
            return int(value)
        return float(value)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise TypeError(f"expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is not Ellipsis and len(value) != len(args):
            raise TypeError(f"expected {len(args)} values, got {value!r}")
        return origin(_check_type(v, args[0]) for v in value)
    if not isinstance(value, origin):
        raise TypeError(f"expected {origin.__name__}, got {value!r}")
    return value


def config_from_dict(values: dict) -> TrainConfig:
    """The run's config, every value checked; one ConfigError lists every problem."""
    errors: list[str] = []
    cfg = _build(TrainConfig, values, "config", errors)
    if not errors:
        errors = problems(cfg)
    if errors:
        raise ConfigError(values.get("name", "run") if isinstance(values, dict) else "run", errors)
    return cfg


def problems(cfg: TrainConfig) -> list[str]:
    """What is wrong with a well-typed config: ranges and combinations."""
    d, o, kd, mi, u = cfg.data, cfg.optim, cfg.kd, cfg.mi, cfg.usage
    rules = [
        (cfg.role in ("teacher", "student"), f"role must be teacher or student, got {cfg.role!r}"),
        (cfg.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {cfg.device!r}"),
        (cfg.threads >= 1, f"threads must be >= 1, got {cfg.threads}"),
        (cfg.eval_every >= 1, f"eval_every must be >= 1 (evaluate every N epochs), got {cfg.eval_every}"),
        (cfg.eval_last >= 1, f"eval_last must be >= 1 (evaluate at each of the last N epochs), got {cfg.eval_last}"),
        (d.img_size >= 1, f"data.img_size must be >= 1, got {d.img_size}"),
        (d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}"),
        (d.eval_batch_size >= 1, f"data.eval_batch_size must be >= 1, got {d.eval_batch_size}"),
        (d.workers >= 0, f"data.workers must be >= 0, got {d.workers}"),
        (d.decoded_cache_mb >= 0, f"data.decoded_cache_mb must be >= 0 (0: no cache), got {d.decoded_cache_mb}"),
        (0 <= d.re_prob <= 1, f"data.re_prob must be a probability in [0, 1], got {d.re_prob}"),
        (d.re_mode in ("const", "rand", "pixel"), f"data.re_mode must be const, rand or pixel, got {d.re_mode!r}"),
        (d.interpolation in (None, "bilinear", "bicubic", "nearest", "random"),
         f"data.interpolation must be bilinear, bicubic, nearest, random or null, got {d.interpolation!r}"),
        (d.crop_pct is None or 0 < d.crop_pct <= 1, f"data.crop_pct must be in (0, 1] or null, got {d.crop_pct}"),
        (d.mixup >= 0 and d.cutmix >= 0, f"data.mixup and data.cutmix must be >= 0, got {d.mixup}, {d.cutmix}"),
        (not (d.mixup > 0 or d.cutmix > 0) or d.batch_size % 2 == 0,
         f"data.mixup / data.cutmix need an even data.batch_size (timm's Mixup pairs images), got {d.batch_size}"),
        (all(n is None or n >= 1 for n in (d.train_limit, d.test_limit)),
         f"data.train_limit and data.test_limit must be >= 1 or null, got {d.train_limit}, {d.test_limit}"),
        (o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}"),
        (o.lr > 0, f"optim.lr must be > 0, got {o.lr}"),
        (o.min_lr >= 0 and o.warmup_lr >= 0, f"optim.min_lr and optim.warmup_lr must be >= 0, got {o.min_lr}, "
                                             f"{o.warmup_lr}"),
        (0 <= o.warmup_epochs < o.epochs,
         f"optim.warmup_epochs must be in [0, epochs) = [0, {o.epochs}), got {o.warmup_epochs}"),
        (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
        (0 <= o.label_smoothing < 1, f"optim.label_smoothing must be in [0, 1), got {o.label_smoothing}"),
        (o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip must be > 0 or null, got {o.grad_clip}"),
        (all(0 <= b < 1 for b in o.betas) and o.eps > 0, "optim.betas must be in [0, 1) and optim.eps > 0"),
        (kd.type in ("none", "hard", "soft"), f"kd.type must be none, hard or soft, got {kd.type!r}"),
        (kd.type == "none" or kd.teacher, f"kd.type={kd.type} needs kd.teacher (a teacher checkpoint)"),
        (kd.type != "none" or not kd.teacher, f"kd.teacher {kd.teacher!r} is set but kd.type is none: it would "
                                              f"be ignored"),
        (kd.type != "none" or kd.labels, "kd.labels=false with kd.type=none leaves no loss on the logits"),
        (0 <= kd.alpha <= 1 and kd.tau > 0, f"kd.alpha must be in [0, 1] and kd.tau > 0, got {kd.alpha}, {kd.tau}"),
        (min(mi.lambda_in, mi.lambda_out, mi.lambda_rel) >= 0, "mi.lambda_* must be >= 0"),
        (not mi.teacher or kd.type != "none",
         "module imitation (mi.teacher) is defined on top of logit distillation (L = L_soft + lambda * L_MI, "
         "riformer.md Sec. 3): set kd.type and kd.teacher"),
        (not mi.teacher or mi.lambda_in + mi.lambda_out + mi.lambda_rel > 0,
         f"mi.teacher {mi.teacher!r} is set but every mi.lambda_* is 0: it would be ignored"),
        (mi.teacher or mi.lambda_in + mi.lambda_out + mi.lambda_rel == 0,
         "module imitation (a lambda > 0) needs mi.teacher (a same-shape PoolFormer checkpoint)"),
        (0 <= mi.feat_frac <= 1 and 0 <= mi.rel_frac <= 1,
         "mi.feat_frac and mi.rel_frac must be fractions of the run in [0, 1]"),
        (mi.layers in (4, 6) or mi.blocks is not None, f"mi.layers must be 4 or 6 (or give mi.blocks), got "
                                                        f"{mi.layers}"),
        (mi.feature_reduction in ("mean", "sample_sum") and mi.rel_reduction in ("mean", "sample_sum"),
         "mi.feature_reduction and mi.rel_reduction must be mean or sample_sum"),
        (mi.pick in ("last", "first"), f"mi.pick must be last or first, got {mi.pick!r}"),
        (mi.pick == "last" or mi.blocks is None, "mi.pick has no effect where mi.blocks names the blocks"),
        (mi.weights in MI_WEIGHTS, f"mi.weights must be one of {', '.join(MI_WEIGHTS)}, got {mi.weights!r}"),
        (all(0 <= t <= 1 for t in (u.head_target, u.block_target, u.patch_target)),
         "usage targets must be kept fractions in [0, 1]"),
        (min(u.head_weight, u.block_weight, u.patch_weight) >= 0, "usage weights must be >= 0"),
    ]
    return [message for ok, message in rules if not ok]


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
