"""Which samples are copies of one photo, and which photos look alike. Every split seglab makes keeps a copy
group on one side, so a test image is never a copy of a training image (RoboFlow's augmentation step writes
each training photo 2-3 times); look-alikes (consecutive video frames, burst shots) are different photos that
share most of their pixels: reported, kept together by a split by scene, and left out of the "unseen" score.

A *copy* is the same photo. Any of these signals puts two files in one copy group (a union, so copies of
copies join too):
- names: RoboFlow's `images[].extra.name` (the uploaded file), else the file name before `.rf.`
  (`IMG_1_jpg.rf.<hash>.jpg`), in both export formats;
- content: identical bytes;
- only between files that have no RoboFlow name to go by:
  - look, by a perceptual hash (imagehash's DCT hash of the grayscale image, against each of the 8 flips and
    quarter turns of the other): re-encoded, resized, flipped, rotated by 90 degrees, brightened, blurred,
    noisy or grayscale copies, within `hash_distance` of 64 bits;
  - look, by local features (OpenCV's SIFT, matched and checked with an affine RANSAC): cropped, rotated and
    sheared copies, which move every pixel and defeat a global hash. `features: auto` runs it when some file
    has no RoboFlow name.
Files with different RoboFlow names are never copies, however alike they look: they were uploaded as two photos.

A *look-alike* is another photo within `lookalike_distance` hash bits, compared as photographed (no flips or
turns), or, for files with a RoboFlow name, matched by features. Look-alikes form *scenes*, bounded so that they
never chain through a video: copy groups are taken in name order and each joins the nearest scene centre within
`lookalike_distance` bits, or starts a scene of its own; so every photo of a scene is a look-alike of its centre
(docs/data.md).
Fingerprints are cached per file content under <cache_dir>/groups; the feature links per set of files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import imagehash
import numpy as np
from PIL import Image

from seglab.atomic import replacing
from seglab.data.masks import forked_map
from seglab.data.sources import Sample
from seglab.errors import SeglabError

log = logging.getLogger(__name__)

ROBOFLOW_MARKER = ".rf."
FEATURE_MODES = ("auto", True, False)
SPLIT_UNITS = ("photo", "scene")
DIHEDRAL = (
    None,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)
HASH_INPUT = 128  # the grayscale image is read at about this long side, then area-averaged to 32 x 32 (what
HASH_SIDE = 32  # the DCT hash reads): area averaging onto a square commutes with flips and quarter turns
FEATURE_SIDE = 384  # SIFT on the image with this long side: copies' shared detail survives, and it stays cheap
FEATURES_PER_IMAGE = 150
CANDIDATES = 6  # images per image whose features are checked pair by pair, by votes of nearest descriptors
MIN_VOTES = 3
RATIO = 0.8  # Lowe's ratio test
# Copies are near-similar maps of each other: an affine fit that stretches by more than this is a false match.
MAX_STRETCH = 2.0
PARALLEL_FROM = 32
# Part of every cache key: fingerprints computed another way are computed again.
FINGERPRINT_KEY = f"v2-{HASH_INPUT}-{HASH_SIDE}-{FEATURE_SIDE}-{FEATURES_PER_IMAGE}"
# An image this flat (grey-level standard deviation of its thumbnail) has no structure to hash: every uniform
# image gets the same hash. Only its bytes can tell its copies.
FLAT_STD = 2.0


@dataclass
class Groups:
    of: dict[Path, str]  # image path -> copy group (the photo)
    links: dict[str, int] = field(default_factory=dict)  # signal -> pairs of files it joined
    scene_of: dict[Path, str] = field(default_factory=dict)  # image path -> scene (look-alike cluster)
    lookalikes: dict[str, set[str]] = field(default_factory=dict)  # copy group -> its look-alike groups

    def __post_init__(self) -> None:
        for path, group in self.of.items():
            self.scene_of.setdefault(path, group)

    def members(self) -> dict[str, list[Path]]:
        out: dict[str, list[Path]] = {}
        for path, group in sorted(self.of.items()):
            out.setdefault(group, []).append(path)
        return out

    def scenes(self) -> dict[str, list[str]]:
        """Scene -> its copy groups, for scenes of more than one photo."""
        out: dict[str, set[str]] = {}
        for path, scene in self.scene_of.items():
            out.setdefault(scene, set()).add(self.of[path])
        return {k: sorted(v) for k, v in sorted(out.items()) if len(v) > 1}

    def unit(self, by: str) -> dict[Path, str]:
        """What a split keeps on one side: the copy groups ("photo") or the scenes ("scene")."""
        if by not in SPLIT_UNITS:
            raise SeglabError(f"data.split_by={by!r} is not one of {SPLIT_UNITS}.")
        return self.of if by == "photo" else self.scene_of

    def neighbours(self, by: str) -> dict[str, set[str]]:
        """Look-alike links between the units of `by` (photos or scenes), for splits that keep neighbours together."""
        unit = self.unit(by)
        of_group = {self.of[p]: unit[p] for p in self.of}
        out: dict[str, set[str]] = {}
        for group, near in self.lookalikes.items():
            for other in near:
                if of_group[group] != of_group[other]:
                    out.setdefault(of_group[group], set()).add(of_group[other])
        return out

    def seen_in(self, paths) -> set[str]:
        """Copy groups that `paths` hold, or that are look-alikes of them or share their scene."""
        groups = {self.of[p] for p in paths}
        scenes = {self.scene_of[p] for p in paths}
        near = {n for g in groups for n in self.lookalikes.get(g, ())}
        return groups | near | {g for p, g in self.of.items() if self.scene_of[p] in scenes}


def normalised(name: str) -> str:
    """RoboFlow turns `IMG 1.JPG` into `IMG-1_JPG.rf.<hash>.jpg`: compare names by their letters and digits."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def name_key(sample: Sample) -> str | None:
    if sample.original_name:
        return normalised(sample.original_name)
    if ROBOFLOW_MARKER in sample.image.name:
        return normalised(sample.image.name.split(ROBOFLOW_MARKER)[0])
    return None


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True


