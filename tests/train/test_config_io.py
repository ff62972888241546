"""config_io.py: eval sets added on the command line (`--config.eval.target.NAME.FIELD=...`),
type-checked like every other key; `configs/...` paths from any working directory."""
from __future__ import annotations

import os

import pytest

from mllm_tune.train.config_io import (ConfigError, apply_overrides, eval_set, load_config,
                                       validate)
from tests.helpers import ROOT


def test_eval_sets_are_added_field_by_field_on_the_command_line():
  cfg = load_config(os.path.join(ROOT, "configs/experiments/llava_lora.py"))
  assert not len(cfg.eval.target) and not len(cfg.eval.retention)
  apply_overrides(cfg, ["config.eval.target.val.kind=llava_json",
                        "config.eval.target.val.json_path=/data/val.json",
                        "config.eval.target.val.num=50",
                        "config.eval.retention.general.kind=llava_json",
                        "config.eval.retention.general.metric=token"])
  val = cfg.eval.target.val
  assert val.to_dict() == {**eval_set().to_dict(), "kind": "llava_json",
                           "json_path": "/data/val.json", "num": 50}
  assert cfg.eval.retention.general.metric == "token" and cfg.eval.retention.general.num == 0
  validate(cfg)
  with pytest.raises(ConfigError, match=r"'eval.target.val.nmu'.*did you mean \['num'\]"):
    apply_overrides(cfg, ["config.eval.target.val.nmu=3"])
  with pytest.raises(ConfigError, match=r"'eval.target.other.num': cannot set 'many'"):
    apply_overrides(cfg, ["config.eval.target.other.num=many"])
  # `source` names an offline source: a JSON set given its file there is refused up front
  with pytest.raises(ValueError, match=r"eval_set\(kind='llava_json', source='data/val.json'\): "
                     r"`source` names an offline benchmark source .* reads json_path="):
    eval_set("llava_json", "data/val.json")
  apply_overrides(cfg, ["config.eval.target.val.source=data/val.json"])
  with pytest.raises(ConfigError, match=r"'eval.target.val.source'.*is for offline sets; a "
                     r"llava_json set reads eval.target.val.json_path"):
    validate(cfg)
  apply_overrides(cfg, ["config.eval.target.val.source="])
  apply_overrides(cfg, ["config.eval.target.bad.kind=csv"])
  with pytest.raises(ConfigError, match=r"'eval.target.bad.kind' must be offline"):
    validate(cfg)
  # a sequence field takes one value, or several comma-separated, bracketed or not
  for raw, want in (("0.5", (0.5,)), ("0.25,0.5", (0.25, 0.5)), ("[0.25, 1]", (0.25, 1))):
    apply_overrides(cfg, [f"config.posthoc.sweep={raw}"])
    assert cfg.posthoc.sweep == want, raw
  # only sets are made up: other unknown keys stay errors
  with pytest.raises(ConfigError, match=r"unknown config key 'eval.targets.x.kind'"):
    apply_overrides(cfg, ["config.eval.targets.x.kind=offline"])
  with pytest.raises(ConfigError, match=r"unknown config key 'train.new.kind'"):
    apply_overrides(cfg, ["config.train.new.kind=offline"])


def test_shipped_config_paths_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  cfg = load_config("configs/experiments/tiny_lora.py")
  assert cfg.method.name == "lora" and cfg.run_dir == "runs/tiny_lora"
  with pytest.raises(ConfigError, match=r"config file 'configs/experiments/nope.py' does not "
                                        r"exist"):
    load_config("configs/experiments/nope.py")
