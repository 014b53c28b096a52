"""VGSI / wikiHow procedures (Yang et al., 2021) → one ``TaskSet`` per method (paper §7.1, §8.5.2).

The dataset is two things::

    WikihowText_data.json    JSON lines, one wikiHow article per line:
                             {"file_id": "10000798", "goal": "How to Hang an Ironing Board",
                              "goal_description": ..., "category_hierarchy": [...],
                              "methods": [{"name": "Hanging an Ironing Board Over a Door",
                                           "steps": [{"headline": ..., "description": ...,
                                                      "img": <URL of the image on wikiHow>,
                                                      "img_license": ..., "step_id": "10000798_0_0"},
                                                     ...]}, ...]}
    wiki_images/             the step images (wiki_images.zip), one file per step: <step_id>.png

``img`` is the image's original wikiHow URL and is not used to find the file: the images are named
by their step's ``step_id`` (``<file_id>_<method index>_<step index>``), so a step's image is
``<image root>/<step_id>.png``; the image root defaults to ``wiki_images/`` beside the JSON
file. Some copies split the images into ``train/`` and ``test/`` folders; pass both as
``image_root`` (a list, searched in order).

    report = TaskReadReport()
    for s in iter_vgsi_sets("vgsi/WikihowText_data.json", "vgsi/wiki_images", report=report):
        ...                # TaskSet(set_id="vgsi-10000798-0", images=[png, ...], position=[0, 1, ...])

For parallel reads (``build.py``): ``list_articles`` lists the file's lines as units
``[line, byte offset, byte length]`` on the driver, ``read_article`` reads one unit's sets in a
task (that byte range only).

Conventions:

- **one set per method**, images in the order of the method's ``steps`` list: the article's own
  step order, wikiHow's numbered steps (``step_id``'s last field is the same index in the
  dataset's documentation; the reader relies on the list order and does not parse ids).
- ``position``: each kept step's 0-based index in the method's full ``steps`` list, so a step
  whose image is missing leaves the others at their own index (``[0, 1, 3, 4]``).
- ``caption``: ``"<goal>: <method name>"`` (both stripped), or the goal alone when the method
  has no name, e.g. ``"How to Hang an Ironing Board: Hanging an Ironing Board Over a Door"``.
- ``set_id``: ``vgsi-<file_id>-<method index>`` (method index 0-based, as in ``step_id``): the
  dataset's own ids, stable across reorderings of the file; ``vgsi-line<line>-<method index>``
  for an article without a ``file_id``.
- ``source``: ``{"json": uri, "line": 1-based line, "method": index, "file_id": ...,
  "step_ids": [the kept steps']}``.
- images: every file is decoded fully (a truncated file fails). An RGB PNG is kept byte for
  byte; anything else (JPEG content, palette, grey, alpha composited over white, EXIF-rotated)
  is re-encoded as an RGB PNG, so every set's ``image_ext`` is ``"png"`` and nothing is
  re-compressed lossily.

Faults and what happens (``report`` counts by reason):

- **always counted skips**, whatever ``on_bad``: a step whose image file is missing
  (``"missing image"``: the step is left out, its set kept when at least ``min_steps`` images
  remain, else the set is skipped as ``"too few images"``); a method with fewer than
  ``min_steps`` steps in the JSON (``"too few steps"``: a legitimate entry that this task's
  filter leaves out, not a fault, so reading the real dataset never stops at one); an article with
  no methods (``"no methods"``).
- **errors with** ``on_bad="error"`` (``TaskDataError`` naming the JSON file and line, and the image
  file), counted skips with ``on_bad="skip"``: a line that is not JSON (``"bad json line"``, the
  line is skipped); JSON that is not a VGSI article (``"bad article"``: no ``goal`` string,
  ``methods`` not a list of ``{"steps": [{"step_id": str}, ...]}``; the line is skipped); an image
  file that does not decode (``"undecodable image"``: the step is left out, as a missing one).
- a missing JSON file or image root is a ``FileNotFoundError`` (a typo must not read as "every
  image missing").
"""

