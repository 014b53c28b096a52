"""The evaluation protocol applied to a generation: generate-then-evaluate runs the generation
job with the evaluation's K, M, split and number of sets (``EvalConfig.protocol``, paper §8.4)."""

from __future__ import annotations

from m2m_ray.config import ConfigError
from m2m_ray.data.sets import EXTERNAL_SPLIT
from m2m_ray.eval.config import EvalConfig
from m2m_ray.sampling.config import GenerateJobConfig


def generation_for_eval(cfg: EvalConfig) -> GenerateJobConfig:
    """The generation job of an evaluation (``cfg.generate``) with the evaluation's protocol: K =
    ``protocol.context_images``, M = ``protocol.generated_images``, ``protocol.max_sets`` and
    ``protocol.split``. Setting one of those differently in the generate section is a
    ``ConfigError``, not silently overridden; so is ``image_format: jpeg``, because FID needs the
    generated images lossless (PNG): JPEG compression alone moves FID (Parmar et al., clean-fid,
    CVPR 2022)."""
    spec, protocol = cfg.generate, cfg.protocol
    if spec is None:
        raise ConfigError("no generate section: give --generations=<folder> to evaluate existing "
                          "generations, or a generate section (model_path, inputs.mis_uri, ...)")
    passed_on = [("inputs", "context_images", "context_images", protocol.context_images),
                 ("sample", "num_images", "generated_images", protocol.generated_images),
                 ("inputs", "max_sets", "max_sets", protocol.max_sets),
                 ("inputs", "mis_split", "split", protocol.split)]
    conflicts = [f"generate.{section}.{key} = {getattr(getattr(spec, section), key)!r} but "
                 f"protocol.{eval_key} = {value!r}"
                 for section, key, eval_key, value in passed_on
                 if key in getattr(spec, section).model_fields_set
                 and getattr(getattr(spec, section), key) != value]
    if conflicts:
        raise ConfigError("the generate section disagrees with the evaluation protocol: "
                          + "; ".join(conflicts) + ". Set these in the evaluation's protocol section "
                          "only (they are passed on to the generation)")
    if spec.image_format != "png":
        raise ConfigError(f"generate.image_format = {spec.image_format!r}: FID is computed on "
                          "the saved generated images, which must be lossless; use png")
    if not (spec.inputs.mis_uri or spec.inputs.mis_shard) and protocol.split is not None:
        raise ConfigError(f"generated sets of images / COCO inputs have split {EXTERNAL_SPLIT!r}, "
                          f"so protocol.split={protocol.split!r} would skip them all; set "
                          "--protocol.split=null to evaluate them")
    data = spec.model_dump(mode="json")
    data["inputs"].update(context_images=protocol.context_images, max_sets=protocol.max_sets,
                          mis_split=protocol.split)
    data["sample"]["num_images"] = protocol.generated_images
    data.update(storage=cfg.storage.model_dump(mode="json"), ray=cfg.ray.model_dump(mode="json"))
    return GenerateJobConfig.model_validate(data)