def phash_variants(gray: Image.Image) -> list[int]:
    """The 64-bit DCT hash of the image under each of the 8 flips and quarter turns."""
    return [int(str(imagehash.phash(gray if t is None else gray.transpose(t))), 16) for t in DIHEDRAL]


def read_gray(path: Path | io.BytesIO, side: int) -> np.ndarray:
    """Grayscale with the long side at `side` (JPEGs decoded at a reduced scale, much faster than in full)."""
    with Image.open(path) as im:
        im.draft("L", (side, side))
        gray = np.asarray(im.convert("L"))
    scale = side / max(gray.shape)
    if scale < 1:
        gray = cv2.resize(
            gray,
            (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale))),
            interpolation=cv2.INTER_AREA,
        )
    return gray


def sift_features(gray: np.ndarray) -> dict[str, np.ndarray]:
    """Keypoints and RootSIFT descriptors of the image and of its mirror image (SIFT is not mirror-invariant)."""
    sift = cv2.SIFT_create(nfeatures=FEATURES_PER_IMAGE)
    out = {}
    for name, view in (("", gray), ("mirror_", np.ascontiguousarray(gray[:, ::-1]))):
        keypoints, desc = sift.detectAndCompute(view, None)
        desc = np.zeros((0, 128), np.float32) if desc is None else desc
        desc = np.sqrt(desc / (desc.sum(axis=1, keepdims=True) + 1e-7))
        out[name + "points"] = np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2)
        out[name + "desc"] = desc.astype(np.float16)
    return out


