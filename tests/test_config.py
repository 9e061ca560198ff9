"""Typed configs: file + dotted overrides, unknown keys listed, types checked, resolved config saved."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from vlm.config import ConfigError, load_config, parse_override, save_config, to_dict
from vlm.errors import UserError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    schedule: Literal["cosine", "constant"] = "cosine"
    part_lr: dict[str, float] = field(default_factory=dict)


@dataclass
class Cfg:
    name: str = "run"
    steps: int = 10
    resume: Optional[str] = None
    langs: list[str] = field(default_factory=lambda: ["en"])
    optim: Optim = field(default_factory=Optim)


def test_defaults_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 20\noptim:\n  lr: 0.01\n  betas: [0.8, 0.9]\n")
    cfg = load_config(Cfg, p, ["optim.lr=1e-4", "langs=[de, zh]", "resume=latest", "optim.part_lr.llm=2e-4"])
    assert cfg.steps == 20 and cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.langs == ["de", "zh"] and cfg.resume == "latest"
    assert cfg.optim.part_lr == {"llm": pytest.approx(2e-4)}


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, p)
    msg = str(e.value)
    assert "optim.lrr" in msg and "lr" in msg and "betas" in msg and "schedule" in msg


def test_unknown_key_in_override_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, ["stepz=3"])
    assert "stepz" in str(e.value) and "steps" in str(e.value) and "optim" in str(e.value)
    assert isinstance(e.value, UserError)


@pytest.mark.parametrize("ov, frag", [("steps=abc", "integer"), ("optim.schedule=linear", "one of"),
                                      ("optim.betas=[1]", "2 items"), ("langs=en", "list")])
def test_type_errors_name_the_key(ov, frag):
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, [ov])
    assert frag in str(e.value)


def test_override_syntax():
    assert parse_override("a.b=1e-4") == (["a", "b"], 1e-4)
    assert parse_override("x=null") == (["x"], None)
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")


def test_save_roundtrip(tmp_path):
    cfg = load_config(Cfg, None, ["optim.lr=0.5", "langs=[hi, ar]"])
    p = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(p.read_text())["optim"]["lr"] == 0.5
    assert load_config(Cfg, p) == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.98]
