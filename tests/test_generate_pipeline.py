"""pipelines/generate.py on real photographs (the ones the scikit-image wheel ships), in-process
and as a Ray Data batch job over MSCOCO-format category sets."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys

import pytest
import skimage.data
import torch
from PIL import Image

from m2m_ray.data.image_inputs import ImageInputError
from m2m_ray.data.sets import choose_caption_ids
from m2m_ray.formats import generations as gen
from m2m_ray.formats.ids import caption_id
from m2m_ray.formats.mis import MISLayout, SetRecord, ShardWriter
from m2m_ray.models.config import M2MConfig, ModelConfig
from m2m_ray.sampling.pipeline import M2MPipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pipelines"))

import generate  # noqa: E402  pipelines/generate.py

SKIMAGE_DATA = os.path.dirname(skimage.data.__file__)
# Photographs of assorted sizes and modes: RGB PNG/JPEG, greyscale (camera), RGBA (logo).
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "logo.png"]
FAST = ["--sample.num_inference_steps=2", "--sample.num_images=2"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny M2M-Self pipeline whose image-set attention is not a no-op."""
    pipe = M2MPipeline.from_preset(ModelConfig(preset="tiny"), M2MConfig(variant="self"))
    gen_ = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "attn2.to_out" in name:
                param.copy_(torch.randn(param.shape, generator=gen_) * 0.3)
    path = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(path)
    return str(path)


def write_mis(root: str, num_sets: int = 6, images_per_set: int = 6, broken: tuple = (),
              formats: tuple = ("parquet",)) -> list[int]:
    """One committed shard of MIS sets (flat-colour JPEGs); every third set is train; the sets
    whose caption id is in ``broken`` have an undecodable first image. Returns the test ids."""
    writer = ShardWriter(MISLayout(root), 0, list(formats))
    records, ids = [], []
    for i in range(num_sets):
        cid = caption_id(0, i + 1)
        images = []
        for j in range(images_per_set):
            buffer = io.BytesIO()
            Image.new("RGB", (64, 64), (40 * i % 256, 30 * j % 256, 128)).save(buffer, "JPEG")
            images.append(buffer.getvalue())
        if cid in broken:
            images[0] = b"not a JPEG"
        split = "train" if i % 3 == 0 else "test"
        records.append(SetRecord(cid, 0, split, f"set number {i}", f"http://x/{i}",
                                 list(range(images_per_set)), images, "jpg", None,
                                 {"image_format": "jpeg"}))
        if split == "test":
            ids.append(cid)
    writer.add(records)
    writer.commit({})
    return ids


def _photo_folder(root, names):
    root.mkdir()
    for name in names:
        shutil.copy(os.path.join(SKIMAGE_DATA, name), root / name)
    return root


def _png(path):
    with Image.open(path) as image:
        return image.format, image.size, image.mode


def test_generate_on_a_folder_of_real_photos(tmp_path, model_dir):
    folder = _photo_folder(tmp_path / "photos", PHOTOS)
    (folder / "notes.txt").write_text("not an image: the folder scan skips it")
    out = tmp_path / "out"
    summary = generate.main([f"--inputs.images=[{folder}]", "--inputs.caption=skimage photos",
                             f"--output_uri={out}", f"--model_path={model_dir}",
                             "--engine=local", "--sample.num_images=3",
                             "--sample.num_inference_steps=2"])
    assert (summary["sets"], summary["generated_images"], summary["skipped"]) == (1, 3, [])
    [record] = gen.read_generations(str(out))
    assert (record.set_id, record.caption) == ("input", "skimage photos")
    assert len(record.context) == len(PHOTOS) and len(record.generated) == 3
    assert record.meta["model"] == "M2M-Self" and record.meta["split"] == "external"
    assert record.meta["model_path"] == model_dir and record.meta["num_inference_steps"] == 2
    for path in record.context + record.generated:
        assert _png(gen.image_uri(str(out), path)) == ("PNG", (64, 64), "RGB")
    # Contact sheet: one row of 6 inputs, an arrow tile and 3 generated, 96 px thumbnails.
    assert summary["contact_sheet"] == str(out / "contact_sheet.png")
    assert _png(out / "contact_sheet.png") == ("PNG", (10 * 100 + 4, 96 + 24 + 8 + 4), "RGB")
    assert json.loads((out / "summary.json").read_text())["sets"] == 1
    assert "GenerateJobConfig" in (out / "generate_config.json").read_text()


