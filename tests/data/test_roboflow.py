"""data.roboflow=<workspace>/<project>/<version>: downloaded once through the real roboflow package, from a server on
127.0.0.1 that answers as RoboFlow's API does (the package reads its address from API_URL), then read offline.

The package reads API_URL when it is imported, so each download runs in a fresh Python process, as a user's run does.
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from helpers import masks_by_name, zip_folder
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from seglab.data.datamodule import SegmentationDataModule
from seglab.data.synthetic import generate_dataset
from seglab.errors import SeglabError
from seglab.models.checkpoint import build_datamodule

API_KEY = "rf_test5Key9abc"  # the package treats a key without lower-case letters as a placeholder
# RoboFlow's name of each format -> the generator's
FORMATS = {"coco-segmentation": "coco", "png-mask-semantic": "masks", "yolov8": "yolo"}
PROJECTS = {"shapes": "instance-segmentation", "boxes": "object-detection"}
UNKNOWN = {
    "error": {
        "message": "Unsupported request. `GET {path}` does not exist or cannot be loaded due to missing permissions.",
        "type": "GraphMethodException",
    }
}


class RoboflowAPI(ThreadingHTTPServer):
    """Workspace `acme` with the projects in PROJECTS, each with version 1, exported in both FORMATS as the zips
    in `zips`. `requests` lists every request's method and path."""

    def __init__(self, zips: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.zips = zips
        self.requests: list[str] = []
        self.uploads: list[dict] = []  # images sent to POST /dataset/<project>/upload
        self.annotations: list[dict] = []  # annotation files sent to POST /dataset/<project>/annotate/<id>
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: RoboflowAPI

    def log_message(self, *args):  # the test reads server.requests instead
        pass

    def reply(self, status: int, body: dict | bytes, content_type: str = "application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def parse(self) -> tuple[list[str], str | None]:
        url = urlsplit(self.path)
        self.server.requests.append(f"{self.command} {url.path}")
        return [p for p in url.path.split("/") if p], parse_qs(url.query).get("api_key", [None])[0]

    def do_POST(self):  # roboflow.check_key: POST /?api_key=...; uploads: POST /dataset/<project>/upload|annotate
        parts, key = self.parse()
        if key != API_KEY:
            return self.reply(
                401,
                {"error": {"message": "This API key does not exist (or has been revoked).", "type": "OAuthException"}},
            )
        if not parts:
            return self.reply(200, {"workspace": "acme"})
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        query = parse_qs(urlsplit(self.path).query)
        if parts[0] == "dataset" and parts[2] == "upload":  # multipart: name, split, file
            image_id = f"img{len(self.server.uploads)}"
            name = re.search(rb'name="name"\r\n\r\n([^\r]*)', body).group(1).decode()
            self.server.uploads.append(
                {
                    "project": parts[1],
                    "id": image_id,
                    "name": name,
                    "batch": query.get("batch", [None])[0],
                    "bytes": len(body),
                }
            )
            return self.reply(200, {"success": True, "id": image_id})
        if parts[0] == "dataset" and parts[2] == "annotate":  # JSON: annotationFile, labelmap
            self.server.annotations.append(
                {
                    "project": parts[1],
                    "id": parts[3],
                    "name": query["name"][0],
                    "prediction": query.get("prediction", ["false"])[0],
                    "file": json.loads(json.loads(body)["annotationFile"]),
                }
            )
            return self.reply(200, {"success": True})
        return self.reply(404, {"error": {"message": f"POST {urlsplit(self.path).path} does not exist."}})

    def do_GET(self):
        parts, key = self.parse()
        if parts[0] == "dl":  # the export's download link: /dl/<project>/<version>/<format>.zip
            return self.reply(200, self.server.zips[parts[3].removesuffix(".zip")], "application/zip")
        if key != API_KEY:
            return self.reply(401, {"error": {"message": "This API key does not exist (or has been revoked)."}})
        if parts[0] != "acme" or len(parts) > 1 and parts[1] not in PROJECTS:
            message = UNKNOWN["error"]["message"].format(path=urlsplit(self.path).path)
            return self.reply(404, {"error": {**UNKNOWN["error"], "message": message}})
        if len(parts) == 1:  # Roboflow().workspace("acme")
            return self.reply(
                200,
                {
                    "workspace": {
                        "name": "Acme",
                        "url": "acme",
                        "members": [],
                        "projects": [project_info(p) for p in PROJECTS],
                    }
                },
            )
        project = parts[1]
        if len(parts) == 2:  # Workspace.project(...), Project.get_version_information()
            return self.reply(
                200,
                {
                    "workspace": {"name": "Acme", "url": "acme"},
                    "project": project_info(project),
                    "versions": [version_info(project)],
                },
            )
        if parts[2] != "1":
            return self.reply(404, {"error": {"message": f"Version {parts[2]} not found."}})
        if len(parts) == 3:  # Version.download waits while a version is still being generated
            return self.reply(200, {"version": {**version_info(project), "generating": False, "progress": 1.0}})
        if parts[3] not in FORMATS:  # the export: where to download the zip from
            return self.reply(400, {"error": {"message": f"Unsupported export format {parts[3]}."}})
        return self.reply(200, {"export": {"link": f"{self.server.url}/dl/{project}/1/{parts[3]}.zip"}})


def project_info(project: str) -> dict:
    return {
        "id": f"acme/{project}",
        "name": project,
        "type": PROJECTS[project],
        "annotation": "shapes",
        "classes": {"disc": 4, "triangle": 4},
        "colors": {},
        "created": 1.7e9,
        "updated": 1.7e9,
        "images": 10,
        "public": False,
        "splits": {"train": 8, "valid": 1, "test": 1},
        "unannotated": 0,
        "versions": 1,
    }


def version_info(project: str) -> dict:
    return {
        "id": f"acme/{project}/1",
        "name": project,
        "version": "1",
        "images": 10,
        "created": 1.7e9,
        "splits": {"train": 8, "valid": 1, "test": 1},
        "augmentation": {},
        "preprocessing": {},
        "exports": list(FORMATS),
    }


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """RoboFlow's name of each format -> the generated export folder the server serves zipped."""
    base = tmp_path_factory.mktemp("roboflow-exports")
    return {
        name: generate_dataset(base / fmt, num_images=10, size=32, seed=5, fmt=fmt) for name, fmt in FORMATS.items()
    }


@pytest.fixture
def api(exports, tmp_path):
    readme = {"README.roboflow.txt": b"Exported from roboflow.com"}  # beside train/ valid/ test/, as RoboFlow does
    zips = {
        name: zip_folder(folder, tmp_path / f"{name}.zip", extra=readme).read_bytes()
        for name, folder in exports.items()
    }
    server = RoboflowAPI(zips)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FETCH = """
import json, sys
from seglab.data.transfer import resolve_root
from seglab.errors import SeglabError
results = []
for spec, fmt in json.loads(sys.argv[2]):
    try:
        results.append(str(resolve_root("not-read", sys.argv[1], roboflow=spec, roboflow_format=fmt)))
    except SeglabError as e:
        results.append(f"SeglabError: {e}")
print(json.dumps(results))
"""


def fetch(
    tmp_path: Path, api_url: str, *wanted: tuple[str, str], api_key: str | None = API_KEY, login: dict | None = None
) -> list[str]:
    """resolve_root for each (data.roboflow, data.roboflow_format) in one new process -> folder or the error."""
    home = tmp_path / "home"  # the package also reads `roboflow login`'s config from ~/.config/roboflow
    (home / ".config" / "roboflow").mkdir(parents=True, exist_ok=True)
    if login is not None:
        (home / ".config" / "roboflow" / "config.json").write_text(json.dumps(login))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROBOFLOW_", "DATASET_DIRECTORY"))}
    env.update(API_URL=api_url, HOME=str(home), TQDM_DISABLE="1", **({"ROBOFLOW_API_KEY": api_key} if api_key else {}))
    proc = subprocess.run(
        [sys.executable, "-c", FETCH, str(tmp_path / "exports"), json.dumps(wanted)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def downloaded(tmp_path: Path) -> list[str]:
    """What the exports cache holds: <workspace>/<project>/<version>-<format>."""
    folder = tmp_path / "exports" / "roboflow"
    return (
        sorted(str(p.relative_to(folder)) for p in folder.glob("*/*/*") if p.is_dir() and not p.name.startswith("."))
        if folder.is_dir()
        else []
    )


def test_a_version_downloads_once_and_later_runs_read_it_offline(api, exports, tmp_path):
    # The API key from `roboflow login`'s config, as the package finds it when ROBOFLOW_API_KEY is not set.
    login = {"workspaces": {"acme": {"name": "Acme", "url": "acme", "apiKey": API_KEY}}, "RF_WORKSPACE": "acme"}
    versions = [("acme/shapes/1", name) for name in FORMATS]
    folders = fetch(tmp_path, api.url, *versions, api_key=None, login=login)
    cache = tmp_path / "exports" / "roboflow" / "acme" / "shapes"
    assert folders == [str(cache / "1-coco-segmentation"), str(cache / "1-png-mask-semantic"), str(cache / "1-yolov8")]
    # The key, the workspace, the project (its type), its versions (twice: seglab's check, then the package's),
    # whether the version is still being generated, the export's link, the zip.
    coco_requests = [
        "POST /",
        "GET /acme",
        "GET /acme/shapes",
        "GET /acme/shapes",
        "GET /acme/shapes",
        "GET /acme/shapes/1",
        "GET /acme/shapes/1/coco-segmentation",
        "GET /dl/shapes/1/coco-segmentation.zip",
    ]
    assert api.requests[: len(coco_requests)] == coco_requests
    assert len(api.requests) == 3 * len(coco_requests)
    assert not (cache / "1-coco-segmentation" / "roboflow.zip").exists()  # the package unpacks and removes it

    # A later run, offline (nothing listens at API_URL) and without a key: the cached copy, no request at all.
    api.shutdown()
    offline = f"http://127.0.0.1:{closed_port()}"
    assert fetch(tmp_path, offline, *versions, api_key=None) == folders
    assert len(api.requests) == 3 * len(coco_requests)
    assert downloaded(tmp_path) == [
        "acme/shapes/1-coco-segmentation",
        "acme/shapes/1-png-mask-semantic",
        "acme/shapes/1-yolov8",
    ]

    # The datamodule reads each download exactly as the export folder it came from (data.root is not read).
    for name, folder in exports.items():
        dm = SegmentationDataModule(
            root="not-read",
            roboflow="acme/shapes/1",
            roboflow_format=name,
            exports_dir=str(tmp_path / "exports"),
            image_size=32,
            num_workers=0,
            batch_size=2,
        )
        reference = SegmentationDataModule(
            root=str(folder), cache_dir=str(tmp_path / f"cache-{name}"), image_size=32, num_workers=0, batch_size=2
        )
        dm.setup()
        reference.setup()
        assert dm.root == cache / f"1-{name}"
        assert (
            dm.source.layout
            == reference.source.layout
            == {"coco": "roboflow_coco", "masks": "roboflow_masks", "yolo": "roboflow_yolo"}[FORMATS[name]]
        )
        assert dm.class_names == reference.class_names == ["background", "disc", "triangle"]
        assert {k: [dm.relative(s.image) for s in v] for k, v in dm.splits.items()} == {
            k: [reference.relative(s.image) for s in v] for k, v in reference.splits.items()
        }
        ours, theirs = masks_by_name(dm), masks_by_name(reference)
        assert sorted(ours) == sorted(theirs) and len(ours) == 10
        assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)


def test_each_failure_is_one_error_that_says_what_to_fix(api, tmp_path):
    errors = fetch(
        tmp_path,
        api.url,
        ("nobody/shapes/1", "coco-segmentation"),
        ("acme/nothing/1", "coco-segmentation"),
        ("acme/shapes/7", "coco-segmentation"),
        ("acme/boxes/1", "coco-segmentation"),
        ("acme/shapes/1", "createml"),
        ("acme/shapes", "coco-segmentation"),
    )
    assert errors[0].startswith(
        "SeglabError: data.roboflow=nobody/shapes/1: RoboFlow has no workspace 'nobody' that "
        "this API key can read: Unsupported request. `GET /nobody` does not exist or cannot "
        "be loaded due to missing permissions. The workspace and project are"
    )
    assert errors[0].endswith(
        "The workspace and project are the parts of the project's address app.roboflow.com/<workspace>/<project>."
    )
    assert errors[1].startswith(
        "SeglabError: data.roboflow=acme/nothing/1: RoboFlow has no project 'nothing' in "
        "workspace 'acme' that this API key can read: Unsupported request."
    )
    assert (
        errors[2] == "SeglabError: data.roboflow=acme/shapes/7: project acme/shapes has no version 7; its versions: 1."
    )
    assert (
        errors[3] == "SeglabError: data.roboflow=acme/boxes/1: acme/boxes is a RoboFlow object-detection "
        "project: it holds no segmentation labels. Use an instance-segmentation or "
        "semantic-segmentation project."
    )
    assert (
        errors[4] == "SeglabError: data.roboflow_format='createml' is not one of ('coco-segmentation', "
        "'png-mask-semantic', 'yolov8'): RoboFlow's export formats with segmentation labels (COCO "
        "Segmentation, Semantic Segmentation Masks, YOLOv8 Segmentation)."
    )
    assert errors[5].startswith("SeglabError: data.roboflow='acme/shapes' is not <workspace>/<project>/<version>")
    assert "GET /dl/boxes/1/coco-segmentation.zip" not in api.requests  # refused before any download
    assert downloaded(tmp_path) == []

    [wrong_key] = fetch(tmp_path, api.url, ("acme/shapes/1", "coco-segmentation"), api_key="rf_wrong7key")
    assert (
        wrong_key == "SeglabError: data.roboflow=acme/shapes/1: RoboFlow refused the API key from "
        "ROBOFLOW_API_KEY: This API key does not exist (or has been revoked). Copy the key again "
        "from app.roboflow.com (Settings, API Keys) or run `roboflow login`."
    )
    [no_key] = fetch(tmp_path, api.url, ("acme/shapes/1", "coco-segmentation"), api_key=None)
    assert (
        no_key == "SeglabError: data.roboflow=acme/shapes/1: no RoboFlow API key. Set ROBOFLOW_API_KEY to your "
        "key (app.roboflow.com, Settings, API Keys) or run `roboflow login` once."
    )
    offline = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    [no_network] = fetch(tmp_path, offline, ("acme/shapes/1", "coco-segmentation"))
    assert no_network.startswith(f"SeglabError: data.roboflow=acme/shapes/1: cannot reach RoboFlow at {offline} (")
    assert no_network.endswith(
        "Connect to the network; a downloaded version is read from the exports cache without one."
    )
    assert time.monotonic() - started < 60
    assert downloaded(tmp_path) == []


def test_evaluate_on_another_root_does_not_read_the_runs_roboflow_version(
    exports, compose_train, tmp_path, monkeypatch
):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no `roboflow login` config, and no key:
    monkeypatch.delenv("ROBOFLOW_API_KEY", raising=False)  # a download would fail before any request
    folder = exports["coco-segmentation"]
    cfg = compose_train("data.roboflow=acme/shapes/1", f"data.exports_dir={tmp_path / 'exports'}")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    checkpoint = types.SimpleNamespace(  # what build_datamodule reads from a checkpoint
        meta={"config": {"data": data}, "image_size": 32, "base_size": 64, "mean": data["mean"], "std": data["std"]},
        class_names=["background", "disc", "triangle"],
        ignore_index=255,
    )
    evaluate_cfg = OmegaConf.create({"data": {"root": str(folder)}, "paths": {"output_dir": str(tmp_path)}})
    assert build_datamodule(checkpoint, "best.ckpt", dict(evaluate_cfg.data)).root == folder
    evaluate_cfg.data.root = None  # the run's own data: its RoboFlow version, which is not in the cache
    with pytest.raises(InstantiationException) as e:  # Hydra's wrapper; the scripts print the SeglabError inside
        build_datamodule(checkpoint, "best.ckpt", dict(evaluate_cfg.data))
    assert isinstance(e.value.__cause__, SeglabError)
    assert str(e.value.__cause__).startswith("data.roboflow=acme/shapes/1: no RoboFlow API key")


def test_the_api_key_appears_in_no_message_log_or_file_of_a_failed_run(api, tmp_path):
    """train.py with data.roboflow as a user runs it, the key in ROBOFLOW_API_KEY: offline (the request's URL, key
    in its query, is in the library's exception), with the key refused, and as a sweep's job (its error goes into
    train.log and metrics.json). Nothing printed or written holds the key."""
    home = tmp_path / "home"
    (home / ".config" / "roboflow").mkdir(parents=True)
    root = Path(__file__).resolve().parents[2]
    offline = f"http://127.0.0.1:{closed_port()}"
    for name, url, key, sweep in (
        ("offline", offline, API_KEY, False),
        ("sweep", offline, API_KEY, True),
        ("refused", api.url, "rf_wrong7Secretkey", False),
    ):
        run_dir = tmp_path / name
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROBOFLOW_")}
        env.update(API_URL=url, HOME=str(home), TQDM_DISABLE="1", ROBOFLOW_API_KEY=key)
        where = ["-m", f"hydra.sweep.dir={run_dir}", "seed=1"] if sweep else [f"hydra.run.dir={run_dir}"]
        proc = subprocess.run(
            [
                sys.executable,
                str(root / "train.py"),
                *where,
                "data.roboflow=acme/shapes/1",
                f"data.exports_dir={tmp_path / 'exports'}",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        written = {
            str(p.relative_to(run_dir)): p.read_bytes().decode(errors="replace")
            for p in run_dir.rglob("*")
            if p.is_file()
        }
        error = "RoboFlow refused the API key" if name == "refused" else f"cannot reach RoboFlow at {url} ("
        if sweep:  # the failed job is recorded, the sweep goes on
            assert proc.returncode == 0, proc.stderr[-2000:]
            job = "0_roboflow=acme-shapes-1,seed=1"
            assert error in written[f"{job}/train.log"] and "leaderboard.md" in written
            assert error in json.loads(written[f"{job}/metrics.json"])["error"]
            assert "/?api_key=***" in written[f"{job}/train.log"]  # the URL is there, its key hidden
        else:
            assert proc.returncode == 1 and error in proc.stderr
            assert {"train.log", ".hydra/config.yaml", ".hydra/overrides.yaml"} <= set(written)
        for text in [proc.stdout, proc.stderr, *written.values()]:
            assert key not in text


def run_predict(
    tmp_path: Path, api_url: str, *overrides: str, api_key: str | None = API_KEY
) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    (home / ".config" / "roboflow").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBOFLOW_")}
    env.update(API_URL=api_url, HOME=str(home), TQDM_DISABLE="1", **({"ROBOFLOW_API_KEY": api_key} if api_key else {}))
    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[2] / "predict.py"), "device=cpu", *overrides],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_pre_annotations_upload_to_a_project_as_predictions(api, trained_run, demo_root, tmp_path):
    photos = sorted((demo_root / "test").glob("*.jpg")) + sorted((demo_root / "valid").glob("*.jpg"))[:1]
    common = [f"ckpt_path={trained_run['checkpoint']}", f"input={photos[0].parent}"]
    proc = run_predict(tmp_path, api.url, *common, f"output={tmp_path / 'batch'}", "format=coco", "upload=acme/shapes")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in photos[:-1])  # the test folder's 2 photos
    assert sorted(u["name"] for u in api.uploads) == names
    assert {(u["project"], u["batch"]) for u in api.uploads} == {("shapes", "seglab pre-annotations batch")}
    assert [(a["id"], a["prediction"]) for a in api.annotations] == [(u["id"], "true") for u in api.uploads]
    for annotation, upload in zip(api.annotations, api.uploads, strict=True):  # one image per annotation file
        coco = annotation["file"]
        assert [i["file_name"] for i in coco["images"]] == [upload["name"]]
        assert [c["name"] for c in coco["categories"]] == ["shapes", "disc", "triangle"]
        assert all(a["image_id"] == 0 for a in coco["annotations"])
    written = json.loads((tmp_path / "batch" / "_annotations.coco.json").read_text())
    assert sorted(i["file_name"] for i in written["images"]) == names
    assert "uploaded to RoboFlow project acme/shapes as predictions" in proc.stdout
    assert API_KEY not in proc.stdout + proc.stderr

    failures = {
        "upload=acme/nothing": "upload=acme/nothing: RoboFlow has no project 'nothing' in workspace 'acme' that this "
        "API key can read",
        "upload=acme/boxes": "upload=acme/boxes: acme/boxes is a RoboFlow object-detection project: it holds no "
        "segmentation labels.",
        "upload=acme": "upload='acme' is not <workspace>/<project>",
    }
    for i, (setting, message) in enumerate(failures.items()):
        failed = run_predict(tmp_path, api.url, *common, f"output={tmp_path / f'failed{i}'}", "format=coco", setting)
        assert failed.returncode == 1 and message in failed.stderr, failed.stderr[-2000:]
    no_key = run_predict(
        tmp_path, api.url, *common, f"output={tmp_path / 'nokey'}", "format=coco", "upload=acme/shapes", api_key=None
    )
    assert "upload=acme/shapes: no RoboFlow API key. Set ROBOFLOW_API_KEY" in no_key.stderr
    not_coco = run_predict(tmp_path, api.url, *common, f"output={tmp_path / 'masks'}", "upload=acme/shapes")
    assert "upload=acme/shapes sends pre-annotations as COCO polygons: add format=coco." in not_coco.stderr
    assert len(api.uploads) == 2  # none of the failures sent an image
