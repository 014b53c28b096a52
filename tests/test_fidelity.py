"""The fidelity tools on the shapes world (``m2m_ray.fidelity``): method fidelity on stand-in models
whose answer is known (one that copies its context: agreement 1; one that ignores it: agreement at
the base rate), and every tool's config: the YAMLs keep the recipe, overrides are honoured, unknown
keys refused, and the resolved config is saved beside the report."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2m_ray.config import ConfigError, load_config
from m2m_ray.fidelity.config import MethodFidelityConfig, MISReportConfig, TaskFidelityConfig
from m2m_ray.fidelity.method import (
    context_attributes,
    measure_fidelity,
    render_fidelity_markdown,
    renderer_context_sets,
    write_fidelity_report,
)
from m2m_ray.sampling.config import SampleConfig
from m2m_ray.shapes import world
from m2m_ray.shapes.readout import AttributeReadout

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "shapes"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _renders(keys, seed=0):
    rng = np.random.default_rng(seed)
    return [world.render(world.sample_attributes(rng, shape=s, colour=c, background=b))
            for s, c, b in keys]


def test_context_attribute_is_the_majority_then_the_earliest():
    readout = AttributeReadout.load()
    keys = [("circle", "red", "plain"), ("square", "blue", "dots"), ("square", "blue", "dots"),
            ("cross", "green", "stripes")]
    images = np.stack(_renders(keys))
    majority = context_attributes(readout, images[None, :3])[0]
    assert majority == {"shape": "square", "colour": "blue", "background": "dots"}
    tie = context_attributes(readout, images[None, [0, 3]])[0]
    assert tie == {"shape": "circle", "colour": "red", "background": "plain"}


class _StandIn:
    """``M2MPipeline.generate``'s interface: ``copy`` repeats the last context image; with no
    context (or ``copy=False``) it renders random attributes."""

    def __init__(self, copy: bool):
        self.copy, self.rng = copy, np.random.default_rng(3)

    def generate(self, image_sets, spec, generators, output_type="pt"):
        out = []
        for images in image_sets:
            if self.copy and images:
                frames = [np.asarray(images[-1])] * spec.num_images
            else:
                frames = [world.render(world.sample_attributes(self.rng))
                          for _ in range(spec.num_images)]
            out.append(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255)
        return torch.stack(out)


def test_agreement_by_value_says_which_value_misses_and_what_it_becomes():
    from m2m_ray.fidelity.method import _value_cell
    from m2m_ray.fidelity.scoring import agreement_by_value

    targets = [{"shape": "circle", "colour": "red", "background": "plain"},
               {"shape": "square", "colour": "red", "background": "plain"},
               {"shape": "circle", "colour": "blue", "background": "dots"}]
    predicted = {"shape": ["circle", "circle", "circle", "square", "circle", "circle"],
                 "colour": ["red"] * 4 + ["blue"] * 2, "background": ["plain"] * 6}
    split = agreement_by_value(predicted, targets, per=2)
    assert split["shape"] == {"circle": {"sets": 2, "generated": {"circle": 1.0}},
                              "square": {"sets": 1, "generated": {"circle": 0.5, "square": 0.5}}}
    assert split["colour"]["red"] == {"sets": 2, "generated": {"red": 1.0}}
    assert split["background"]["dots"] == {"sets": 1, "generated": {"plain": 1.0}}
    assert _value_cell("square", split["shape"]["square"]) == "square 0.50 (1; circle 0.50)"
    assert _value_cell("dots", split["background"]["dots"]) == "dots 0.00 (1; plain 1.00)"


def test_fidelity_of_a_copier_is_one_and_of_an_ignorer_the_base_rate(tmp_path):
    keys = [("circle", "red", "stripes"), ("square", "blue", "plain"),
            ("triangle", "green", "dots"), ("cross", "yellow", "stripes")]
    sets = renderer_context_sets(keys, sets_per_key=3, per_set=2, seed=1)
    sets.reference = sets.images  # the "teacher" reproduces the context exactly
    spec = SampleConfig(num_images=3)
    copier = measure_fidelity(_StandIn(copy=True), sets, [1, 2], spec)
    for row in copier["rows"]:
        assert row["m2m"] == {"shape": 1.0, "colour": 1.0, "background": 1.0}
        assert row["teacher"]["colour"] == 1.0
        assert all(len(k) == 3 for k in row["m2m_per_k"][:1])
        assert row["m2m_by_value"]["shape"] == {s: {"sets": 3, "generated": {s: 1.0}} for s in
                                                ("circle", "cross", "square", "triangle")}
        assert row["context_dropped"]["colour"] < 0.7
    ignorer = measure_fidelity(_StandIn(copy=False), sets, [2], spec)["rows"][0]
    for name in ("shape", "colour", "background"):
        assert abs(ignorer["m2m"][name] - ignorer["base_rate"][name]) < 0.35
    with pytest.raises(ValueError, match="context images"):
        measure_fidelity(_StandIn(copy=True), sets, [3], spec)
    results = {"model": "stand-in", "variant": "self", "sources": [copier]}
    assert "| renderer (12 sets) | 2 | **1.000**" in render_fidelity_markdown(results)
    assert "| renderer | 2 | circle 1.00 (3), cross 1.00 (3)" in render_fidelity_markdown(results)
    cfg = MethodFidelityConfig(model_path="stand-in", mis_uri="unused",
                               out=str(tmp_path / "f.json"))
    paths = write_fidelity_report(results, cfg)
    assert Image.open(paths["sheet"]).size[0] > 0 and "examples" not in open(paths["json"]).read()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "f.json", "f.md", "f.png", "f_config.json", "f_sheet.png"]
    saved = json.loads((tmp_path / "f_config.json").read_text())
    assert saved == {"config_class": "MethodFidelityConfig", "config": cfg.model_dump(mode="json")}


# --- configs -------------------------------------------------------------------------------------


def test_yamls_hold_the_recipe_the_tools_had():
    """The argparse defaults of the former ``python -m m2m_ray.eval.fidelity`` and
    ``benchmarks/task_fidelity.py``, now in configs/shapes/."""
    method = load_config(MethodFidelityConfig, CONFIGS / "fidelity.yaml")
    assert (method.ks, method.mis_sets, method.renderer_sets, method.drift,
            method.teacher_images, method.threads) == ([1, 2, 4], 32, 1, 10, 4, 2)
    recipe = {"num_inference_steps": 20, "scheduler": "euler", "guidance_scale": 3.0, "seed": 0}
    assert method.sample.model_dump(include={*recipe, "num_images", "context_window"}) == {
        **recipe, "num_images": 4, "context_window": 4 + 10}  # max(ks) + max(M, drift)
    assert method.out == "outputs/shapes/fidelity/fidelity.json"
    for task in ("views", "procedures"):
        cfg = load_config(TaskFidelityConfig, CONFIGS / f"task_fidelity_{task}.yaml")
        assert (cfg.task, cfg.sets, cfg.context_images, cfg.threads) == (task, 48, 2, 2)
        assert cfg.sample.model_dump(include={*recipe, "num_images", "task_guidance_scale"}) == {
            **recipe, "num_images": 2, "task_guidance_scale": 3.0}
        assert cfg.model_path == f"outputs/shapes/{task}/model"
    report = load_config(MISReportConfig, CONFIGS / "mis_report.yaml")
    assert (report.mis_uri, report.format, report.max_sets, report.seed) == (
        "outputs/shapes/mis", "parquet", None, 0)


def test_overrides_are_honoured_and_unknown_or_old_keys_refused():
    yaml = CONFIGS / "fidelity.yaml"
    cfg = load_config(MethodFidelityConfig, yaml, ["--sample.num_inference_steps=3", "--drift=0",
                                                    "--ks=[1, 3]"])
    assert cfg.sample.num_inference_steps == 3 and cfg.sample.context_window == 3 + 4
    given = load_config(MethodFidelityConfig, yaml, ["--sample.context_window=2"])
    assert given.sample.context_window == 2  # a window that is given is kept
    with pytest.raises(ConfigError, match="did you mean 'sample.num_inference_steps'"):
        load_config(MethodFidelityConfig, yaml, ["--sample.num_inference_step=3"])
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_config(TaskFidelityConfig, CONFIGS / "task_fidelity_views.yaml", ["--bogus=1"])
    # the old command-line flags name the key that holds the setting now
    with pytest.raises(ConfigError, match="'steps' .* renamed: it is 'sample.num_inference_steps'"):
        load_config(MethodFidelityConfig, yaml, ["--steps=3"])
    with pytest.raises(ConfigError, match="'model' .* renamed: it is 'model_path'"):
        load_config(TaskFidelityConfig, CONFIGS / "task_fidelity_views.yaml", ["--model=m"])
    with pytest.raises(ConfigError, match="out must be the report's .json path"):
        load_config(MISReportConfig, CONFIGS / "mis_report.yaml", ["--out=outputs/report"])
    with pytest.raises(ConfigError, match="every K must be ≥ 1"):
        load_config(MethodFidelityConfig, yaml, ["--ks=[0, 2]"])


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_sets(root: Path, sets) -> None:
    """``(split, caption, url, images, task)`` sets as one committed parquet shard."""
    from m2m_ray.formats.mis import MISLayout, SetRecord, ShardWriter

    writer = ShardWriter(MISLayout(str(root)), 0, ["parquet"])
    writer.add([SetRecord(caption_id=i + 1, shard_id=0, split=split, caption=caption, url=url,
                          seeds=list(range(len(images))), images=[_png(a) for a in images],
                          image_ext="png", latents=None, metadata={"image_format": "png"},
                          task=task) for i, (split, caption, url, images, task) in enumerate(sets)])
    writer.commit({})


def test_mis_report_saves_its_resolved_config_beside_the_report(tmp_path):
    from m2m_ray.fidelity import mis_report

    rng = np.random.default_rng(0)
    keys = [("circle", "red", "stripes"), ("square", "blue", "plain")]
    sets = []
    for shape, colour, background in keys:
        drawn = [world.sample_attributes(rng, shape=shape, colour=colour, background=background)
                 for _ in range(3)]
        sets.append(("train", world.caption(drawn[0], rng), f"shapes://{shape}/{colour}/"
                     f"{background}/0", [world.render(a) for a in drawn], None))
    _write_sets(tmp_path / "mis", sets)
    out = tmp_path / "report" / "report.json"
    report = mis_report.main(["--config", str(CONFIGS / "mis_report.yaml"),
                              f"--mis_uri={tmp_path / 'mis'}", f"--out={out}", "--seed=5"])
    assert (report["sets"], report["images_per_set"]) == (2, 3)
    assert report["agreement"] == {"shape": 1.0, "colour": 1.0, "background": 1.0}  # renders
    assert json.loads(out.read_text()) == report
    saved = json.loads((tmp_path / "report" / "report_config.json").read_text())
    assert saved["config_class"] == "MISReportConfig"
    assert saved["config"]["seed"] == 5 and saved["config"]["mis_uri"] == str(tmp_path / "mis")
    assert all((tmp_path / "report" / f"report.{ext}").stat().st_size > 0 for ext in ("md", "png"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_task_fidelity_honours_the_steps_override_and_saves_its_config(tmp_path):
    from m2m_ray.fidelity import task
    from m2m_ray.models.config import M2MConfig, ModelConfig
    from m2m_ray.sampling.pipeline import M2MPipeline
    from m2m_ray.shapes import views

    rng = np.random.default_rng(0)
    sets = []
    for index in range(2):
        rgba, cameras = views.render_views(views.sample_box(rng))
        alpha = rgba[..., 3:4].astype(np.float32) / 255
        rgb = np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
        sets.append(("test", f"object {index}", f"v://{index}", list(rgb),
                     {"camera": cameras.tolist()}))
    _write_sets(tmp_path / "data", sets)
    torch.manual_seed(0)
    M2MPipeline.from_preset(ModelConfig(preset="shapes"), M2MConfig(task_conditions=["camera"])
                            ).save_pretrained(str(tmp_path / "model"))
    args = ["--config", str(CONFIGS / "task_fidelity_views.yaml"),
            f"--model_path={tmp_path / 'model'}", f"--data_uri={tmp_path / 'data'}",
            "--threads=1"]
    sheets = {}
    for steps in (1, 3):
        out = tmp_path / f"steps{steps}" / "views.json"
        results = task.main([*args, f"--out={out}", f"--sample.num_inference_steps={steps}"])
        assert results["steps"] == steps and results["sets"] == 2
        assert json.loads(out.read_text()) == results
        saved = json.loads((out.parent / "views_config.json").read_text())
        assert saved["config_class"] == "TaskFidelityConfig"
        assert saved["config"]["sample"]["num_inference_steps"] == steps
        assert "| condition |" in (out.parent / "views.md").read_text()
        sheets[steps] = np.asarray(Image.open(out.parent / "views_sheet.png"))
    assert not np.array_equal(sheets[1], sheets[3])  # the override reached the sampler