def test_the_pipeline_with_a_seed_gives_the_generate_jobs_images(tmp_path, model_dir):
    """One sampling contract: ``pipe(images, seed=3)`` (set id ``input``) is the generate job's
    ``inputs.images`` set with ``sample.seed=3`` — same noise derivation, same bits; the model's
    saved scheduler is used (and recorded) when the spec names none."""
    names = PHOTOS[:3]
    folder = _photo_folder(tmp_path / "photos", names)
    out = tmp_path / "out"
    generate.main([f"--inputs.images=[{folder}]", f"--output_uri={out}",
                   f"--model_path={model_dir}", "--engine=local", "--sample.seed=3",
                   "--sample.scheduler=null", "--contact_sheet_sets=0", *FAST])
    [record] = gen.read_generations(str(out))
    assert record.meta["scheduler"] == "ddim" and record.meta["base_seed"] == 3
    job = [gen.load_image(gen.image_uri(str(out), p)) for p in record.generated]
    pipe = M2MPipeline.from_pretrained(model_dir)
    photos = [Image.open(folder / name) for name in sorted(names)]
    kwargs = dict(num_images=2, num_inference_steps=2)
    first, again = pipe(photos, seed=3, **kwargs), pipe(photos, seed=3, **kwargs)
    for images in (first, again):
        assert [im.tobytes() for im in images] == [im.tobytes() for im in job]
    assert [im.tobytes() for im in pipe(photos, seed=4, **kwargs)] != [im.tobytes() for im in job]


def test_bad_inputs_are_named(tmp_path):
    folder = _photo_folder(tmp_path / "photos", ["coffee.png"])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    base = [f"--output_uri={tmp_path / 'out'}", "--engine=local", "--model.preset=tiny", *FAST]
    with pytest.raises(ImageInputError, match=r"cannot read image .*broken\.jpg"):
        generate.main([f"--inputs.images=[{folder}]", *base])
    with pytest.raises(ImageInputError, match="no such file or folder"):
        generate.main([f"--inputs.images=[{tmp_path / 'missing'}]", *base])
    with pytest.raises(ImageInputError, match="matches no image file"):
        generate.main([f"--inputs.images=[{folder}/*.webp]", *base])
    assert not (tmp_path / "out").exists()  # nothing generated, nothing written


def test_local_engine_on_a_mis_shard(tmp_path, model_dir):
    test_ids = write_mis(str(tmp_path / "mis"))
    [shard] = (tmp_path / "mis" / "mis" / "parquet").iterdir()
    out = tmp_path / "gens"
    summary = generate.main([f"--inputs.mis_shard={shard}", "--inputs.context_images=3",
                             "--inputs.max_sets=3", f"--output_uri={out}", "--engine=local",
                             f"--model_path={model_dir}", "--sets_per_batch=2",
                             "--contact_sheet_sets=0", *FAST])
    records = gen.read_generations(str(out))
    # max_sets: a seeded random choice of the test sets (paper §8.4), not the first ones
    chosen = choose_caption_ids(test_ids, 3, seed=0).tolist()
    assert [int(r.set_id) for r in records] == chosen and summary["contact_sheet"] is None
    assert all(r.meta["split"] == "test" and r.caption.startswith("set number") for r in records)
    assert all(len(r.context) == 3 and len(r.generated) == 2 for r in records)
    assert records[0].meta["context_seeds"] == [0, 1, 2]


