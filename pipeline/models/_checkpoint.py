"""The one check every family's checkpoint filter ends with: the mapped state dict fits the model exactly."""
from __future__ import annotations

import torch.nn as nn


def check_fits(state_dict: dict, model: nn.Module, what: str, hint: str = "") -> None:
    """Raise a ValueError naming the keys that map to nothing, the model keys the checkpoint lacks and the shape
    mismatches. The classifier (dropped by timm's loader when the class counts differ) and the first conv's
    input channels (adapted by it to `in_chans`) are left to timm's loader."""
    cfg = getattr(model, "pretrained_cfg", {})
    classifier, first_conv = cfg.get("classifier", "head") + ".", cfg.get("first_conv", "") + ".weight"
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(k for k in set(own) - set(state_dict) if not k.startswith(classifier))
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(state_dict) & set(own)
                    if state_dict[k].shape != own[k].shape and not k.startswith(classifier) and k != first_conv)
    if unexpected or missing or shapes:
        raise ValueError(f"{cfg.get('architecture', type(model).__name__)}: checkpoint does not fit ({what})"
                         + _listing("keys that map to nothing", unexpected)
                         + _listing("model keys the checkpoint lacks", missing)
                         + _listing("shape mismatches", shapes) + (f"\n  {hint}" if hint else ""))


def _listing(what: str, keys: list[str], show: int = 8) -> str:
    if not keys:
        return ""
    more = f" ... and {len(keys) - show} more" if len(keys) > show else ""
    return f"\n  {what} ({len(keys)}): {', '.join(keys[:show])}{more}"
