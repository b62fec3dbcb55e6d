"""What the scripts share (seglab.cli): sweep job folder names, and one-line errors instead of tracebacks."""

import pytest
from helpers import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from seglab.cli import run_task, short_dirname, swept_keys

# One trial of hparams_search=optuna with more parameters: ten overrides, floats as Optuna samples them.
OPTUNA_TRIAL = [
    "optimizer=sgd",
    "optimizer.lr=0.00012345678901234567",
    "loss=dice_ce",
    "scheduler=poly_warmup",
    "++optimizer.weight_decay=1.2345678901234568e-05",
    "++optimizer.momentum=0.9123456789012345",
    "batch_size=4",
    "seed=12345",
    "augmentation.geometry.scales=[0.5123456789012346,1.7512345678901233]",
    "augmentation.geometry.class_prob=0.3333333333333333",
]


def test_sweep_job_folders_stay_short_numbered_and_unique():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfgs = [
            compose(
                "train",
                overrides=[*OPTUNA_TRIAL, "data.root=/data/export", f"hydra.job.num={n}"],
                return_hydra_config=True,
            )
            for n in (0, 7, 12)
        ]
    assert len(cfgs[0].hydra.job.override_dirname) == 317  # Hydra's name in full: past the 255-byte limit
    names = [cfg.hydra.sweep.subdir for cfg in cfgs]
    assert names[1] == (
        "7_batch_size=4,class_prob=0.3333,loss=dice_ce,lr=0.0001235,momentum=0.9123,optimizer=sgd,"
        "scales=[0.5123,1.751],scheduler=p"
    )
    assert [n.split("_")[0] for n in names] == ["0", "7", "12"]  # how LeaderboardCallback finds and orders jobs
    assert len(set(names)) == 3 and all(len(n.encode()) <= len(n.split("_")[0]) + 1 + 120 for n in names)


def test_short_dirname_keeps_names_readable_and_one_folder():
    assert short_dirname("debug=fast,optimizer=adam") == "debug=fast,optimizer=adam"
    assert short_dirname("") == ""
    # Group paths and nested keys by their last part, a deletion keeps its ~, a path value does not nest folders;
    # only floats are rounded (not versions, integers or names with digits).
    assert (
        short_dirname("ckpt_path=/runs/a/last.ckpt,model/backbone=r50,tag=v1.0.3,~trainer.max_time,x.n=100")
        == "backbone=r50,ckpt_path=-runs-a-last.ckpt,n=100,tag=v1.0.3,~max_time"
    )
    assert (
        short_dirname("lr=1e-05,gamma=2.0,mix=[0.25,1.333333],names=[a,b]")
        == "gamma=2,lr=1e-05,mix=[0.25,1.333],names=[a,b]"
    )
    # The cap counts bytes (what file systems limit) and never splits a character.
    assert short_dirname("name=" + "é" * 100, max_bytes=20) == "name=" + "é" * 7


def test_swept_keys_come_first_so_the_cap_never_cuts_them_off():
    overrides = [
        "trainer.accelerator=cpu",
        "optimizer=adam,sgd",
        "data.num_workers=0",
        "seed=range(1,3)",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1",
    ]
    assert swept_keys(overrides) == ["optimizer", "seed"]
    search_space = {"optimizer.lr": "interval(1e-5,1e-2)", "loss": "choice(ce,dice_ce)"}
    assert swept_keys(["hparams_search=optuna"], search_space) == ["optimizer.lr", "loss"]
    job = (
        "data.num_workers=0,optimizer=sgd,seed=2,trainer.accelerator=cpu,trainer.enable_model_summary=false,"
        "trainer.log_every_n_steps=1,trainer.num_sanity_val_steps=0,trainer.max_time=00:01:00:00"
    )
    assert short_dirname(job).startswith("accelerator=cpu,enable_model_summary=false,")
    assert "optimizer=" not in short_dirname(job)  # sorted alone, the swept key falls past the 120 bytes
    named = short_dirname(job, "optimizer,seed")
    assert named.startswith("optimizer=sgd,seed=2,accelerator=cpu,") and len(named.encode()) <= 120
    assert short_dirname(job, "++seed").startswith("seed=2,accelerator=cpu")  # a key as the command line wrote it


def test_run_task_reports_a_file_system_refusal_in_one_line(tmp_path, capsys):
    too_long = tmp_path / ("x" * 300)
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    with pytest.raises(SystemExit) as exit_info:
        run_task(lambda cfg: too_long.mkdir(), cfg)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        f"seglab: error: {too_long}: File name too long. Shorten the path: a file or "
        "folder name holds at most 255 bytes.\n"
    )
    # A missing file is not the file system refusing one: it may be a bug, so its traceback stays.
    with pytest.raises(FileNotFoundError):
        run_task(lambda cfg: (tmp_path / "missing.json").read_text(), cfg)


def test_run_task_reports_a_config_classs_error_in_one_line(tmp_path, capsys):
    """The datamodule checks its settings when Hydra instantiates it, and Hydra wraps what it raises."""
    damaged = tmp_path / "export.zip"
    damaged.write_bytes(b"not a zip")
    cfg = OmegaConf.create(
        {
            "paths": {"output_dir": str(tmp_path)},
            "data": {
                "_target_": "seglab.data.datamodule.SegmentationDataModule",
                "root": str(damaged),
                "exports_dir": str(tmp_path / "exports"),
            },
        }
    )
    with pytest.raises(SystemExit) as exit_info:
        run_task(lambda cfg: instantiate(cfg.data), cfg)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        f"seglab: error: {damaged} is not a zip archive that can be read (File is not "
        "a zip file). Download the export from RoboFlow again, or point data.root at "
        "the unpacked folder.\n"
    )