def _coco(tmp_path):
    """An instances file over skimage photos: three categories of two images each; the person
    set has a broken file."""
    images = _photo_folder(tmp_path / "val2017", ["astronaut.png", "brick.png", "grass.png",
                                                  "motorcycle_left.png", "motorcycle_right.png"])
    (images / "broken.jpg").write_bytes(b"garbage")
    files = ["astronaut.png", "broken.jpg", "brick.png", "grass.png", "motorcycle_left.png",
             "motorcycle_right.png"]
    categories = [1, 1, 7, 7, 4, 4]
    data = {"images": [{"id": i, "file_name": f, "width": 512, "height": 512}
                       for i, f in enumerate(files, 1)],
            "categories": [{"id": 1, "name": "person"}, {"id": 4, "name": "motorcycle"},
                           {"id": 7, "name": "texture"}],
            "annotations": [{"id": i, "image_id": i, "category_id": c, "area": 1e4, "iscrowd": 0}
                            for i, c in enumerate(categories, 1)]}
    (tmp_path / "annotations").mkdir()
    ann = tmp_path / "annotations" / "instances_val2017.json"
    ann.write_text(json.dumps(data))
    return ann


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_batch_generation_of_coco_sets(ray_local, tmp_path, model_dir):
    out = tmp_path / "coco_gens"
    summary = generate.main([
        f"--inputs.coco_annotations={_coco(tmp_path)}", "--inputs.context_images=2",
        f"--output_uri={out}", f"--model_path={model_dir}", "--engine=ray", "--actors.num_gpus=0",
        "--actors.min_actors=1", "--actors.max_actors=2", "--sets_per_batch=1", *FAST])
    assert summary["engine"] == "ray" and summary["sets"] == 2
    [skipped] = summary["skipped"]
    assert skipped["set_id"] == "coco-1-000" and "broken.jpg" in skipped["reason"]
    records = gen.read_generations(str(out))
    assert [(r.set_id, r.meta["category"]) for r in records] == [("coco-4-000", "motorcycle"),
                                                                 ("coco-7-000", "texture")]
    for record in records:
        assert len(record.context) == 2 and len(record.generated) == 2
        assert record.meta["split"] == "external" and record.meta["source"] == "coco"
        assert _png(gen.image_uri(str(out), record.generated[1]))[1:] == ((64, 64), "RGB")
    assert _png(out / "contact_sheet.png")[0] == "PNG"



@pytest.mark.ray
@pytest.mark.timeout(300)
def test_gpu_actors_on_a_cpu_only_local_ray_fail_fast_naming_the_fix(ray_local, tmp_path,
                                                                     model_dir, monkeypatch):
    """Found running generation on a laptop: `--actors.num_gpus=1` (the default of every GPU
    stage) on a local Ray without GPUs waited forever, with only Ray's autoscaler warning. On a
    local Ray that the job started (fixed size: nothing adds nodes) it is now an error naming the
    key; a cluster the job joins may still grow, so there the pool waits as before."""
    from m2m_ray import runtime

    monkeypatch.setattr(runtime, "_started_local", True)  # as init_ray sets it (ray_local is one)
    with pytest.raises(ValueError, match=r"actors asks for GPU 1 per actor but this local Ray has "
                                         r"GPU 0 in all.*--actors\.num_gpus=0"):
        generate.main([
            f"--inputs.coco_annotations={_coco(tmp_path)}", "--inputs.context_images=2",
            f"--output_uri={tmp_path / 'out'}", f"--model_path={model_dir}", "--engine=ray",
            "--actors.num_gpus=1", "--sets_per_batch=1", *FAST])
    assert not (tmp_path / "out" / gen.INDEX_FILE).exists()


