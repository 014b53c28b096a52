import json

import pytest

from m2m_ray.config import ConfigError, load_config, parse_overrides
from m2m_ray.mis.config import BuildMISConfig
from m2m_ray.storage import save_config


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


def test_renamed_keys_name_their_new_place(tmp_path):
    """Keys moved by the re-layering (flat pool keys → `actors`, the evaluation protocol, the
    preview's sampling spec) are refused with the key they became, not as unknown keys."""
    from m2m_ray.eval.config import EvalConfig
    from m2m_ray.train.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        load_config(BuildMISConfig, _write(tmp_path, BASE + "  num_cpus: 2\n"),
                    ["--generate.num_gpus=0", "--generate.max_actors=4"])
    message = str(err.value)
    assert "'captions.num_cpus'" in message and "it is 'captions.actors.num_cpus' now" in message
    assert "it is 'generate.actors.num_gpus' now" in message
    assert "it is 'generate.actors.max_actors' now" in message
    with pytest.raises(ConfigError) as err:
        load_config(EvalConfig, None, ["--expected_split=null", "--context_images=2",
                                       "--generate.output_uri=/g", "--generate.num_gpus=0"])
    message = str(err.value)
    assert "it is 'protocol.split' now" in message and "'protocol.context_images'" in message
    assert "it is 'generate.actors.num_gpus' now" in message  # through the optional section
    train = "run_name: r\nstorage_path: /s\nmax_steps: 1\ndata: {uri: /m, read_num_cpus: 1}\n"
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, _write(tmp_path, train), ["--samples.new_images=3"])
    message = str(err.value)
    assert "it is 'data.read.num_cpus' now" in message
    assert "it is 'samples.sample.num_images' now" in message


def test_each_stage_keeps_its_own_pool_defaults(tmp_path):
    """One ActorPoolConfig shape, per-stage defaults: setting one key of a pool keeps the stage's
    other defaults (a caption pool stays a CPU pool, a generation pool a GPU pool)."""
    from m2m_ray.sampling.config import GenerateJobConfig
    from m2m_ray.train.config import TrainConfig

    cfg = load_config(BuildMISConfig, _write(tmp_path, BASE),
                      ["--captions.actors.num_cpus=2", "--generate.actors.max_actors=8"])
    assert (cfg.captions.actors.num_gpus, cfg.captions.actors.num_cpus,
            cfg.captions.actors.max_actors) == (0, 2, None)
    assert (cfg.generate.actors.num_gpus, cfg.generate.actors.max_actors) == (1, 8)
    assert load_config(BuildMISConfig, _write(tmp_path, BASE)).generate.actors.num_gpus == 1
    job = GenerateJobConfig.model_validate({"output_uri": "/g", "inputs": {"mis_uri": "/m"},
                                            "actors": {"max_actors": 3}})
    assert (job.actors.num_gpus, job.actors.max_actors) == (1, 3)
    train = TrainConfig.model_validate({"run_name": "r", "storage_path": "/s", "max_steps": 1,
                                        "data": {"uri": "/m", "read": {"num_cpus": 0.5}},
                                        "samples": {"sample": {"guidance_scale": 2.0}}})
    assert (train.data.read.num_gpus, train.data.read.max_actors) == (0, None)
    assert train.data.vae_actors.num_gpus == 1
    assert (train.samples.sample.num_images, train.samples.sample.guidance_scale) == (2, 2.0)
    with pytest.raises(ConfigError, match="min_actors"):
        load_config(BuildMISConfig, _write(tmp_path, BASE),
                    ["--generate.actors.min_actors=3", "--generate.actors.max_actors=2"])