from __future__ import annotations

import io
import json
import logging
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
from PIL import Image

from m2m_ray import storage as st
from m2m_ray.formats.images import to_rgb
from m2m_ray.formats.tasks import TaskDataError
from m2m_ray.mis.tasks import OnBad, TaskReadReport, TaskSet

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig

JSON_NAME = "WikihowText_data.json"
IMAGES_DIR = "wiki_images"
IMAGE_SUFFIX = ".png"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112

log = logging.getLogger(__name__)


class _BadLine(Exception):
    """A line that is not a VGSI article: ``reason`` is the report's reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def vgsi_caption(goal: str, method_name: str | None) -> str:
    """``"<goal>: <method name>"``, or the goal alone when the method has no name."""
    goal, name = goal.strip(), (method_name or "").strip()
    return f"{goal}: {name}" if name else goal


def vgsi_set_id(file_id: Any, line: int, method_index: int) -> str:
    """``vgsi-<file_id>-<method index>``; ``vgsi-line<line>-<method index>`` without a file_id."""
    if file_id is None or str(file_id).strip() == "":
        return f"vgsi-line{line}-{method_index}"
    return f"vgsi-{str(file_id).strip()}-{method_index}"


def _parse_article(text: str) -> dict[str, Any]:
    """One line of ``WikihowText_data.json`` → the article dict, its structure checked.

    Raises ``_BadLine`` with reason ``"bad json line"`` (not JSON) or ``"bad article"`` (JSON that
    lacks the fields a procedure needs)."""
    try:
        article = json.loads(text)
    except ValueError as err:
        raise _BadLine("bad json line", f"not JSON ({err})") from err
    if not isinstance(article, dict):
        raise _BadLine("bad article", f"a JSON {type(article).__name__}, not an article object")
    if not isinstance(article.get("goal"), str):
        raise _BadLine("bad article", "no 'goal' string")
    methods = article.get("methods")
    if not isinstance(methods, list):
        raise _BadLine("bad article", "'methods' is not a list")
    for m, method in enumerate(methods):
        if not isinstance(method, dict) or not isinstance(method.get("steps"), list):
            raise _BadLine("bad article", f"method {m} has no 'steps' list")
        if not isinstance(method.get("name", ""), (str, type(None))):
            raise _BadLine("bad article", f"method {m}'s 'name' is not a string")
        for k, step in enumerate(method["steps"]):
            if not isinstance(step, dict) or not isinstance(step.get("step_id"), str) \
                    or not step["step_id"].strip():
                raise _BadLine("bad article", f"step {k} of method {m} has no 'step_id' string")
    return article


def rgb_png(data: bytes, name: str) -> bytes:
    """Decode ``data`` fully; an RGB PNG comes back as is, anything else as a re-encoded RGB PNG
    (``m2m_ray.formats.images.to_rgb``: alpha over white, EXIF orientation applied).

    Raises ``TaskDataError`` naming ``name`` when the bytes do not decode."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types for broken or unknown files
        raise TaskDataError(f"cannot decode image {name} ({len(data)} bytes): "
                            f"{type(err).__name__}: {err}") from err
    if (data.startswith(_PNG_SIGNATURE) and image.mode == "RGB"
            and image.getexif().get(_EXIF_ORIENTATION, 1) == 1):
        return data
    out = io.BytesIO()
    to_rgb(image).save(out, format="PNG")
    return out.getvalue()


class _ImageFolders:
    """The step images under one or more roots: ``<root>/<step_id>.png``, first root that has it."""

    def __init__(self, roots: Sequence[str], storage: "StorageConfig | None") -> None:
        self.folders = []
        for root in roots:
            fs, path = st.fsspec_filesystem(root, storage)
            if not fs.exists(path):
                raise FileNotFoundError(
                    f"VGSI image folder {root} does not exist; pass the folder of the unzipped "
                    f"wiki_images.zip (files <step_id>{IMAGE_SUFFIX})")
            self.folders.append((root, fs, path.rstrip("/")))

    def read(self, step_id: str) -> tuple[str, bytes] | None:
        """``(uri, bytes)`` of the step's image, or None when no root has it."""
        for root, fs, path in self.folders:
            try:
                data = fs.cat_file(f"{path}/{step_id}{IMAGE_SUFFIX}")
                return st.join(root, step_id + IMAGE_SUFFIX), data
            except FileNotFoundError:
                continue
        return None

    def describe(self) -> str:
        return " or ".join(root for root, _, _ in self.folders)