def test_check_pool_fits_names_each_missing_resource():
    from m2m_ray.config import ActorPoolConfig
    from m2m_ray.runtime import check_pool_fits

    cluster = {"CPU": 4.0, "GPU": 1.0, "gen_gpu": 1.0}
    check_pool_fits(ActorPoolConfig(num_gpus=1, num_cpus=4, resources={"gen_gpu": 1}), "x",
                    cluster)
    check_pool_fits(ActorPoolConfig(num_gpus=0, num_cpus=0.5), "x", {"CPU": 0.5})
    with pytest.raises(ValueError, match=r"generate\.actors asks for CPU 8 per actor.*CPU 4 in "
                                         r"all.*--generate\.actors\.num_cpus or raise --ray\.num_cpus"):
        check_pool_fits(ActorPoolConfig(num_cpus=8), "generate.actors", cluster)
    with pytest.raises(ValueError, match=r"asks for GPU 2, train_node 1 per actor.*GPU 1, "
                                         r"train_node 0 in all.*\.resources"):
        check_pool_fits(ActorPoolConfig(num_gpus=2, resources={"train_node": 1}), "a", cluster)

def _eval_cfg(**overrides):
    from m2m_ray.eval.config import EvalConfig

    return EvalConfig.model_validate({
        "protocol": {"context_images": 3, "generated_images": 5, "max_sets": 7},
        "generate": {"output_uri": "/tmp/g", "inputs": {"mis_uri": "/tmp/mis"}}} | overrides)