def fingerprint(path: Path, features: bool, cache: Path) -> dict:
    """sha1 of the bytes and the 8 hashes; with features, SIFT's written to <cache>/features/<sha1>.npz."""
    data = path.read_bytes()
    sha = hashlib.sha1(data).hexdigest()
    try:
        gray = read_gray(io.BytesIO(data), HASH_INPUT)
    except OSError as e:
        raise SeglabError(f"Image file {path} is unreadable ({e}). Re-export or remove it.") from None
    flat = float(gray.std()) < FLAT_STD
    square = cv2.resize(gray, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA)
    out = {"sha1": sha, "phash": None if flat else [f"{h:016x}" for h in phash_variants(Image.fromarray(square))]}
    feature_file = feature_path(cache, sha)
    if features and not feature_file.is_file():
        feature_file.parent.mkdir(parents=True, exist_ok=True)
        with replacing(feature_file) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **sift_features(read_gray(path, FEATURE_SIDE)))
    return out


def feature_path(cache: Path, sha: str) -> Path:
    return cache / "features" / f"{sha}-{FINGERPRINT_KEY}.npz"


def _fingerprint_job(job: tuple[Path, bool, Path]) -> dict:
    return fingerprint(*job)


def fingerprints(paths: Sequence[Path], features: bool, cache: Path, workers: int) -> list[dict]:
    """Per file, from <cache>/index.json where the file's size and modification time are unchanged."""
    index_file = cache / "index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    stats = [p.stat() for p in paths]
    keys = [f"{p}|{s.st_size}|{s.st_mtime_ns}|{FINGERPRINT_KEY}" for p, s in zip(paths, stats, strict=True)]
    missing = [
        i
        for i, k in enumerate(keys)
        if k not in index or features and not feature_path(cache, index[k]["sha1"]).is_file()
    ]
    results = forked_map(_fingerprint_job, [(paths[i], features, cache) for i in missing], workers, PARALLEL_FROM)
    for i, result in zip(missing, results, strict=True):
        index[keys[i]] = result
    if missing:
        cache.mkdir(parents=True, exist_ok=True)
        with replacing(index_file) as tmp:
            Path(tmp).write_text(json.dumps(index))
        log.info("Fingerprinted %d image(s) for copy detection into %s", len(missing), cache)
    return [index[k] for k in keys]


def hash_links(variants: np.ndarray, distance: int) -> list[tuple[int, int, int]]:
    """Pairs (i < j, bits) whose hashes are within `distance` bits: each image as it is against each of the
    other's variants (n, k): all 8 flips and quarter turns, or k=1, the image as it is."""
    n, k = variants.shape
    pairs = []
    for start in range(0, n, 256):
        block = variants[start : start + 256, :1] ^ variants[None, :, :].reshape(1, -1)
        bits = np.bitwise_count(block).reshape(len(block), n, k).min(axis=2)
        for a, b in zip(*np.nonzero(bits <= distance), strict=True):
            if start + a < b:
                pairs.append((int(start + a), int(b), int(bits[a, b])))
    return pairs


def bounded_scenes(groups: list[str], near: dict[str, dict[str, int]]) -> dict[str, str]:
    """Copy group -> scene. Groups in name order each join the nearest existing centre among their look-alikes
    (ties: the earlier centre), else become a centre: every member is a look-alike of its scene's centre, so a
    scene never chains through a video however alike each frame is to the next."""
    scene: dict[str, str] = {}
    for group in sorted(groups):
        centres = [(bits, centre) for centre, bits in near.get(group, {}).items() if scene.get(centre) == centre]
        scene[group] = min(centres)[1] if centres else group
    return scene