def default_image_root(json_uri: str) -> str:
    """The image folder beside the annotation file: ``<folder of json_uri>/wiki_images``."""
    return st.join(json_uri.rstrip("/").rsplit("/", 1)[0] if "/" in json_uri else ".", IMAGES_DIR)


def _setup(json_uri: str, image_root: str | Sequence[str] | None, storage: "StorageConfig | None",
           on_bad: str, min_steps: int) -> _ImageFolders:
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad={on_bad!r}: expected 'error' or 'skip'")
    if min_steps < 1:
        raise ValueError(f"min_steps={min_steps}: a procedure needs at least 1 step")
    if image_root is None:
        image_root = default_image_root(json_uri)
    roots = [image_root] if isinstance(image_root, str) else list(image_root)
    if not roots:
        raise ValueError("image_root is an empty list")
    return _ImageFolders(roots, storage)


def _open_json(json_uri: str, storage: "StorageConfig | None"):
    fs, path = st.fsspec_filesystem(json_uri, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"VGSI annotation file {json_uri} does not exist; expected the "
                                f"dataset's {JSON_NAME} (JSON lines)")
    return fs, path


def list_articles(json_uri: str, storage_cfg: "StorageConfig | None" = None) -> list[list[int]]:
    """The articles of ``json_uri`` as units for ``read_article``: ``[line, byte offset, byte
    length]`` of every non-blank line, in file order (1-based lines; JSON-serializable). Streams
    the file once without parsing it, so listing is cheap and a bad line fails where it is read."""
    fs, path = _open_json(json_uri, storage_cfg)
    units, offset = [], 0
    with fs.open(path, "rb") as f:  # streamed: the real file is hundreds of MB
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                units.append([number, offset, len(raw)])
            offset += len(raw)
    return units


def read_article(json_uri: str, unit: Sequence[int], image_root: str | Sequence[str] | None = None,
                 storage_cfg: "StorageConfig | None" = None, on_bad: OnBad = "error",
                 report: TaskReadReport | None = None, min_steps: int = 2) -> list[TaskSet]:
    """The sets (one per method) of one article, ``unit`` = ``[line, offset, length]`` from
    ``list_articles``; only that byte range of the file is read (one ranged GET on S3).

    ``image_root`` None: ``default_image_root(json_uri)``. Skips go to ``report`` as in
    ``iter_vgsi_sets``; ``report.sets`` is left to the caller, who counts what it keeps. Raises
    ``TaskDataError`` (``on_bad="error"``) and ``FileNotFoundError``."""
    folders = _setup(json_uri, image_root, storage_cfg, on_bad, min_steps)
    own_report = report is None
    report = TaskReadReport() if report is None else report
    fs, path = _open_json(json_uri, storage_cfg)
    number, offset, length = (int(v) for v in unit)
    raw = fs.cat_file(path, start=offset, end=offset + length)
    sets = _article_sets(raw, number, json_uri, folders, on_bad, report, min_steps)
    if own_report:
        _warn_skips(json_uri, report)
    return sets


