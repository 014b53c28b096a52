"""The config machinery every job shares, and the sections that cut across jobs.

Each job's config lives in the package that runs it (``mis/config.py``, ``train/config.py``,
``sampling/config.py``, ``eval/config.py``; the model architecture in ``models/config.py``); this
module is the ground floor they all build on and imports nothing of ours:

- ``StrictModel``: pydantic v2, ``extra="forbid"``: a misspelt key is an error, not a silently
  ignored setting; a class lists its renamed keys in ``renamed_keys`` so an old YAML gets a fix-it
  error naming the new key;
- ``load_config``: class defaults → YAML file → dotted CLI overrides, with errors that name the
  key, the value given and what was expected::

      cfg = load_config(BuildMISConfig, "configs/tiny/build_mis.yaml", ["--captions.batch_size=64"])

- the cross-cutting sections: ``RayConfig``, ``StorageConfig`` and ``ActorPoolConfig`` (where a
  Ray Data stage runs and how wide; ``with_defaults`` gives each stage its own defaults);
- the one resume guard: ``ResumeMismatchError`` and ``refuse_resume`` / ``setting_changes``,
  used by every job that continues an output (MIS stages 1 and 2, task datasets, training).

Credentials never live in configs: S3 keys come from the environment or the AWS profile only, so a
saved config (``m2m_ray.storage.save_config``) can be shared as it is.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Iterable, Mapping, Sequence, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem found."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    #: Keys this section used to have → their new dotted path relative to this section; an old
    #: key is still an error, but one that names where the setting lives now.
    renamed_keys: ClassVar[dict[str, str]] = {}


def with_defaults(cls: type[T], **defaults: Any) -> Any:
    """The type of a ``cls`` section whose left-out keys take these defaults, not ``cls``'s own.

    One class, several stages: ``ActorPoolConfig`` is a GPU pool for generation and a CPU pool for
    caption filtering; a YAML that sets only ``actors.max_actors`` must not turn the caption pool
    into a GPU pool. The section itself may be left out too (then it is ``cls(**defaults)``).
    """
    def merge(value: Any) -> Any:
        return {**defaults, **value} if isinstance(value, dict) else value

    return Annotated[cls, BeforeValidator(merge), Field(default_factory=dict, validate_default=True)]


def moved_to(section: str, keys: Sequence[str]) -> dict[str, str]:
    """``renamed_keys`` entries for keys that moved, unchanged, into a sub-section."""
    return {key: f"{section}.{key}" for key in keys}


# ---------------------------------------------------------------------------------------------
# Resuming: one guard, one error
# ---------------------------------------------------------------------------------------------


class ResumeMismatchError(ValueError):
    """A rerun or resume whose inputs or settings differ from those its output was made with (a
    MIS, a task dataset, a training run). The message names each changed key, old → new, and the
    way out (the folder to delete, the new output or run name to use)."""


def setting_changes(old: Mapping[str, Any], new: Mapping[str, Any],
                    keys: Iterable[str] | None = None, prefix: str = "") -> list[str]:
    """``"<prefix><key>: <old!r> → <new!r>"`` for each key of ``keys`` (default: every key of
    either mapping, sorted) whose values differ; a key one side lacks reads as None there."""
    keys = sorted(set(old) | set(new)) if keys is None else keys
    return [f"{prefix}{key}: {old.get(key)!r} → {new.get(key)!r}" for key in keys
            if old.get(key) != new.get(key)]


def refuse_resume(what: str, changes: Sequence[str], way_out: str) -> None:
    """Raise ``ResumeMismatchError`` ``"<what> (<change>; <change>...). <way_out>"`` when
    ``changes`` (``"key: old → new"`` lines, e.g. ``setting_changes``) is not empty; return
    otherwise. ``what`` says which output refuses and why; ``way_out`` how to go on."""
    if changes:
        raise ResumeMismatchError(f"{what} ({'; '.join(changes)}). {way_out}")


# ---------------------------------------------------------------------------------------------
# Cross-cutting sections
# ---------------------------------------------------------------------------------------------


class RayConfig(StrictModel):
    address: str | None = Field(
        None,
        description="Ray cluster to join. None: $RAY_ADDRESS when set (ray job submit sets it), "
        "else start a private local Ray.",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of a local Ray (ignored when joining a cluster)."
    )
    num_gpus: int | None = Field(None, ge=0, description="Logical GPUs of a local Ray.")


class StorageConfig(StrictModel):
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, moto, R2...). None: $AWS_ENDPOINT_URL_S3 or "
        "$AWS_ENDPOINT_URL when set, else AWS. Credentials come from the environment only.",
    )
    region: str | None = Field(None, description="S3 region; None: the AWS default chain.")
    anonymous: bool = Field(False, description="Unsigned S3 requests (public buckets).")


class ActorPoolConfig(StrictModel):
    """Where a Ray Data stage runs and how wide: resources per actor and the pool's bounds, turned
    into ``map_batches`` arguments by ``m2m_ray.runtime.actor_pool_args`` (every stage, one shape).

    A stage declares its own defaults with ``with_defaults`` (GPU actors for generation, CPU for
    caption filtering). The training read stage runs as Ray Data *tasks*
    (``m2m_ray.runtime.task_pool_args``): resources per task, ``max_actors`` bounds the tasks in
    flight and ``min_actors`` is not used.
    """

    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (0: CPU actors).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per actor, e.g. {gen_gpu: 1} to land on the "
        "generation node type of cluster/*.yaml rather than on a training node.",
    )
    min_actors: int = Field(1, ge=1, description="Actors the pool starts with.")
    max_actors: int | None = Field(
        1, ge=1, description="Upper bound of the actor pool; an autoscaling cluster grows towards "
        "it. None: no bound (grow with the cluster's free resources).")

    @model_validator(mode="after")
    def _pool_bounds(self) -> "ActorPoolConfig":
        if self.max_actors is not None and self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors}); "
                             "set max_actors >= min_actors")
        return self


#: The two kinds of stage: a GPU actor pool (generation, sampling, evaluation, VAE encoding) and
#: an elastic CPU pool (caption filtering, training reads) that grows with the cluster.
GPUActorPool = with_defaults(ActorPoolConfig, num_gpus=1.0)
CPUActorPool = with_defaults(ActorPoolConfig, num_gpus=0.0, num_cpus=1.0, max_actors=None)
#: ``renamed_keys`` of a job section whose pool keys moved into its ``actors`` section.
POOL_KEYS_IN_ACTORS = moved_to("actors", tuple(ActorPoolConfig.model_fields))


# ---------------------------------------------------------------------------------------------
# Loading and overriding
# ---------------------------------------------------------------------------------------------


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``["--a.b=1", "--c", "x"]`` → ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"cannot read command-line argument {arg!r}: expected --key.subkey=value "
                "(or --key.subkey value)"
            )
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(items):
                raise ConfigError(f"override --{key} has no value: write --{key}=VALUE")
            raw = items[i + 1]
            i += 1
        i += 1
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override --{key} conflicts with an earlier --{part}=...")
            node = child
        node[parts[-1]] = value
    return nested


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The model class at ``loc`` (a path into nested models), or None."""
    model: Any = cls
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = _section_class(field.annotation)
    return model


