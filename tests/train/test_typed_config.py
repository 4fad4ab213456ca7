"""Config errors name the field path, the expected type and the closest known name."""

from dataclasses import dataclass, field

import pytest

from mmfuse.utils.typed_config import build, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    training: Inner = field(default_factory=Inner)
    mode: str | None = None
    flag: bool = False


def test_nested_build_and_round_trip():
    cfg = build(Outer, {"training": {"lr": "2e-4", "steps": 3, "names": ["a"]}, "flag": True})
    assert cfg.training.lr == 2e-4 and cfg.training.steps == 3 and cfg.flag
    assert build(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("data, message", [
    ({"training": {"lrr": 1}}, "training.lrr: unknown field (did you mean 'lr'?)"),
    ({"training": {"steps": 1.5}}, "training.steps: expected an integer"),
    ({"training": {"lr": "fast"}}, "training.lr: expected a number"),
    ({"training": {"names": "a"}}, "training.names: expected a list"),
    ({"flag": "yes"}, "flag: expected true or false"),
    ({"training": 3}, "training: expected a mapping"),
])
def test_errors_name_the_field(data, message):
    with pytest.raises(ValueError) as err:
        build(Outer, data)
    assert message in str(err.value)