def affine_inliers(a: dict, b: dict, mirror: bool, matcher) -> int:
    """Matches of `a` (or its mirror image) in `b` that one near-similar affine map explains."""
    points_a, desc_a = a["mirror_points" if mirror else "points"], a["mirror_desc" if mirror else "desc"]
    if len(desc_a) < 3 or len(b["desc"]) < 3:
        return 0
    pairs = matcher.knnMatch(desc_a.astype(np.float32), b["desc"].astype(np.float32), k=2)
    good = [m for m, n in (p for p in pairs if len(p) == 2) if m.distance < RATIO * n.distance]
    if len(good) < 3:
        return 0
    source = points_a[[m.queryIdx for m in good]]
    target = b["points"][[m.trainIdx for m in good]]
    matrix, inliers = cv2.estimateAffine2D(source, target, method=cv2.RANSAC, ransacReprojThreshold=3.0)
    if matrix is None or not np.isfinite(matrix).all():
        return 0
    stretch = np.linalg.svd(matrix[:, :2], compute_uv=False)
    if stretch.max() > MAX_STRETCH or stretch.min() < 1 / MAX_STRETCH:
        return 0
    return int(inliers.sum())


def feature_links(features: list[dict], min_inliers: int) -> list[tuple[int, int]]:
    """Pairs whose SIFT features one affine map explains: candidates by votes of nearest descriptors (FLANN),
    then each candidate pair checked with RANSAC. OpenCV's random generator is seeded: the same files give
    the same pairs."""
    owners = np.concatenate([np.full(len(f["desc"]), i) for i, f in enumerate(features)])
    if len(owners) == 0:
        return []
    cv2.setRNGSeed(0)
    index = cv2.FlannBasedMatcher({"algorithm": 1, "trees": 4}, {"checks": 32})
    pooled = np.concatenate([f["desc"] for f in features]).astype(np.float32)
    n = len(features)
    codes = []
    for key in ("desc", "mirror_desc"):
        queries = np.concatenate([f[key] for f in features]).astype(np.float32)
        query_owners = np.concatenate([np.full(len(f[key]), i) for i, f in enumerate(features)])
        for q, matches in enumerate(index.knnMatch(queries, pooled, k=5)):
            found = {int(owners[m.trainIdx]) for m in matches} - {int(query_owners[q])}
            codes += [int(query_owners[q]) * n + o for o in found]
    pair_codes, votes = np.unique(np.array(codes, np.int64), return_counts=True)
    votes_of: dict[tuple[int, int], int] = {}
    for code, count in zip(pair_codes.tolist(), votes.tolist(), strict=True):
        key = tuple(sorted(divmod(code, n)))
        votes_of[key] = votes_of.get(key, 0) + count
    best: dict[int, list[tuple[int, int]]] = {}
    for (i, j), count in votes_of.items():
        if count >= MIN_VOTES:
            best.setdefault(i, []).append((count, j))
            best.setdefault(j, []).append((count, i))
    candidates = sorted(
        {
            tuple(sorted((i, j)))
            for i, ranked in best.items()
            for _, j in sorted(ranked, key=lambda t: (-t[0], t[1]))[:CANDIDATES]
        }
    )
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    return [
        (i, j)
        for i, j in candidates
        if max(affine_inliers(features[i], features[j], m, matcher) for m in (False, True)) >= min_inliers
    ]


def cached_feature_links(shas: list[str], cache: Path, min_inliers: int) -> list[tuple[int, int]]:
    """feature_links for this set of files, cached by their contents: a later run over the same files reads
    the pairs instead of matching again (seconds for a few thousand images)."""
    order = sorted(range(len(shas)), key=lambda i: shas[i])
    key = hashlib.sha256(json.dumps([[shas[i] for i in order], min_inliers, FINGERPRINT_KEY]).encode()).hexdigest()[:20]
    links_file = cache / f"feature-links-{key}.json"
    if links_file.is_file():
        by_sha = json.loads(links_file.read_text())
    else:
        features = []
        for i in order:
            with np.load(feature_path(cache, shas[i])) as f:
                features.append(dict(f))
        by_sha = [[shas[order[a]], shas[order[b]]] for a, b in feature_links(features, min_inliers)]
        with replacing(links_file) as tmp:
            Path(tmp).write_text(json.dumps(by_sha))
    position = {}
    for i, sha in enumerate(shas):
        position.setdefault(sha, i)
    return [(position[a], position[b]) for a, b in by_sha]


