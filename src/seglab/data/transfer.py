"""Exports that are not a folder yet, made one once and then read as any export folder (seglab.data.sources), with
their mask and image caches beside them as for any folder:
- data.root=<export>.zip: unpacked safely into the exports cache;
- data.roboflow=<workspace>/<project>/<version>: downloaded through the official roboflow package.

The cache lives under ~/.cache/seglab ($XDG_CACHE_HOME; data.exports_dir to move it), not beside the zip: a zip
often sits where nothing may be written (a shared dataset folder, a read-only mount), the same export is often found
in several places (Downloads, a project folder), and a download has no folder of its own. Zips are keyed by their
content (SHA-256), not their name or place: the same export copied, renamed or downloaded again is unpacked once,
and a changed export under the old name is unpacked anew."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from seglab.atomic import building_folder, locked
from seglab.data.sources import ANNOTATION_NAMES, find_export
from seglab.errors import SeglabError, first_line, without_secrets

log = logging.getLogger(__name__)

# RoboFlow's export formats with segmentation labels: COCO polygons/RLE, and Semantic Segmentation Masks.
ROBOFLOW_FORMATS = ("coco-segmentation", "png-mask-semantic", "yolov8")
# Exports are JPEGs and PNGs (already compressed) and JSON (a few times smaller zipped): a zip whose files would
# take 100 times its own size is a zip bomb, not an export.
MAX_EXPANSION = 100
DIGEST_CHARS = 16  # of the SHA-256 in hex: 64 bits, no collision among the exports of one machine


def default_exports_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seglab"


def resolve_root(
    root: str | Path,
    exports_dir: str | Path | None = None,
    roboflow: str | None = None,
    roboflow_format: str = "coco-segmentation",
) -> Path:
    """The folder to read the data from: the downloaded RoboFlow version if `roboflow` names one, else data.root
    itself, or for a .zip its unpacked copy."""
    cache = Path(exports_dir).expanduser() if exports_dir else default_exports_dir()
    if roboflow:
        return roboflow_export(str(roboflow), roboflow_format, cache)
    root = Path(root)
    return unpack_export(root, cache) if root.is_file() else root


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def unpack_export(archive: Path, exports_dir: Path) -> Path:
    """The export folder inside the unpacked copy of `archive`, unpacking it first if no earlier run did."""
    target = exports_dir / "exports" / file_digest(archive)[:DIGEST_CHARS]
    if not target.is_dir():
        with locked(target):
            if not target.is_dir():  # another process may have unpacked it while this one waited
                with building_folder(target) as tmp:
                    tmp.mkdir()
                    extract_safely(archive, tmp)
                    if find_export(tmp) is None:
                        raise SeglabError(no_export_message(archive, tmp))
                log.info("data.root=%s: unpacked into %s", archive, target)
    folder = find_export(target)
    if folder is None:  # someone changed the cache by hand
        raise SeglabError(
            f"{target} (the unpacked copy of {archive}) no longer holds the export. Delete {target} "
            "and run again to unpack it anew."
        )
    return folder


def no_export_message(archive: str | Path, unpacked: Path) -> str:
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in unpacked.iterdir())
    return (
        f"{archive} holds no RoboFlow export: expected train/ valid/ test/ folders (COCO Segmentation or Semantic "
        f"Segmentation Masks) or a COCO annotation file ({', '.join(ANNOTATION_NAMES)}) at its top level or in "
        f"its one folder; it holds {', '.join(found[:8]) or 'nothing'}{' ...' if len(found) > 8 else ''}. "
        "Export the dataset from RoboFlow in one of those formats."
    )


def extract_safely(archive: Path, dest: Path) -> None:
    """Every entry of `archive` into `dest`, after refusing a zip with an entry that would be written outside
    `dest`, a symbolic link, a password, or more unpacked bytes than a real export has or the disk holds."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for member in members:
                check_member(archive, member)
            total = sum(m.file_size for m in members)
            if total > MAX_EXPANSION * max(archive.stat().st_size, 1):
                raise SeglabError(
                    f"{archive} would unpack to {total:,} bytes, more than {MAX_EXPANSION} times its "
                    "own size: it is not an export (a zip bomb?). Download the export again from "
                    "RoboFlow."
                )
            free = shutil.disk_usage(dest).free
            if total > free:
                raise SeglabError(
                    f"{archive} unpacks to {total:,} bytes; {dest.parent} has {free:,} free. Free "
                    "space, or set data.exports_dir to a folder on a larger disk."
                )
            zf.extractall(dest)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise SeglabError(
            f"{archive} is not a zip archive that can be read ({first_line(e)}). Download the export "
            "from RoboFlow again, or point data.root at the unpacked folder."
        ) from None


