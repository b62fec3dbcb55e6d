import hydra
from omegaconf import DictConfig

from seglab.cli import run_task
from seglab.serve import serve


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    run_task(serve, cfg)


if __name__ == "__main__":
    main()
