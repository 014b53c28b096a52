"""The configs of the fidelity tools, loaded like every job's (``m2m_ray.config.load_config``:
class defaults → ``--config`` YAML → ``--a.b=value`` overrides) and saved beside their reports:

- ``MethodFidelityConfig``: ``python -m m2m_ray.fidelity.method`` (configs/shapes/fidelity.yaml);
- ``TaskFidelityConfig``: ``python -m m2m_ray.fidelity.task``
  (configs/shapes/task_fidelity_{views,procedures}.yaml);
- ``MISReportConfig``: ``python -m m2m_ray.fidelity.mis_report`` (configs/shapes/mis_report.yaml).

The M2M sampling settings are a ``sample`` section (``SampleConfig``, the one sampling spec); the
shapes world's recipe (20 Euler steps, s_I = 3.0, seed 0) is in the YAMLs. Each tool writes its
report at ``out`` (a ``.json`` path, local or s3://) with ``.md``, ``.png``, ``_sheet.png`` and
``_config.json`` beside it (``m2m_ray.fidelity.report.write_report``).
"""

from __future__ import annotations

import argparse
from typing import ClassVar, Literal, Sequence, TypeVar

from pydantic import Field, field_validator, model_validator

from m2m_ray.config import StorageConfig, StrictModel, config_to_yaml, load_config
from m2m_ray.sampling.config import SampleConfig

T = TypeVar("T", bound=StrictModel)


def _json_path(value: str) -> str:
    if not value.endswith(".json"):
        raise ValueError(f"out must be the report's .json path (its .md, .png, _sheet.png and "
                         f"_config.json go beside it), got {value!r}; e.g. "
                         "out: outputs/shapes/fidelity/fidelity.json")
    return value


class _ReportConfig(StrictModel):
    out: str = Field(..., description="The report's JSON path (local or s3://); beside it: .md, "
                     ".png (plot), _sheet.png (contact sheet, where the tool draws one) and "
                     "_config.json (this resolved config).")
    storage: StorageConfig = Field(default_factory=StorageConfig)

    _out_is_json = field_validator("out")(_json_path)


class MethodFidelityConfig(_ReportConfig):
    """Method fidelity on the shapes world (``m2m_ray.fidelity.method``): per K, does M2M take its
    context's shape, colour and background (paper §8.1–8.3)."""

    model_path: str = Field(..., description="An exported M2M pipeline folder (local or s3://).")
    mis_uri: str = Field(..., description="A shapes-MIS root: its test sets are one context "
                         "source (parquet shards).")
    ks: list[int] = Field([1, 2, 4], min_length=1, description="The K (context images) swept; "
                          "each ≤ the images of a MIS set.")
    mis_sets: int = Field(32, ge=1, description="MIS test sets (all if fewer).")
    renderer_sets: int = Field(1, ge=1, description="Rendered sets per attribute combination "
                               "(the held-out combinations get max(4, 4 × this)).")
    drift: int = Field(10, ge=0, description="M of the per-k drift run on the MIS sets at the "
                       "largest K; 0: none.")
    teacher_images: int = Field(4, ge=0, description="Teacher images drawn per caption of a "
                                "rendered set (MIS sets use their own); 0: no teacher column.")
    threads: int = Field(2, ge=1, description="torch CPU threads.")
    sample: SampleConfig = Field(
        default_factory=SampleConfig,
        description="How M2M samples; num_images is M, seed the base of every generator. "
        "context_window left out: max(ks) + max(num_images, drift), so every image sees its whole "
        "set.")

    renamed_keys: ClassVar[dict[str, str]] = {
        "model": "model_path", "mis": "mis_uri", "sets": "mis_sets",
        "renderer-sets": "renderer_sets", "num_images": "sample.num_images",
        "num-images": "sample.num_images", "steps": "sample.num_inference_steps",
        "scheduler": "sample.scheduler", "guidance": "sample.guidance_scale",
        "seed": "sample.seed"}

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, ks: list[int]) -> list[int]:
        if min(ks) < 1:
            raise ValueError(f"every K must be ≥ 1 (K = 0 is the context-dropped column, always "
                             f"measured), got {ks}")
        return ks

    @model_validator(mode="after")
    def _whole_set_window(self) -> "MethodFidelityConfig":
        if "context_window" not in self.sample.model_fields_set:
            self.sample.context_window = max(self.ks) + max(self.sample.num_images, self.drift)
        return self


class TaskFidelityConfig(_ReportConfig):
    """Task fidelity on the shapes world (``m2m_ray.fidelity.task``): does the task condition
    steer generation (paper §8.5)."""

    task: Literal["views", "procedures"] = Field(..., description="views: posed views of a box "
                                                 "(camera); procedures: steps (position).")
    model_path: str = Field(..., description="A fine-tuned M2M pipeline folder with the task's "
                            "condition (local or s3://).")
    data_uri: str = Field(..., description="The task dataset (pipelines/build_tasks.py output); "
                          "its test split is measured.")
    sets: int = Field(48, ge=1, description="Test sets (all if fewer).")
    context_images: int = Field(2, ge=1, description="K: context images per trial.")
    threads: int = Field(2, ge=1, description="torch CPU threads.")
    sample: SampleConfig = Field(
        default_factory=SampleConfig,
        description="How M2M samples; num_images is M (targets per trial), guidance_scale s_I, "
        "task_guidance_scale s_T of the run with the condition (the dropped run: s_T = 0), seed "
        "the base of every generator and of the trials' choice of images.")

    renamed_keys: ClassVar[dict[str, str]] = {
        "model": "model_path", "data": "data_uri", "context": "context_images",
        "targets": "sample.num_images", "image_guidance": "sample.guidance_scale",
        "image-guidance": "sample.guidance_scale", "task_guidance": "sample.task_guidance_scale",
        "task-guidance": "sample.task_guidance_scale", "steps": "sample.num_inference_steps",
        "seed": "sample.seed"}


class MISReportConfig(_ReportConfig):
    """The shapes-MIS report (``m2m_ray.fidelity.mis_report``): does a shapes-MIS follow its
    captions (paper §4)."""

    mis_uri: str = Field(..., description="A shapes-MIS root (build_mis output_uri).")
    format: Literal["parquet", "webdataset"] = Field("parquet", description="Shards to read.")
    max_sets: int | None = Field(None, ge=1, description="Sets read, in shard order; None: all.")
    seed: int = Field(0, description="Seed of the renderer's reference diversity.")

    renamed_keys: ClassVar[dict[str, str]] = {"root": "mis_uri", "max-sets": "max_sets"}


def parse_config(cls: type[T], argv: Sequence[str] | None, description: str) -> T:
    """``--config <yaml>`` plus ``--a.b=value`` overrides → a ``cls``, printed resolved.

    Raises ``m2m_ray.config.ConfigError`` naming every bad key or value."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help=f"YAML file of a {cls.__name__}")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(cls, args.config, overrides)
    print(f"# resolved config ({args.config or 'defaults'} + overrides)\n{config_to_yaml(cfg)}",
          flush=True)
    return cfg
