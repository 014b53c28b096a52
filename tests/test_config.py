import json

import pytest

from m2m_ray.config import BuildMISConfig, ConfigError, load_config, parse_overrides, save_config


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


BASE = """
output_uri: /tmp/mis
captions:
  inputs: [a.tsv]
"""


def test_layers_defaults_yaml_overrides(tmp_path):
    cfg = load_config(BuildMISConfig, _write(tmp_path, BASE + "  batch_size: 128\n"),
                      ["--captions.batch_size=4096", "--generate.formats", "[parquet]",
                       "--model.preset=tiny", "--captions.dedup=true"])
    assert cfg.captions.batch_size == 4096          # override beats YAML
    assert cfg.captions.max_tokens == 77            # default
    assert cfg.generate.formats == ["parquet"]
    assert cfg.model.preset == "tiny"
    assert cfg.captions.dedup is True


def test_unknown_key_names_key_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(BuildMISConfig, _write(tmp_path, BASE), ["--captions.batch_sise=4"])
    message = str(err.value)
    assert "unknown key 'captions.batch_sise'" in message
    assert "did you mean 'captions.batch_size'" in message


def test_wrong_type_names_key_value_and_expectation(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(BuildMISConfig, _write(tmp_path, BASE), ["--captions.batch_size=many"])
    message = str(err.value)
    assert "'captions.batch_size' = 'many'" in message
    assert "valid integer" in message


def test_bad_literal_and_missing_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(BuildMISConfig, _write(tmp_path, "captions: {inputs: [a]}\n"),
                    ["--model.preset=huge"])
    message = str(err.value)
    assert "missing required key 'output_uri'" in message
    assert "'model.preset' = 'huge'" in message and "'tiny'" in message


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected --key.subkey=value"):
        parse_overrides(["captions.batch_size=3"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--captions.batch_size"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(BuildMISConfig, _write(tmp_path, BASE), ["--storage.endpoint_url=http://x:1"])
    save_config(cfg, str(tmp_path / "out" / "config.json"))
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["config_class"] == "BuildMISConfig"
    assert BuildMISConfig.model_validate(saved["config"]) == cfg