def _section_class(annotation: Any) -> Any:
    """The model class of a field's annotation, through ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _known_keys(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at ``loc``, for 'did you mean' hints."""
    return list(getattr(_model_at(cls, loc), "model_fields", {}))


def _explain(error: dict[str, Any], cls: type[BaseModel], source: str) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        parent = ".".join([*map(str, loc[:-1]), ""])
        renamed = getattr(_model_at(cls, loc[:-1]), "renamed_keys", {}).get(str(loc[-1]))
        if renamed:
            return (f"key '{key}' in {source} was renamed: it is '{parent}{renamed}' now; move "
                    "the value there")
        known = _known_keys(cls, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        did_you_mean = f"; did you mean '{parent}{hint[0]}'?" if hint else ""
        return (f"unknown key '{key}' in {source}{did_you_mean} "
                f"(valid keys here: {', '.join(known)})")
    if error["type"] == "missing":
        return f"missing required key '{key}' in {source}"
    given = error.get("input")
    return f"'{key}' = {given!r} in {source}: {error['msg']}"


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then CLI ``overrides``."""
    data: dict[str, Any] = {}
    sources = []
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level, "
                              f"got {type(loaded).__name__}")
        data = loaded
        sources.append(str(path))
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
        sources.append("command-line overrides")
    source = " + ".join(sources) or "defaults"
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        problems = "\n  ".join(_explain(e, cls, source) for e in err.errors())
        raise ConfigError(f"invalid {cls.__name__}:\n  {problems}") from None


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
