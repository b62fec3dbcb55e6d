import hydra
from omegaconf import DictConfig

from seglab.cli import run_task
from seglab.export import export


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_task(export, cfg)


if __name__ == "__main__":
    main()
