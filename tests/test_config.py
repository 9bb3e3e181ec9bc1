"""Command-line overrides: unknown keys suggest real ones, bad values and failed checks name the key."""
import dataclasses
import re

import pytest

from r1jax import config as config_lib
from r1jax import run


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    warmup_steps: int = 0


@dataclasses.dataclass(frozen=True)
class RL:
    group_size: int = 8
    prompts_per_step: int = 4
    optim: Optim = Optim()

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2")


@dataclasses.dataclass(frozen=True)
class Pretrain:
    steps: int = 10
    optim: Optim = Optim()


@dataclasses.dataclass(frozen=True)
class Top:
    seed: int = 0
    rl: RL = RL()
    pretrain: Pretrain = Pretrain()

    def __post_init__(self):
        if self.rl.prompts_per_step > 1000 * self.pretrain.steps:
            raise ValueError("more prompts per step than pretraining steps x 1000")


def _message(assignment: str) -> str:
    with pytest.raises(ValueError) as info:
        config_lib.override(Top(), [assignment])
    return str(info.value)


def test_good_overrides_still_apply():
    cfg = config_lib.override(Top(), ["rl.group_size=16", "pretrain.optim.lr=3e-4", " seed = 7 "])
    assert (cfg.rl.group_size, cfg.pretrain.optim.lr, cfg.seed, cfg.rl.optim.lr) == (16, 3e-4, 7, 1e-3)


def test_unknown_key_suggests_the_close_field_at_its_level():
    message = _message("rl.group_sise=8")
    assert message.startswith("unknown setting 'rl.group_sise' (did you mean rl.group_size?); settings here: ")
    # The match at the failing level comes first, then close keys elsewhere.
    assert _message("rl.optm.lr=1").startswith(
        "unknown setting 'rl.optm.lr' (did you mean one of rl.optim.lr, pretrain.optim.lr?)")


def test_unknown_key_suggests_full_dotted_keys_of_the_whole_config():
    assert _message("group_size=8").startswith("unknown setting 'group_size' (did you mean rl.group_size?)")
    assert _message("optim.lr=1e-4").startswith(
        "unknown setting 'optim.lr' (did you mean one of rl.optim.lr, pretrain.optim.lr?)")
    assert _message("rl.group_sizes=8").startswith("unknown setting 'rl.group_sizes' (did you mean rl.group_size?)")


def test_unknown_key_with_nothing_close_lists_the_settings_only():
    assert _message("zzz=1") == "unknown setting 'zzz'; settings here: seed, rl, pretrain"


def test_wrong_type_names_the_key():
    assert _message("rl.group_size=eight") == "rl.group_size='eight': expected int"
    assert _message("pretrain.optim.lr=fast") == "pretrain.optim.lr='fast': expected float"


def test_post_init_failure_names_the_full_key():
    with pytest.raises(ValueError, match=re.escape("rl.group_size=1: group_size must be >= 2")) as info:
        config_lib.override(Top(), ["rl.group_size=1"])
    assert str(info.value) == "rl.group_size=1: group_size must be >= 2"
    assert str(info.value.__cause__) == "group_size must be >= 2"
    # A check on an outer dataclass that the new value fails names the key that was set.
    assert _message("rl.prompts_per_step=20000") == (
        "rl.prompts_per_step=20000: more prompts per step than pretraining steps x 1000")


def test_real_recipe_config_suggests_the_nested_key():
    from recipes import r1_zero

    with pytest.raises(ValueError, match=r"^unknown setting 'group_size' \(did you mean rl\.group_size\?\)"):
        run.config(r1_zero, None, ["group_size=8"])
