"""The bench's targets, checked against the results, and the printed report of every section that ran."""

from __future__ import annotations

from seglab.bench.common import number
from seglab.bench.data import report_data
from seglab.bench.evaluate import report_evaluate
from seglab.bench.fit import report_fit
from seglab.bench.loop import report_loop
from seglab.bench.masks import report_masks
from seglab.bench.model import report_model
from seglab.tables import text_table as table

# The targets; `measured` values are filled in from the results.
TARGETS = {
    "data_images_per_s": (">=", 60.0, "cached data pipeline, one worker, 513x513, train augmentation"),
    "loop_ratio": ("<=", 1.03, "Lightning s/step / plain loop s/step (CPU, 128x128)"),
    "loop_steps_with_sync": ("<=", 1.0, "steps with a host sync the plain loop lacks, per log_every_n_steps"),
    "cuda_train_images_per_s": (">=", 300.0, "bf16-mixed + channels_last training at 513 on one H100"),
    "fit_steps_share": (">=", 0.85, "share of a fit's wall time spent inside training steps"),
    "fit_feed_speedup": (">=", 3.0, "feeding an epoch of large JPEGs: epoch 1 (cache filling) / epoch 2+"),
    "fit_ceiling_ratio": (">=", 0.95, "seglab steady-state train images/s / bare-model ceiling (CUDA)"),
}


def check_targets(results: dict) -> dict:
    data, loop, model, fit = results.get("data"), results.get("loop"), results.get("model", []), results.get("fit")
    at_513 = data is not None and data["image_size"] == 513
    cpu_128 = loop is not None and loop["device"] == "cpu" and loop["image_size"] == 128
    # (wall-clock value, CPU-time value) where the target applies to this run.
    measured = {
        "data_images_per_s": (data["cached_images_per_s"], data["cached_images_per_cpu_s"]) if at_513 else (None, None),
        "loop_ratio": (loop["ratio"], loop["cpu_ratio"]) if cpu_128 else (None, None),
        "loop_steps_with_sync": (loop["host_syncs"]["steps_with_extra_sync"] if loop else None, None),
        "cuda_train_images_per_s": (
            next(
                (
                    r.get("train_images_per_s")
                    for r in model
                    if r["variant"] == "bf16-mixed + channels_last" and results["model_image_size"] == 513
                ),
                None,
            ),
            None,
        ),
        "fit_steps_share": (fit["steps_share"] if fit else None, None),
        "fit_feed_speedup": (fit["feed"]["speedup"] if fit else None, None),
        "fit_ceiling_ratio": (fit["ceiling_ratio"] if fit and fit["runtime"]["device"] != "cpu" else None, None),
    }
    out = {}
    for key, (op, target, what) in TARGETS.items():
        value, cpu_value = measured[key]
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out[key] = {
            "what": what,
            "target": f"{op} {target:g}",
            "measured": value,
            "measured_cpu_time": cpu_value,
            "met": met,
        }
    return out


def report_machine(m: dict) -> list[str]:
    busy = max(m["load_average_start"] or 0, m["load_average_end"] or 0) > m["usable_cores"]
    return [
        f"seglab bench  {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable, torch threads "
        f"{m['torch_threads']}), GPU: {m['gpu'] or 'none'}",
        f"torch {m['torch']}, torchvision {m['torchvision']}, Lightning {m['pytorch_lightning']}, "
        f"albumentations {m['albumentations']}; load average {number(m['load_average_start'], '.2f')} -> "
        f"{number(m['load_average_end'], '.2f')}",
        *(
            [
                f"BUSY MACHINE: load above {m['usable_cores']} cores, so wall-clock figures are inflated; the "
                "CPU-time columns are closer to what a core of its own gives."
            ]
            if busy
            else []
        ),
    ]


def report(results: dict) -> str:
    parts = [report_machine(results["machine"])]
    for key, section in (
        ("data", report_data),
        ("masks", report_masks),
        ("loop", report_loop),
        ("evaluate", report_evaluate),
        ("fit", report_fit),
    ):
        if key in results:
            parts.append(section(results[key]))
        if key == "loop" and "model" in results:
            parts.append(report_model(results["model"], results["settings"]))
    parts.append(
        [
            "Targets",
            table(
                [["", "target", "measured", "CPU time", ""]]
                + [
                    [
                        k,
                        t["target"],
                        number(t["measured"], ".3f"),
                        number(t["measured_cpu_time"], ".3f"),
                        {True: "met", False: "NOT met", None: "not measured here"}[t["met"]],
                    ]
                    for k, t in results["targets"].items()
                ]
            ),
        ]
    )
    return "\n\n".join("\n".join(lines) for lines in parts)