def iter_vgsi_sets(json_uri: str, image_root: str | Sequence[str] | None = None,
                   storage_cfg: "StorageConfig | None" = None, on_bad: OnBad = "error",
                   report: TaskReadReport | None = None, min_steps: int = 2
                   ) -> Iterator[TaskSet]:
    """The procedures of a VGSI annotation file, one ``TaskSet`` per method (module docstring:
    order, ``position``, caption, set ids, which faults are errors and which counted skips).

    ``json_uri``: ``WikihowText_data.json`` (local path or s3://), streamed; ``image_root``: the
    folder of ``<step_id>.png`` files, or several searched in order (None:
    ``default_image_root``); ``min_steps`` (≥ 1): the fewest images a set keeps. ``report``
    receives the counts (``sets`` included); without one, a summary of anything skipped is logged
    as a warning.

    Raises ``TaskDataError`` (``on_bad="error"``) and ``FileNotFoundError`` (a missing file or
    image root)."""
    folders = _setup(json_uri, image_root, storage_cfg, on_bad, min_steps)
    own_report = report is None
    report = TaskReadReport() if report is None else report
    fs, path = _open_json(json_uri, storage_cfg)
    with fs.open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline) carry nothing
            for task_set in _article_sets(raw, number, json_uri, folders, on_bad, report,
                                          min_steps):
                report.sets += 1
                yield task_set
    if own_report:
        _warn_skips(json_uri, report)


def _warn_skips(json_uri: str, report: TaskReadReport) -> None:
    if report.skipped:  # no report was passed: the counts must still be seen somewhere
        log.warning("VGSI %s: skipped %s (e.g. %s)", json_uri, dict(report.skipped),
                    report.examples[:3])


def _article_sets(raw: bytes, number: int, json_uri: str, folders: _ImageFolders,
                  on_bad: OnBad, report: TaskReadReport, min_steps: int) -> list[TaskSet]:
    """One line of the file → its methods' sets (the faults as in the module docstring)."""
    where = f"{json_uri}:{number}"
    try:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _BadLine("bad json line", f"not UTF-8 text ({err})") from err
        article = _parse_article(text)
    except _BadLine as bad:
        if on_bad == "error":
            raise TaskDataError(f"{where}: {bad} (expected one VGSI article per line: "
                                "goal, methods[{name, steps[{step_id, ...}]}])") from None
        report.skip(bad.reason, f"{where}: {bad}")
        return []
    if not article["methods"]:
        report.skip("no methods", f"{where}: article has no methods")
    sets = (_read_method(article, m, method, number, json_uri, folders, on_bad, report,
                         min_steps) for m, method in enumerate(article["methods"]))
    return [s for s in sets if s is not None]


def _read_method(article: dict[str, Any], m: int, method: dict[str, Any], number: int,
                 json_uri: str, folders: _ImageFolders, on_bad: OnBad, report: TaskReadReport,
                 min_steps: int) -> TaskSet | None:
    """One method → its ``TaskSet``, or None (counted in ``report``) when it is left out."""
    where = f"{json_uri}:{number} method {m}"
    steps = method["steps"]
    if len(steps) < min_steps:  # checked before any image is read
        report.skip("too few steps", f"{where}: {len(steps)} steps < min_steps={min_steps}")
        return None
    images: list[bytes] = []
    positions: list[int] = []
    step_ids: list[str] = []
    for k, step in enumerate(steps):
        step_id = step["step_id"].strip()
        found = folders.read(step_id)
        if found is None:
            report.skip("missing image", f"{where} step {k}: no {step_id}{IMAGE_SUFFIX} under "
                        f"{folders.describe()}")
            continue
        uri, data = found
        try:
            images.append(rgb_png(data, uri))
        except TaskDataError as err:
            if on_bad == "error":
                raise TaskDataError(f"{where} step {k} ({step_id}): {err}") from err
            report.skip("undecodable image", f"{where} step {k}: {err}")
            continue
        positions.append(k)
        step_ids.append(step_id)
    if len(images) < min_steps:
        report.skip("too few images", f"{where}: {len(images)} of {len(steps)} step images "
                    f"readable < min_steps={min_steps}")
        return None
    return TaskSet(
        set_id=vgsi_set_id(article.get("file_id"), number, m), images=images, image_ext="png",
        caption=vgsi_caption(article["goal"], method.get("name")),
        position=np.asarray(positions, dtype=np.int64),
        source={"json": json_uri, "line": number, "method": m, "file_id": article.get("file_id"),
                "step_ids": step_ids})
