"""What a rerun into an existing MIS output must agree with, and the checks that refuse it otherwise.

Stage 1 defines the shards: which caption lands in which shard, in which split, kept or rejected.
That definition is the input files (their list, sizes and modification times or S3 ETags), the
settings that decide membership and content (``captions.lines_per_shard``, ``max_tokens``,
``dedup``, ``test_fraction``) and the model (its CLIP tokenizer counts the tokens). It is written
into ``captions_stats.json`` (``definition``) with a digest of the definition and its result (the
kept captions per shard: ``captions_digest``); every MIS shard's stats carry the digest of the
stage-1 output it was generated from. ``captions.range_bytes``, ``batch_size`` and the actor pools
only change how the work is cut, never the output (``tests/test_captions.py``), so they are not
part of it.

- Stage 1 with MIS shards committed: the same definition keeps stage 1 as it is (nothing is
  deleted or rewritten under the committed shards); another one is refused, naming what changed.
  Without committed shards stage 1 is simply redone.
- Stage 2 refuses a config whose caption settings differ from stage 1's, committed shards made
  from another stage-1 output, and image settings (``IMAGE_SETTINGS``, the model) other than
  those of the shards already generated (``mis/generate_config.json``).
- ``shard_problems`` is the stats-level consistency of MIS against stage 1 (every kept caption in
  a committed set or a counted rejection, no shard stage 1 does not have); stage 2 runs it before
  it reports success, ``verify`` runs it too.

Every refusal is the one ``m2m_ray.config.ResumeMismatchError`` (``refuse_resume``), naming each
changed key, old → new, and the way out.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from m2m_ray import storage
from m2m_ray.config import (
    ResumeMismatchError,
    config_to_dict,
    refuse_resume,
    setting_changes,
)
from m2m_ray.formats.ids import shard_name

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig
    from m2m_ray.mis.config import BuildMISConfig

# Caption settings that decide which caption is in which shard and split, and whether it is kept.
SHARD_SETTINGS = ("lines_per_shard", "max_tokens", "dedup", "test_fraction")
# Settings that change the images: a dataset must not mix shards made with different values.
IMAGE_SETTINGS = ("images_per_caption", "base_seed", "num_inference_steps", "scheduler",
                  "guidance_scale", "height", "width", "image_format", "image_quality",
                  "keep_latents")


def input_fingerprints(files: list[str], storage_cfg: "StorageConfig | None"
                       ) -> list[dict[str, Any]]:
    """``{"uri", "size", "modified"}`` per input file, in order (the order gives file indices):
    ``modified`` is the S3 ETag (content-based) or the local modification time."""
    out = []
    for uri in files:
        fs, path = storage.fsspec_filesystem(uri, storage_cfg)
        info = fs.info(path)
        modified = info.get("ETag") or info.get("mtime") or info.get("LastModified")
        out.append({"uri": uri, "size": int(info["size"]),
                    "modified": None if modified is None else str(modified).strip('"')})
    return out


def captions_definition(cfg: "BuildMISConfig", files: list[str]) -> dict[str, Any]:
    """Everything that defines stage 1's output for ``files`` (the expanded inputs)."""
    return {"inputs": input_fingerprints(files, cfg.storage),
            "settings": {key: getattr(cfg.captions, key) for key in SHARD_SETTINGS},
            "model": config_to_dict(cfg.model)}


def captions_digest(definition: dict[str, Any], shards: dict[str, int]) -> str:
    """A digest of stage 1's definition and result (kept captions per shard id)."""
    payload = json.dumps({"definition": definition, "shards": shards}, sort_keys=True)
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def definition_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Readable differences ``what: before → now`` between two ``captions_definition``s."""
    changes = [f"captions.{key}: {old['settings'].get(key)!r} → {value!r}"
               for key, value in new["settings"].items() if old["settings"].get(key) != value]
    if old["model"] != new["model"]:
        changes.append(f"model: {old['model']} → {new['model']}")
    before = {f["uri"]: f for f in old["inputs"]}
    now = {f["uri"]: f for f in new["inputs"]}
    if list(before) != list(now):
        changes.append(f"input files: {list(before)} → {list(now)}")
    for uri in before.keys() & now.keys():
        a, b = before[uri], now[uri]
        if (a["size"], a["modified"]) != (b["size"], b["modified"]):
            changes.append(f"input {uri} changed: size {a['size']} → {b['size']} bytes, "
                           f"modified {a['modified']} → {b['modified']}")
    return changes


def _start_over(output_uri: str) -> str:
    return (f"To build from the new inputs or settings, write to a new output_uri, or remove "
            f"{storage.join(output_uri, 'mis')} (every generated shard) and rerun; to resume "
            "this dataset, rerun with the inputs and settings it was built from (listed in "
            f"{storage.join(output_uri, 'captions_stats.json')}, `definition`).")


def check_captions_rerun(cfg: "BuildMISConfig", previous: dict[str, Any] | None,
                         definition: dict[str, Any], committed_shards: int) -> bool:
    """Stage 1 on an output that may hold MIS shards. Returns True when stage 1 must be kept as
    it is (MIS shards are committed and nothing changed), False when it may be (re)built (no MIS
    shard is committed). Raises ``ResumeMismatchError`` when shards are committed and the inputs
    or settings differ from those they were made from, or stage 1's record is missing."""
    if not committed_shards:
        return False
    if previous is None or "definition" not in previous:
        what = ("its commit mark captions_stats.json is missing" if previous is None else
                "captions_stats.json predates input fingerprints")
        raise ResumeMismatchError(
            f"{cfg.output_uri} holds {committed_shards} committed MIS shards but stage 1's record "
            f"cannot be checked ({what}), so this run cannot tell whether its captions are the "
            f"ones the shards were made from. {_start_over(cfg.output_uri)} Or run only "
            "--stages='[generate]' to resume with the captions that are there.")
    refuse_resume(f"{cfg.output_uri} holds {committed_shards} committed MIS shards generated "
                  "from captions made with other inputs or settings; rebuilding stage 1 would "
                  "change the shards under them",
                  definition_changes(previous["definition"], definition),
                  _start_over(cfg.output_uri))
    return True


