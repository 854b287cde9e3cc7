"""Pytest plugin: run timm's own model test suite (its tests/test_models.py) over the models this project registers.

`make test` runs `pytest -p timm_contract <timm sdist>/tests/test_models.py` (see the Makefile). The plugin imports
`pipeline.models` before timm's test module is collected, so our models are in `timm.list_models()` when its
parametrizations are built; then it keeps only the test items whose `model_name` is one of ours.

timm's own filter lists in that file apply to our models as to timm's. One of them sorts models by kind:
NON_STD_FILTERS, "transformer / hybrid models [that] don't support full set of spatial / feature APIs and/or have
spatial output" (timm's `vit_*`, `deit*`, `poolformer_*`, ...). Those get `test_model_default_cfgs_non_std` instead of
`test_model_default_cfgs` and are left out of `test_model_forward_features`. Our models of that kind, whose final
features are a token sequence with prefix tokens rather than a feature map, are declared in `NON_STD` below and
added to that list; the names timm's patterns already match (`poolformer_nano`, `poolformer_s9`, `poolformer_xs12`,
`deit_nano`) are sorted by timm itself.
"""
import timm
from timm.models import _registry

import pipeline.models  # noqa: F401  (registers the project's models)

OURS = sorted(name for name, fn in _registry._model_entrypoints.items() if fn.__module__.startswith("pipeline."))

# Token-sequence outputs: AdaViT is a DeiT ([CLS; patches]), LightViT carries 8-24 global tokens next to the image
# tokens through to the pooled head. Both give forward_features as [B, N, C] and features_only through timm's
# FeatureGetterNet (tested in tests/test_adavit.py and tests/test_lightvit.py).
NON_STD = ["ada_deit_*", "lightvit_*"]

_list_models = timm.list_models


def _with_ours(filters):
    """timm's NON_STD_FILTERS list (recognised by its first entry) plus ours; any other filter unchanged."""
    filters = [filters] if isinstance(filters, str) else list(filters)
    return filters + NON_STD if "vit_*" in filters else filters


def list_models(filter="", module="", pretrained=False, exclude_filters="", **kwargs):
    return _list_models(_with_ours(filter) if filter else filter, module, pretrained,
                        _with_ours(exclude_filters) if exclude_filters else exclude_filters, **kwargs)


timm.list_models = list_models  # test_models.py does `from timm import list_models` when pytest imports it


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = str(params.get("model_name", "")).split(".")[0]  # some tests list "name.pretrained_tag"
        (keep if name in OURS else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_report_header(config):
    return f"timm model suite over {len(OURS)} project models: {', '.join(OURS)}"


def pytest_terminal_summary(terminalreporter):
    # one line CI logs can grep: how many of timm's test items ran over our models, and how they ended
    counts = {k: len(terminalreporter.stats.get(k, [])) for k in ("passed", "failed", "error", "skipped")}
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    terminalreporter.write_line(f"timm model suite over project models: {summary}")
