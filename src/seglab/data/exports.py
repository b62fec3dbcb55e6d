"""data.root as a RoboFlow export .zip: unpacked once into the exports cache, then read from there as any export
folder (seglab.data.sources); its mask and image caches live beside it as for any folder.

The cache is keyed by the zip's content (SHA-256), not its name or place: the same export copied, renamed or
downloaded again is unpacked once, and a changed export under the old name is unpacked anew. It lives under
~/.cache/seglab ($XDG_CACHE_HOME; data.exports_dir to move it), not beside the zip, because a zip often sits
where nothing may be written (a shared dataset folder, a read-only mount) and the same export is often found in
several places (Downloads, a project folder)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from seglab.data.sources import ANNOTATION_NAMES, find_export
from seglab.errors import SeglabError, first_line
from seglab.files import building_folder, locked

log = logging.getLogger(__name__)

# Exports are JPEGs and PNGs (already compressed) and JSON (a few times smaller zipped): a zip whose files would
# take 100 times its own size is a zip bomb, not an export.
MAX_EXPANSION = 100
DIGEST_CHARS = 16  # of the SHA-256 in hex: 64 bits, no collision among the exports of one machine


def default_exports_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seglab"


def resolve_root(root: str | Path, exports_dir: str | Path | None = None) -> Path:
    """The folder to read data.root from: itself, or for a .zip its unpacked copy in the exports cache."""
    root = Path(root)
    if root.is_file():
        return unpack_export(root, Path(exports_dir).expanduser() if exports_dir else default_exports_dir())
    return root


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
        raise SeglabError(f"{target} (the unpacked copy of {archive}) no longer holds the export. Delete {target} "
                          "and run again to unpack it anew.")
    return folder


def no_export_message(archive: Path, unpacked: Path) -> str:
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in unpacked.iterdir())
    return (f"{archive} holds no RoboFlow export: expected train/ valid/ test/ folders (COCO Segmentation or Semantic "
            f"Segmentation Masks) or a COCO annotation file ({', '.join(ANNOTATION_NAMES)}) at its top level or in "
            f"its one folder; it holds {', '.join(found[:8]) or 'nothing'}{' ...' if len(found) > 8 else ''}. "
            "Export the dataset from RoboFlow in one of those formats.")


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
                raise SeglabError(f"{archive} would unpack to {total:,} bytes, more than {MAX_EXPANSION} times its "
                                  "own size: it is not an export (a zip bomb?). Download the export again from "
                                  "RoboFlow.")
            free = shutil.disk_usage(dest).free
            if total > free:
                raise SeglabError(f"{archive} unpacks to {total:,} bytes; {dest.parent} has {free:,} free. Free "
                                  "space, or set data.exports_dir to a folder on a larger disk.")
            zf.extractall(dest)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise SeglabError(f"{archive} is not a zip archive that can be read ({first_line(e)}). Download the export "
                          "from RoboFlow again, or point data.root at the unpacked folder.") from None


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
    raise SeglabError(f"{archive}: entry {member.filename!r} {problem}; an export never holds such an entry, so the "
                      "zip is not unpacked. Download the export again from RoboFlow.")