def check_member(archive: Path, member: zipfile.ZipInfo) -> None:
    name = member.filename.replace("\\", "/")  # zips made on Windows may separate folders with backslashes
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (parts and re.match(r"[A-Za-z]:", parts[0])) or ".." in parts:
        problem = "would be written outside the folder it is unpacked into"
    elif stat.S_ISLNK(member.external_attr >> 16):  # the Unix mode, as zip -y stores a link
        problem = "is a symbolic link"
    elif member.flag_bits & 0x1:
        problem = "is encrypted"
    else:
        return
    raise SeglabError(
        f"{archive}: entry {member.filename!r} {problem}; an export never holds such an entry, so the "
        "zip is not unpacked. Download the export again from RoboFlow."
    )


def roboflow_export(spec: str, fmt: str, exports_dir: Path) -> Path:
    """The export folder of a RoboFlow project's version, downloaded if no earlier run did. A version is a frozen
    snapshot (new images or labels make a new version), so a downloaded one never goes stale: later runs read it
    without any request, also offline."""
    match = re.fullmatch(r"([\w.-]+)/([\w.-]+)/(\d+)", spec.strip("/"))
    if match is None:
        raise SeglabError(
            f"data.roboflow={spec!r} is not <workspace>/<project>/<version>, the last parts of the "
            "version's address app.roboflow.com/<workspace>/<project>/<version>, e.g. acme/potholes/3."
        )
    if fmt not in ROBOFLOW_FORMATS:
        raise SeglabError(
            f"data.roboflow_format={fmt!r} is not one of {ROBOFLOW_FORMATS}: RoboFlow's export formats "
            "with segmentation labels (COCO Segmentation, Semantic Segmentation Masks, YOLOv8 "
            "Segmentation)."
        )
    workspace, project, version = match.groups()
    target = exports_dir / "roboflow" / workspace / project / f"{version}-{fmt}"
    if not target.is_dir():
        with locked(target):
            if not target.is_dir():
                with building_folder(target) as tmp:
                    download_version(workspace, project, int(version), fmt, tmp)
                    if find_export(tmp) is None:
                        raise SeglabError(no_export_message(f"RoboFlow's {fmt} export of {spec}", tmp))
                log.info("data.roboflow=%s: downloaded into %s", spec, target)
    folder = find_export(target)
    if folder is None:
        raise SeglabError(
            f"{target} (the download of data.roboflow={spec}) no longer holds the export. Delete "
            f"{target} and run again to download it anew."
        )
    return folder


def download_version(workspace: str, project: str, version: int, fmt: str, location: Path) -> None:
    """Version `version` of the project as `fmt` into `location` (which the roboflow package creates), through the
    package's own calls, with its API key lookup: ROBOFLOW_API_KEY, else what `roboflow login` saved."""
    name = f"data.roboflow={workspace}/{project}/{version}"

    def download(handle) -> None:
        versions = sorted(int(v["id"].rsplit("/", 1)[-1]) for v in handle.get_version_information())
        if version not in versions:
            raise SeglabError(
                f"{name}: project {workspace}/{project} has no version {version}; its versions: "
                f"{', '.join(map(str, versions)) or 'none yet (generate one on app.roboflow.com)'}."
            )
        handle.version(version).download(fmt, location=str(location))

    with_project(
        name,
        workspace,
        project,
        download,
        f"RoboFlow did not export version {version} as {fmt}",
        "Export the version in that format on app.roboflow.com, or choose the other "
        f"data.roboflow_format ({', '.join(ROBOFLOW_FORMATS)}).",
    )