def group_samples(
    samples: Sequence[Sample],
    cache: Path,
    root: Path | None = None,
    names: bool = True,
    hash_distance: int | None = 4,
    features: str | bool = "auto",
    min_inliers: int = 20,
    lookalike_distance: int | None = 10,
    workers: int = 1,
) -> Groups:
    """Copy groups and scenes of `samples`; a group without a RoboFlow name is named after its first file
    (relative to root)."""
    if features not in FEATURE_MODES:
        raise SeglabError(f"data.groups.features={features!r} is not one of auto, true, false.")
    for key, value in (("hash_distance", hash_distance), ("lookalike_distance", lookalike_distance)):
        if value is not None and not 0 <= int(value) <= 64:
            raise SeglabError(f"data.groups.{key}={value} must be 0-64 bits, or null (off).")
    samples = sorted(samples, key=lambda s: str(s.image))
    keys = [name_key(s) if names else None for s in samples]
    use_features = features is True or features == "auto" and any(k is None for k in keys)
    found = fingerprints([s.image for s in samples], use_features, cache, workers)
    union = UnionFind(len(samples))
    links = {"name": 0, "content": 0, "hash": 0, "features": 0}

    def join(signal: str, pairs) -> None:
        links[signal] += sum(union.union(a, b) for a, b in pairs)

    for signal, values in (("name", keys), ("content", [f["sha1"] for f in found])):
        first: dict[str, int] = {}
        join(signal, ((first.setdefault(v, i), i) for i, v in enumerate(values) if v is not None))
    # Look is evidence of a copy only where no RoboFlow name tells: otherwise it makes a look-alike.
    unnamed = [k is None for k in keys]
    near_pairs: list[tuple[int, int, int]] = []
    hashed = [i for i, f in enumerate(found) if f["phash"] is not None]
    variants = np.array([[int(h, 16) for h in found[i]["phash"]] for i in hashed], np.uint64).reshape(-1, len(DIHEDRAL))
    if hash_distance is not None:
        pairs = hash_links(variants, int(hash_distance))
        join("hash", ((hashed[a], hashed[b]) for a, b, _ in pairs if unnamed[hashed[a]] and unnamed[hashed[b]]))
    if lookalike_distance is not None:
        # Another photo of the scene as it was photographed: no flips or turns, which in brain scans or aerial
        # tiles would make unrelated photos look alike (RoboFlow's flipped copies are in the copy group anyway).
        near_pairs += [
            (hashed[a], hashed[b], bits) for a, b, bits in hash_links(variants[:, :1], int(lookalike_distance))
        ]
    if use_features:
        matched = cached_feature_links([f["sha1"] for f in found], cache, min_inliers)
        join("features", ((a, b) for a, b in matched if unnamed[a] and unnamed[b]))
        if lookalike_distance is not None:
            near_pairs += [(a, b, int(lookalike_distance)) for a, b in matched]

    # A group is named after its RoboFlow name when it has one, else after its first file's path (names never
    # hold a dot, so the two kinds cannot collide).
    members: dict[int, list[int]] = {}
    for i in range(len(samples)):
        members.setdefault(union.find(i), []).append(i)
    of = {}
    for indices in members.values():
        named = sorted(keys[i] for i in indices if keys[i] is not None)
        first = samples[indices[0]].image
        label = named[0] if named else str(first.relative_to(root) if root and first.is_relative_to(root) else first)
        of.update({samples[i].image: label for i in indices})

    near: dict[str, dict[str, int]] = {}
    for a, b, bits in near_pairs:
        ga, gb = of[samples[a].image], of[samples[b].image]
        if ga != gb:
            for x, y in ((ga, gb), (gb, ga)):
                near.setdefault(x, {})[y] = min(bits, near.get(x, {}).get(y, bits))
    links["look-alike"] = sum(len(v) for v in near.values()) // 2
    scene = bounded_scenes(sorted(set(of.values())), near)
    return Groups(of, links, {path: scene[group] for path, group in of.items()}, {g: set(v) for g, v in near.items()})
