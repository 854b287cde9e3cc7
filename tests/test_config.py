"""Every training-config value is checked before any work, with one error listing every problem."""
import re
import shutil

import pytest
import yaml

from pipeline.config import ConfigError, config_from_dict
from pipeline.study import PARAMS, StudyError, load_study, run_config

BAD = {
    "eval_every": (0, "eval_every must be >= 1"),
    "threads": (0, "threads must be >= 1"),
    "data.batch_size": (0, "data.batch_size must be >= 1"),
    "data.eval_batch_size": (-5, "data.eval_batch_size must be >= 1"),
    "optim.epochs": (2.5, "optim.epochs: expected an integer, got 2.5"),
    "optim.lr": (0.0, "optim.lr must be > 0"),
    "optim.label_smoothing": (1.0, "optim.label_smoothing must be in [0, 1)"),
    "optim.warmup_epochs": (4, "optim.warmup_epochs must be in [0, epochs) = [0, 4)"),
    "kd.labels": ("false", "kd.labels: expected true or false, got 'false'"),
    "data.augment": (1, "data.augment: expected true or false, got 1"),
    "data.re_mode": ("noise", "data.re_mode must be const, rand or pixel"),
    "optim.grad_clip": (-1.0, "optim.grad_clip must be > 0 or null"),
}


def base() -> dict:
    return {"name": "t", "data": {"batch_size": 64}, "optim": {"epochs": 4, "warmup_epochs": 1}}


@pytest.mark.parametrize("key", list(BAD))
def test_each_bad_value_is_named(key):
    value, message = BAD[key]
    with pytest.raises(ConfigError) as e:
        config_from_dict(_set(base(), key, value))
    assert message in str(e.value)


def _set(values: dict, key: str, value) -> dict:
    node = values
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return values


def test_one_error_lists_every_problem():
    values = base()
    for key, (value, _) in BAD.items():
        if key not in ("optim.epochs", "optim.warmup_epochs"):  # a type error stops the range checks
            _set(values, key, value)
    _set(values, "optim.epochs", "many")
    with pytest.raises(ConfigError) as e:
        config_from_dict(values)
    assert "optim.epochs: expected a number, got 'many'" in str(e.value)
    assert "kd.labels: expected true or false" in str(e.value) and "data.augment" in str(e.value)
    values = base()
    for key in ("eval_every", "threads", "data.batch_size", "optim.lr", "optim.label_smoothing", "optim.grad_clip"):
        _set(values, key, BAD[key][0])
    with pytest.raises(ConfigError) as e:
        config_from_dict(values)
    assert len(e.value.problems) == 6


@pytest.mark.parametrize("update,message", [
    ({"data": {"mixup": 0.8, "batch_size": 63}}, "need an even data.batch_size"),
    ({"kd": {"type": "none", "teacher": "t.pt"}}, "kd.teacher 't.pt' is set but kd.type is none"),
    ({"mi": {"teacher": "p.pt", "lambda_in": 1.0}}, "module imitation (mi.teacher) is defined on top of logit"),
    ({"kd": {"type": "soft", "teacher": "g.pt"}, "mi": {"teacher": "p.pt"}}, "every mi.lambda_* is 0"),
    ({"kd": {"type": "soft"}}, "kd.type=soft needs kd.teacher"),
])
def test_combinations(update, message):
    values = base()
    for section, entries in update.items():
        values.setdefault(section, {}).update(entries)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(values)


def test_numbers_as_yaml_strings_still_parse():
    cfg = config_from_dict(_set(base(), "optim.lr", "3e-3"))
    assert cfg.optim.lr == 3e-3 and isinstance(cfg.optim.epochs, int)


def test_a_profile_and_a_set_are_checked_before_any_work(tmp_path):
    params = tmp_path / "params"
    shutil.copytree(PARAMS, params)
    smoke = yaml.safe_load((params / "smoke.yaml").read_text())
    smoke["train"]["eval_every"] = 0
    smoke["train"].setdefault("kd", {})["labels"] = "false"
    (params / "smoke.yaml").write_text(yaml.safe_dump(smoke))
    with pytest.raises(StudyError) as e:
        load_study("smoke", check_data=False, params=params)
    text = str(e.value)
    # one line per problem, naming the runs it concerns, not one block per run
    assert text.count("eval_every must be >= 1") == 1 and text.count("kd.labels: expected true or false") == 1
    assert "and " in text and "more)" in text
    with pytest.raises(ConfigError, match="eval_every must be >= 1"):
        run_config("smoke", "pooling-ce", overrides=["eval_every=0"])  # `python -m pipeline train --set`