def check_generate_resume(cfg: "BuildMISConfig", caption_stats: dict[str, Any],
                          committed: dict[int, dict[str, Any]]) -> None:
    """Stage 2: refuse a config whose caption settings differ from those stage 1 ran with, and
    committed shards generated from another stage-1 output (``ResumeMismatchError``)."""
    definition = caption_stats.get("definition")
    if definition is not None:
        refuse_resume(
            f"the captions under {cfg.output_uri} were made with other settings than this "
            "config's",
            [f"captions.{key}: stage 1 ran with {definition['settings'][key]!r} → this config "
             f"has {getattr(cfg.captions, key)!r}" for key in SHARD_SETTINGS
             if definition["settings"][key] != getattr(cfg.captions, key)],
            "Run with the settings stage 1 used, or run stage captions with the new ones (it "
            f"refuses while MIS shards are committed). {_start_over(cfg.output_uri)}")
    digest = caption_stats.get("captions_digest")
    stale = sorted(sid for sid, stats in committed.items()
                   if stats.get("captions_digest", digest) != digest)
    if stale:
        refuse_resume(
            f"{len(stale)} committed MIS shards under {cfg.output_uri} (e.g. "
            f"{[shard_name(s) for s in stale[:5]]}) were generated from another stage-1 output "
            "than the captions there now",
            [f"captions_digest: {committed[stale[0]].get('captions_digest')!r} → {digest!r}"],
            _start_over(cfg.output_uri))


def check_image_settings(cfg: "BuildMISConfig", saved: dict[str, Any] | None) -> None:
    """Stage 2: refuse to add shards made with other image settings (``IMAGE_SETTINGS`` of
    ``generate``, every ``model`` key) to those of ``saved`` (the ``config`` payload of
    ``mis/generate_config.json``, None for a new dataset). Raises ``ResumeMismatchError``."""
    if saved is None:
        return
    changes = setting_changes(saved["generate"], config_to_dict(cfg.generate), IMAGE_SETTINGS,
                              prefix="generate.")
    changes += setting_changes(saved["model"], config_to_dict(cfg.model), prefix="model.")
    refuse_resume(f"{cfg.output_uri} already holds MIS shards generated with other settings",
                  changes,
                  "Resume with the same settings, or write to a new output_uri, or remove "
                  f"{storage.join(cfg.output_uri, 'mis')} (every generated shard) and rerun.")


def shard_problems(caption_stats: dict[str, Any], committed: dict[int, dict[str, Any]]
                   ) -> list[str]:
    """Stats-level consistency of the committed MIS shards (``MISLayout.committed_stats``) with
    stage 1 (``captions_stats.json``): no shard stage 1 lacks, every shard made from this stage-1
    output, and per shard ``sets`` + rejected sets = stage 1's kept captions. Cheap: reads only
    the stats files. Missing (uncommitted) shards are not problems here."""
    expected = {int(sid): count for sid, count in caption_stats["shards"].items()}
    digest = caption_stats.get("captions_digest")
    problems = []
    for sid, stats in sorted(committed.items()):
        name = shard_name(sid)
        if sid not in expected:
            problems.append(f"shard {name} is committed but stage 1 has no such shard")
            continue
        if digest is not None and stats.get("captions_digest", digest) != digest:
            problems.append(f"shard {name} was generated from another stage-1 output")
        rejected = len(stats.get("rejected_sets", []))
        if stats["sets"] + rejected != expected[sid]:
            problems.append(f"shard {name}: {stats['sets']} sets + {rejected} rejected, but stage "
                            f"1 kept {expected[sid]} captions for it")
    return problems