def upload_images(spec: str, items: list[tuple[Path, str]], batch_name: str) -> int:
    """Each image with its pre-annotation (a COCO file's text holding that image only) into RoboFlow project
    `spec` = <workspace>/<project>, as predictions (RoboFlow shows them to correct; they join no dataset version
    until accepted), in one upload batch. Returns the number uploaded."""
    parts = spec.split("/")
    if len(parts) != 2 or not all(parts):
        raise SeglabError(
            f"upload={spec!r} is not <workspace>/<project>: the parts of the project's address "
            "app.roboflow.com/<workspace>/<project>."
        )
    name = f"upload={spec}"

    def upload(handle) -> None:
        for image, coco_text in items:
            handle.single_upload(
                image_path=str(image),
                annotation_path={"name": f"{image.stem}.coco.json", "rawText": coco_text},
                batch_name=batch_name,
                is_prediction=True,
            )

    with_project(
        name,
        *parts,
        upload,
        "RoboFlow refused an image or its annotation",
        "Check the project's classes and quota on app.roboflow.com; images uploaded before this one "
        f"are in batch {batch_name!r}.",
    )
    return len(items)


def with_project(name: str, workspace: str, project: str, action, refused: str, fix: str) -> None:
    """action(project handle) for a segmentation project of RoboFlow's, through the roboflow package (API key:
    ROBOFLOW_API_KEY, else `roboflow login`'s), each failure one SeglabError naming what to fix, never the key."""
    try:
        import requests
        from roboflow import Roboflow
        from roboflow.adapters.rfapi import RoboflowError
        from roboflow.config import (
            API_URL,
            TYPE_INSTANCE_SEGMENTATION,
            TYPE_SEMANTIC_SEGMENTATION,
            load_roboflow_api_key,
        )
    except ImportError:
        raise SeglabError(f"{name} needs the roboflow package: pip install -r requirements.txt") from None

    api_key = load_roboflow_api_key(workspace)
    if not api_key:
        raise SeglabError(
            f"{name}: no RoboFlow API key. Set ROBOFLOW_API_KEY to your key (app.roboflow.com, "
            "Settings, API Keys) or run `roboflow login` once."
        )
    key_source = "ROBOFLOW_API_KEY" if os.environ.get("ROBOFLOW_API_KEY") else "`roboflow login`"
    address = "The workspace and project are the parts of the project's address app.roboflow.com/<workspace>/<project>."
    refusals = {
        "key": (
            f"RoboFlow refused the API key from {key_source}",
            "Copy the key again from app.roboflow.com (Settings, API Keys) or run `roboflow login`.",
        ),
        "workspace": (f"RoboFlow has no workspace {workspace!r} that this API key can read", address),
        "project": (
            f"RoboFlow has no project {project!r} in workspace {workspace!r} that this API key can read",
            address,
        ),
        "action": (refused, fix),
    }
    step = "key"
    try:
        client = Roboflow(api_key=api_key)
        step = "workspace"
        handle = client.workspace(workspace)
        step = "project"
        handle = handle.project(project)
        if handle.type not in (TYPE_INSTANCE_SEGMENTATION, TYPE_SEMANTIC_SEGMENTATION):
            raise SeglabError(
                f"{name}: {workspace}/{project} is a RoboFlow {handle.type} project: it holds no "
                f"segmentation labels. Use an {TYPE_INSTANCE_SEGMENTATION} or "
                f"{TYPE_SEMANTIC_SEGMENTATION} project."
            )
        step = "action"
        action(handle)
    except requests.RequestException as e:  # its message holds the request's URL, and the URL the key
        raise SeglabError(
            f"{name}: cannot reach RoboFlow at {API_URL} ({without_secrets(first_line(e), api_key)}). "
            "Connect to the network; a downloaded version is read from the exports cache without "
            "one."
        ) from None
    except (RoboflowError, RuntimeError, ValueError, KeyError, OSError) as e:
        what, how = refusals[step]
        raise SeglabError(f"{name}: {what}: {without_secrets(roboflow_message(e), api_key)}. {how}") from None
    except Exception as e:  # noqa: BLE001 - the package's upload errors (ImageUploadError, AnnotationSaveError...)
        if step != "action" or isinstance(e, SeglabError):
            raise
        raise SeglabError(f"{name}: {refused}: {without_secrets(roboflow_message(e), api_key)}. {fix}") from None


def roboflow_message(error: Exception) -> str:
    """The message in RoboFlow's JSON error body ({"error": {"message": ...}}), which the roboflow package passes
    on as the exception's text; else the exception's first line."""
    try:
        body = json.loads(str(error))
    except ValueError:
        return first_line(error).rstrip(".")
    inner = body.get("error", body) if isinstance(body, dict) else body
    return str(inner.get("message", inner) if isinstance(inner, dict) else inner).rstrip(".")
