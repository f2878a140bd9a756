from typing import Literal

import pytest
from pydantic import Field

from cluster.config import BaseConfig, ConfigError, format_help, load_config, parse_args, save_config


class Inner(BaseConfig):
    r: int = Field(8, description="rank")
    targets: list[str] = Field(default_factory=lambda: ["q_proj"], description="modules")


class Cfg(BaseConfig):
    method: Literal["full", "lora"] = Field("lora", description="how to train")
    stride: int = Field(512, description="step")
    lr: float = Field(1e-4, description="learning rate")
    lora: Inner = Field(default_factory=Inner)


def test_overrides_are_typed_and_nested():
    cfg = load_config(Cfg, overrides=["stride=128", "lora.r=4", "lora.targets=[q_proj,v_proj]", "lr=3e-4"])
    assert cfg.stride == 128 and cfg.lora.r == 4 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.lr == pytest.approx(3e-4)


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: full\nlora:\n  r: 16\n")
    cfg = parse_args(Cfg, ["--config", str(f), "lora.r=2"], prog="x", description="d")
    assert cfg.method == "full" and cfg.lora.r == 2


@pytest.mark.parametrize("override, fragment", [
    (["strid=3"], "unknown config key 'strid' (did you mean stride?)"),
    (["lora.rank=3"], "unknown config key 'lora.rank'"),
    (["stride=abc"], "bad value for 'stride'"),
    (["method=foo"], "must be one of 'full' or 'lora'"),
    (["stride"], "expected key=value"),
    (["stride.x=1"], "is a value, not a section"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, overrides=override)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora:\n  alpha: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'lora.alpha'"):
        load_config(Cfg, str(f))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, "/nonexistent/c.yaml")


def test_help_lists_every_key_with_default():
    text = format_help(Cfg, "jobs.x", "Does x.")
    for key, default in [("method", "lora"), ("stride", "512"), ("lora.r", "8"), ("lora.targets", "[q_proj]")]:
        line = next(l for l in text.splitlines() if l.strip().startswith(key + " "))
        assert f"default: {default}" in line


def test_save_config_roundtrips(tmp_path):
    cfg = load_config(Cfg, overrides=["lora.r=3"])
    path = save_config(cfg, tmp_path)
    assert load_config(Cfg, str(path)) == cfg
