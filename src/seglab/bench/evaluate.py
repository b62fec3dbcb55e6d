"""Section 5, evaluate: s/image of seglab.evaluate.evaluate on the checkpoint the loop section wrote."""

from __future__ import annotations

import contextlib
import io
import statistics
from pathlib import Path

from seglab.bench.common import number, timed
from seglab.config import compose_config
from seglab.tables import text_table as table


def bench_evaluate(checkpoint: Path, model: str, root: Path, work: Path, device, repeats: int) -> dict:
    """evaluate() on the train and the test split: the difference gives the cost per image, apart from
    the fixed cost of a run (loading the checkpoint, finding the data, the confusion-matrix figure)."""
    from seglab.evaluate import evaluate

    runs = {}
    for split in ("test", "train"):
        cfg = compose_config(
            "evaluate",
            overrides=[
                f"ckpt_path={checkpoint}",
                f"data.root={root}",
                f"data.cache_dir={work / 'cache'}",
                "data.num_workers=0",
                f"split={split}",
                "num_overlays=0",
                "worst_k=0",
                f"device={device}",
                f"paths.output_dir={work / 'evaluate' / split}",
            ],
        )
        result = {}

        def run(cfg=cfg, result=result):
            with contextlib.redirect_stdout(io.StringIO()):
                result.update(evaluate(cfg))

        seconds = statistics.median(timed(run) for _ in range(repeats))
        runs[split] = {"images": result["images"], "s": seconds}
    extra = runs["train"]["images"] - runs["test"]["images"]
    per_image = (runs["train"]["s"] - runs["test"]["s"]) / extra if extra > 0 else None  # JSON has no NaN
    return {
        "model": model,
        "resolution": "original",
        "s_per_image": per_image,
        "fixed_s": None if per_image is None else runs["test"]["s"] - per_image * runs["test"]["images"],
        "runs": runs,
    }


def report_evaluate(evaluation: dict) -> list[str]:
    return [
        f"5. Evaluation (seglab.evaluate, resolution=original): {evaluation['model']}",
        table(
            [
                ["per image", f"{number(evaluation['s_per_image'], '.4f')} s"],
                ["fixed per run", f"{number(evaluation['fixed_s'], '.2f')} s"],
            ]
        ),
    ]
