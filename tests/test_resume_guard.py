"""The one resume guard (m2m_ray.config: ``ResumeMismatchError``, ``refuse_resume``,
``setting_changes``) and each of its four users: MIS stage 1, MIS stage 2 settings, task datasets,
training checkpoints. Every refusal is the one error class, and its message names the changed key,
the old and the new value, and the way out (no Ray: the checks run before any work)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from m2m_ray import config as config_module
from m2m_ray.config import (
    ResumeMismatchError,
    config_to_dict,
    load_config,
    refuse_resume,
    setting_changes,
)
from m2m_ray.mis.config import BuildMISConfig
from m2m_ray.mis.resume import check_captions_rerun, check_generate_resume, check_image_settings
from m2m_ray.mis.tasks.build import TaskDatasetConfig, check_config
from m2m_ray.train.checkpoint import resume_changes
from m2m_ray.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _refusal(call) -> str:
    """The message of the refusal ``call()`` raises; it must be the one class, exactly."""
    with pytest.raises(ResumeMismatchError) as info:
        call()
    assert type(info.value) is config_module.ResumeMismatchError
    assert isinstance(info.value, ValueError)  # callers that catch ValueError still do
    return str(info.value)


def test_the_helper_lists_changes_and_refuses_only_when_there_are_some():
    assert setting_changes({"a": 1, "b": [1], "c": 3}, {"a": 2, "b": [1], "d": 4}) == [
        "a: 1 → 2", "c: 3 → None", "d: None → 4"]
    assert setting_changes({"a": 1, "b": 2}, {"a": 1, "b": 3}, ["a"]) == []
    assert setting_changes({"x": "p"}, {"x": "q"}, prefix="s.") == ["s.x: 'p' → 'q'"]
    refuse_resume("nothing changed", [], "never said")
    message = _refusal(lambda: refuse_resume("out holds other", ["a: 1 → 2"], "Remove out/."))
    assert message == "out holds other (a: 1 → 2). Remove out/."


def _mis_config(tmp_path: Path) -> BuildMISConfig:
    return load_config(BuildMISConfig, ROOT / "configs/tiny/build_mis.yaml",
                       [f"--output_uri={tmp_path / 'mis_out'}"])


def _definition(cfg: BuildMISConfig) -> dict:
    return {"inputs": [{"uri": "in.tsv", "size": 10, "modified": "1"}],
            "settings": {"lines_per_shard": cfg.captions.lines_per_shard,
                         "max_tokens": cfg.captions.max_tokens, "dedup": cfg.captions.dedup,
                         "test_fraction": cfg.captions.test_fraction},
            "model": config_to_dict(cfg.model)}


def test_mis_stage1_refusal_names_key_old_new_and_the_way_out(tmp_path):
    cfg = _mis_config(tmp_path)
    old = _definition(cfg)
    new = json.loads(json.dumps(old))
    new["settings"]["lines_per_shard"] = old["settings"]["lines_per_shard"] + 1
    assert check_captions_rerun(cfg, {"definition": old}, old, committed_shards=2)
    message = _refusal(lambda: check_captions_rerun(cfg, {"definition": old}, new, 2))
    lines = old["settings"]["lines_per_shard"]
    assert f"captions.lines_per_shard: {lines} → {lines + 1}" in message
    assert f"remove {cfg.output_uri}/mis" in message and "new output_uri" in message


def test_mis_stage2_refusals_name_key_old_new_and_the_way_out(tmp_path):
    cfg = _mis_config(tmp_path)
    saved = config_to_dict(cfg)
    check_image_settings(cfg, None)  # a new dataset
    check_image_settings(cfg, saved)  # the same settings
    other = json.loads(json.dumps(saved))
    other["generate"]["guidance_scale"] = 3.0
    message = _refusal(lambda: check_image_settings(cfg, other))
    assert f"generate.guidance_scale: 3.0 → {cfg.generate.guidance_scale!r}" in message
    assert f"remove {cfg.output_uri}/mis" in message and "new output_uri" in message
    other = json.loads(json.dumps(saved))
    other["model"]["preset"] = "another"
    message = _refusal(lambda: check_image_settings(cfg, other))
    assert f"model.preset: 'another' → {cfg.model.preset!r}" in message

    stats = {"definition": _definition(cfg), "captions_digest": "d1"}
    stats["definition"]["settings"]["max_tokens"] = cfg.captions.max_tokens - 1
    message = _refusal(lambda: check_generate_resume(cfg, stats, {}))
    assert (f"captions.max_tokens: stage 1 ran with {cfg.captions.max_tokens - 1} → this config "
            f"has {cfg.captions.max_tokens}") in message
    assert "new output_uri" in message
    stats["definition"]["settings"]["max_tokens"] = cfg.captions.max_tokens
    message = _refusal(lambda: check_generate_resume(cfg, stats, {0: {"captions_digest": "d0"}}))
    assert "captions_digest: 'd0' → 'd1'" in message and f"remove {cfg.output_uri}/mis" in message


def test_task_dataset_refusal_names_key_old_new_and_the_way_out(tmp_path):
    cfg = load_config(TaskDatasetConfig, ROOT / "configs/shapes/views_data.yaml",
                      [f"--source={tmp_path / 'raw'}", f"--output_uri={tmp_path / 'tasks'}",
                       "--units_per_shard=4"])
    check_config(cfg)  # writes the config beside the new dataset
    check_config(cfg.model_copy(update={"max_shard_attempts": 5}))  # how it runs may change
    message = _refusal(lambda: check_config(cfg.model_copy(update={"units_per_shard": 8})))
    assert "units_per_shard: 4 → 8" in message
    assert "new output_uri" in message and str(tmp_path / "tasks" / "mis") in message


def test_training_refusal_names_key_old_new_and_the_way_out(tmp_path):
    base = load_config(TrainConfig, ROOT / "configs/tiny/train.yaml",
                       [f"--storage_path={tmp_path / 'runs'}", "--run_name=r"])
    saved = config_to_dict(base)
    assert resume_changes(saved, base) == []
    changed = base.model_copy(update={"seed": base.seed + 1})
    message = _refusal(lambda: resume_changes(saved, changed))
    assert f"seed: {base.seed} → {base.seed + 1}" in message
    assert "another --run_name" in message
    assert re.search(re.escape(str(tmp_path / "runs" / "r")) + r"\b", message)
