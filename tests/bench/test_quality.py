"""The quality yardstick: exports laid out from fetched repositories at their commit, recipes run once each and
read back on the next sitting, one table with intervals and paired differences from the plain loop."""

import csv
import json
import shutil
import subprocess

import pytest
from PIL import Image

from seglab.bench.quality import main
from seglab.data.synthetic import dataset_files, generate_dataset
from seglab.metrics import interval_text, load_per_image, paired_difference


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def fetched(tmp_path, demo_root):
    """A fetched repository (`<owner>+<name>/repo`, as the fetch tool leaves it: bare) holding an export in a
    folder, with a later commit that changed it; and a manifest naming the first commit, plus a generated entry."""
    work = tmp_path / "work"
    shutil.copytree(demo_root, work / "datasets" / "shapes", ignore=shutil.ignore_patterns(".seglab_cache"))
    git("init", "-q", cwd=work)
    git("add", ".", cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "export", cwd=work)
    first = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True).stdout.strip()
    (work / "datasets" / "shapes" / "README.roboflow.txt").write_text("a later edit\n")
    git("add", ".", cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "later", cwd=work)
    sources = tmp_path / "mirror"
    git("clone", "-q", "--bare", str(work), str(sources / "acme+shapes-repo" / "repo"), cwd=tmp_path)
    # An export at the top of its repository, beside files that are not part of it.
    top = tmp_path / "top"
    shutil.copytree(demo_root, top, ignore=shutil.ignore_patterns(".seglab_cache"))
    (top / "notebook.ipynb").write_text("{}")
    git("init", "-q", cwd=top)
    git("add", ".", cwd=top)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "export", cwd=top)
    top_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=top, capture_output=True, text=True).stdout.strip()
    shutil.copytree(top, sources / "acme" / "top-repo")  # a plain clone, as a user's git clone leaves it
    manifest = tmp_path / "yardstick.json"
    manifest.write_text(
        json.dumps(
            [
                {
                    "name": "shapes",
                    "kind": "synthetic shapes",
                    "repository": "acme/shapes-repo",
                    "commit": first,
                    "folder": "datasets/shapes",
                    "licence": "CC BY 4.0",
                },
                {
                    "name": "top",
                    "kind": "synthetic shapes",
                    "repository": "acme/top-repo",
                    "commit": top_commit,
                    "folder": ["train", "valid", "test"],
                    "licence": "CC BY 4.0",
                },
                {
                    "name": "tiny-dense",
                    "kind": "generated dense",
                    "generate": {"num_images": 10, "size": 96, "seed": 3, "mode": "dense"},
                },
            ]
        )
    )
    return {"manifest": manifest, "sources": sources, "exports": tmp_path / "exports", "demo": demo_root}


def test_layout_takes_each_export_at_its_commit_and_generates_the_others(fetched):
    args = ["--manifest", str(fetched["manifest"]), "--exports", str(fetched["exports"])]
    main(["layout", "--sources", str(fetched["sources"]), *args])
    laid_out = fetched["exports"] / "shapes"
    assert dataset_files(laid_out) == dataset_files(fetched["demo"])  # the first commit's files, not the later edit
    assert dataset_files(fetched["exports"] / "top") == dataset_files(fetched["demo"])  # the export's folders only
    expected = generate_dataset(fetched["exports"].parent / "expected", num_images=10, size=96, seed=3, mode="dense")
    assert dataset_files(fetched["exports"] / "tiny-dense") == dataset_files(expected)


@pytest.mark.slow  # two tiny trainings (train.py and the plain loop) and their evaluations
def test_runs_are_scored_tabulated_and_kept_for_the_next_sitting(fetched, tmp_path, capsys):
    args = [
        "--manifest",
        str(fetched["manifest"]),
        "--exports",
        str(fetched["exports"]),
        "--only",
        "shapes",
        "--recipes",
        "plain",
        "default",
        "--out",
        str(tmp_path / "quality"),
        "debug=fast",
        "max_epochs=2",
    ]
    main(["layout", "--sources", str(fetched["sources"]), *args[:4]])
    results = main(["run", *args])
    out = tmp_path / "quality"
    assert [(r["recipe"], r["epochs"], len(r["validation_curve"])) for r in results] == [
        ("plain", 2, 2),
        ("default", 2, 2),
    ]
    with (out / "quality.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["recipe"] for r in rows] == ["plain", "default"]
    for row, result in zip(rows, results, strict=True):
        evaluated = json.loads((out / "shapes" / f"{row['recipe']}-seed42" / "evaluate" / "metrics.json").read_text())
        assert row["test mIoU"] == interval_text(evaluated["uncertainty"]["mIoU"])  # the images' own size
        assert row["test images"] == "2" and row["seed"] == "42" and row["commit"] == result["commit"]
        assert "threads" in row["machine"]
    plain, default = (
        load_per_image(out / "shapes" / f"{r}-seed42" / "evaluate" / "per_image.npz") for r in ("plain", "default")
    )
    diff = paired_difference(default["confusion"], plain["confusion"], plain["units"])
    assert rows[1]["vs plain (paired)"].startswith(f"{diff['value']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]")
    with Image.open(out / "quality.png") as picture:
        assert picture.size == (500, 400)  # one export: one panel of 5 x 4 inches at 100 dpi

    # The next sitting reads the finished runs instead of training again.
    written = {p: p.stat().st_mtime_ns for p in out.glob("shapes/*/result.json")}
    capsys.readouterr()
    assert main(["run", *args]) == results
    assert {p: p.stat().st_mtime_ns for p in out.glob("shapes/*/result.json")} == written
    assert "plain loop epoch" not in capsys.readouterr().out