def test_generation_for_eval_takes_the_protocol_from_the_evaluation():
    from m2m_ray.config import ConfigError
    from m2m_ray.eval.protocol import generation_for_eval

    job = generation_for_eval(_eval_cfg())
    assert (job.inputs.context_images, job.sample.num_images, job.inputs.max_sets,
            job.inputs.mis_split) == (3, 5, 7, "test")
    agreeing = {"output_uri": "/g", "inputs": {"mis_uri": "/m", "context_images": 3}}
    assert generation_for_eval(_eval_cfg(generate=agreeing)).inputs.context_images == 3
    clash = {"output_uri": "/g", "inputs": {"mis_uri": "/m"}, "sample": {"num_images": 10}}
    with pytest.raises(ConfigError, match="generate.sample.num_images = 10 but protocol.generated_images = 5"):
        generation_for_eval(_eval_cfg(generate=clash))
    coco = {"output_uri": "/g", "inputs": {"coco_annotations": "/c/instances_val.json"}}
    with pytest.raises(ConfigError, match="protocol.split=null"):
        generation_for_eval(_eval_cfg(generate=coco))
    assert generation_for_eval(_eval_cfg(generate=coco, protocol={"split": None})).inputs.mis_split is None
    with pytest.raises(ConfigError, match="no generate section"):
        generation_for_eval(_eval_cfg(generate=None))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_generate_then_evaluate_end_to_end(ray_local, tmp_path, model_dir):
    """pipelines/evaluate.py with configs/tiny/evaluate.yaml: MIS test sets → Ray Data generation
    → evaluation → the three report files."""
    import evaluate  # pipelines/evaluate.py

    test_ids = [caption_id(0, i + 1) for i in range(6) if i % 3]  # write_mis's test split
    chosen = choose_caption_ids(test_ids, 3, seed=0).tolist()
    broken = chosen[1]  # its context cannot be read: the generation skips it
    assert write_mis(str(tmp_path / "mis"), broken=(broken,)) == test_ids
    gens = tmp_path / "gens"
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny", "evaluate.yaml")
    report = evaluate.main([
        "--config", config, f"--generate.model_path={model_dir}",
        f"--generate.inputs.mis_uri={tmp_path / 'mis'}", f"--generate.output_uri={gens}",
        "--protocol.context_images=2", "--protocol.generated_images=2", "--protocol.max_sets=3",
        "--generate.sample.num_inference_steps=2", "--generate.sets_per_batch=2",
        "--generate.actors.max_actors=1", "--actors.max_actors=1"])
    records = gen.read_generations(str(gens))
    # the Ray Data path chooses the same random 3 test sets as the local one
    assert [int(r.set_id) for r in records] == [cid for cid in chosen if cid != broken]
    assert all(len(r.context) == 2 and len(r.generated) == 2 for r in records)
    # the set that fell out in generation is in the report's denominators, with its reason
    # (it used to say "2 evaluated of 2, 0 skipped")
    counts = report["input"]
    assert (counts["sets_total"], counts["sets_evaluated"], counts["sets_skipped"]) == (3, 2, 1)
    assert counts["split"] == {"test": 2} and counts["skip_reasons"] == {"not generated": 1}
    [skip] = counts["skipped"]
    assert skip["set_id"] == str(broken) and "image" in skip["reason"]
    assert gen.read_skipped(str(gens)) == [{"set_id": str(broken), "reason": skip["reason"]}]
    assert [row["k"] for row in report["per_k"]] == [1, 2]
    assert report["files"] == {ext: os.path.join(str(gens), "eval", f"report.{ext}")
                               for ext in ("json", "md", "png")}
    assert all(os.path.getsize(path) > 0 for path in report["files"].values())
    markdown = open(report["files"]["md"]).read()
    assert "| M2M-Self | " in markdown and "TINY RANDOM EXTRACTORS" in markdown
    assert "- sets: 2 evaluated of 3 input sets, 1 skipped" in markdown
    assert f"- `{broken}`: " in markdown
    with pytest.raises(SystemExit):  # both entries at once is an error
        evaluate.main(["--config", config, f"--generations={gens}"])


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_engine_read_errors_name_the_shard(ray_local, tmp_path, model_dir):
    """A truncated Parquet shard into pipelines/evaluate.py used to end with a bare "ArrowInvalid:
    Parquet magic bytes not found in footer", a truncated tar into generate.py --engine=ray with a
    bare tarfile.ReadError, and a tar cut between two sets was read as a shorter, valid shard.
    Each is now the readers' CorruptShardError naming the shard and what to do."""
    import evaluate  # pipelines/evaluate.py

    from m2m_ray.formats.mis import CorruptShardError

    root = str(tmp_path / "mis")
    write_mis(root, formats=("parquet", "webdataset"))
    layout = MISLayout(root)
    with open(layout.parquet(0), "r+b") as f:
        f.truncate(os.path.getsize(layout.parquet(0)) - 100)
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny", "evaluate.yaml")
    with pytest.raises(CorruptShardError, match=rf"^cannot read Parquet shard "
                                                rf"{layout.parquet(0)}: ArrowInvalid: .*"
                                                r"python -m m2m_ray.mis.verify"):
        evaluate.main(["--config", config, f"--generate.model_path={model_dir}",
                       f"--generate.inputs.mis_uri={root}", f"--generate.output_uri={tmp_path}/g",
                       "--protocol.context_images=2", "--protocol.generated_images=2"])
    ray_args = [f"--model_path={model_dir}", f"--inputs.mis_uri={root}",
                "--inputs.mis_format=webdataset", "--inputs.context_images=2", "--engine=ray",
                "--actors.num_gpus=0", "--actors.max_actors=1", *FAST]
    with open(layout.webdataset(0), "rb") as f:
        whole = f.read()
    with open(layout.webdataset(0), "wb") as f:
        f.write(whole[: len(whole) // 2 + 100])  # inside a member
    with pytest.raises(CorruptShardError, match=rf"^cannot read WebDataset shard "
                                                rf"{layout.webdataset(0)}: ReadError"):
        generate.main([*ray_args, f"--output_uri={tmp_path}/g1"])
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        cut = [m.offset for m in tar.getmembers() if m.name.endswith(".json")][3]
    with open(layout.webdataset(0), "wb") as f:
        f.write(whole[:cut])  # exactly between two sets: a valid tar of 3 of the 6 sets
    with pytest.raises(CorruptShardError, match=rf"^shard {layout.webdataset(0)}: 3 sets read "
                                                "but its stats committed 6"):
        generate.main([*ray_args, f"--output_uri={tmp_path}/g2"])
