"""Config files, key checks and run snapshots (ctxrq_jax/core/config.py)."""

import json
import os
import pathlib
import re

import ml_collections
import pytest

from ctxrq_jax.core import config as configlib


def test_bare_names_load_the_package_configs():
  path = configlib.package_config_path("demo")
  assert path.endswith(os.path.join("ctxrq_jax", "configs", "demo.py")) and os.path.isfile(path)
  for name, arg in (("demo", None), ("demo", "smoke"), ("imagenet", "tiny"), ("rqvae_mnist", "smoke"),
                    ("rqvae_imagenet", None)):
    config = configlib.load_config_file(name, arg)
    assert config.is_locked, name
  assert configlib.load_config_file("demo", "smoke").train.num_steps < configlib.load_config_file("demo").train.num_steps
  with pytest.raises(configlib.ConfigError, match="no config named 'nope' in ctxrq_jax.configs"):
    configlib.load_config_file("nope")
  with pytest.raises(configlib.ConfigError, match="unknown argument 'big' for configs/demo.py"):
    configlib.load_config_file("demo", "big")
  with pytest.raises(configlib.ConfigError, match="does not exist"):
    configlib.load_config_file(os.path.join("nowhere", "x.py"))


def test_check_keys_and_changed_keys():
  ref = ml_collections.ConfigDict({"a": 1, "s": {"b": 2, "c": (1, 2)}})
  configlib.check_keys(ref, ref)
  with pytest.raises(configlib.ConfigError, match=r"unknown config keys: s.d; missing config keys: a, s.b"):
    configlib.check_keys(ml_collections.ConfigDict({"s": {"c": 0, "d": 1}}), ref)
  new = {"a": 3, "s": {"b": 2, "c": [1, 2]}}  # a JSON round trip turns tuples into lists: not a change
  assert configlib.changed_keys(ref, new, ("a", "s.")) == ["a: 1 -> 3"]
  assert configlib.changed_keys(ref, new, ("s.",)) == []
  with pytest.raises(configlib.ConfigError, match="boom"):
    configlib.require(False, "boom")
  configlib.require(True, "never")


def test_snapshot_round_trip_and_errors(tmp_path):
  config = configlib.load_config_file("imagenet", "tiny")
  path = configlib.save_snapshot(config, str(tmp_path / "run"))
  assert path == str(tmp_path / "run" / "config.json")
  assert configlib.load_snapshot(str(tmp_path / "run")).to_dict() == json.loads(config.to_json_best_effort())
  assert not os.path.exists(path + ".tmp")
  # Only the chief writes; the others get the path.
  assert configlib.save_snapshot(config, str(tmp_path / "other"), write=False) == str(tmp_path / "other" /
                                                                                     "config.json")
  assert not (tmp_path / "other").exists()
  with pytest.raises(FileNotFoundError, match="does not exist"):
    configlib.load_snapshot(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="is .* the workdir of a training run"):
    configlib.load_snapshot(str(tmp_path / "empty"))
  (tmp_path / "empty" / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="is unreadable"):
    configlib.load_snapshot(str(tmp_path / "empty"))


def test_absolute_paths_keep_urls_and_empty_values(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = configlib.load_config_file("imagenet", "tiny")
  with config.unlocked():
    config.data.codes_dir = "codes"
    config.data.stage1_dir = "gs://bucket/rqvae"
  out = configlib.absolute_paths(config, "data", ("codes_dir", "stage1_dir"))
  assert out.data.codes_dir == str(tmp_path / "codes") and out.data.stage1_dir == "gs://bucket/rqvae"
  assert config.data.codes_dir == "codes"  # a copy: the caller's config is unchanged
  with config.unlocked():
    config.data.codes_dir = ""
  assert configlib.absolute_paths(config, "data", ("codes_dir",)).data.codes_dir == ""


_ROOT = pathlib.Path(__file__).resolve().parents[3]


def test_every_package_config_has_its_top_level_entry_point():
  # README: "the top-level configs/ files are the user-facing entry points that load them".
  names = sorted(p.stem for p in (_ROOT / "ctxrq_jax" / "configs").glob("*.py") if p.stem not in ("__init__", "common"))
  assert "demo_text" in names
  for name in names:
    top = configlib.load_config_file(str(_ROOT / "configs" / f"{name}.py"))
    assert top == configlib.load_config_file(name), name


def test_every_configs_path_the_docs_name_exists():
  # A `configs/NAME.py` in the docs, a docstring, a flag's help or an error message is a path a user will type.
  sources = [_ROOT / "README.md", _ROOT / "launch" / "README.md", *(_ROOT / "docs").glob("*.md"),
             *(_ROOT / "ctxrq_jax").rglob("*.py"), *(_ROOT / "colab").glob("*.ipynb")]
  named = {m.group(1) for f in sources for m in re.finditer(r"(?<![\w/])configs/(\w+)\.py", f.read_text())}
  assert {"demo", "demo_text", "imagenet"} <= named
  assert sorted(n for n in named if not (_ROOT / "configs" / f"{n}.py").exists()) == []


def test_the_stage2_configs_say_where_they_leave_the_reference_recipe():
  # configs/imagenet.py and cc3m.py copy the reference RQ-Transformer's optimizer, batch and epochs; a reader of the
  # config must see what is ours: hard targets (its yamls: soft targets, temperature 0.5) and the warmup (none there).
  for name in ("imagenet", "cc3m"):
    src = (_ROOT / "ctxrq_jax" / "configs" / f"{name}.py").read_text()
    assert "soft_target_cross_entropy" in src and "temperature 0.5" in src, name
    assert "warmup.epoch: 0" in src, name
  # CC-3M's step count is 100 epochs of the download size its comment states.
  c = configlib.load_config_file("cc3m")
  pairs = c.train.num_steps * c.train.batch_size / 100
  assert f"{pairs / 1e6:.2f}M pairs" in (_ROOT / "ctxrq_jax" / "configs" / "cc3m.py").read_text()


def test_a_resumed_run_names_its_config_changes_and_keeps_the_old_snapshot(tmp_path, caplog):
  config = ml_collections.ConfigDict({"optim": {"learning_rate": 1e-3, "b2": 0.95}, "train": {"num_steps": 8}})
  configlib.save_snapshot(config, str(tmp_path), resumed_step=None, name="stage 2")
  first = (tmp_path / "config.json").read_text()
  with caplog.at_level("WARNING"):
    configlib.save_snapshot(config, str(tmp_path), resumed_step=4, name="stage 2")  # the same config: silent
  assert not caplog.records and sorted(os.listdir(tmp_path)) == ["config.json"]
  changed = ml_collections.ConfigDict({"optim": {"learning_rate": 2e-3, "b2": 0.95}, "train": {"num_steps": 8}})
  with caplog.at_level("WARNING"):
    configlib.save_snapshot(changed, str(tmp_path), resumed_step=4, name="stage 2")
  [record] = caplog.records
  assert "\n" not in record.getMessage()
  assert "stage 2 in" in record.getMessage() and "resumes at step 4" in record.getMessage()
  assert "optim.learning_rate: 0.001 -> 0.002" in record.getMessage() and "b2" not in record.getMessage()
  assert (tmp_path / "config-4.json").read_text() == first
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["learning_rate"] == 2e-3
