import hydra
from omegaconf import DictConfig

from seglab.cli import run_task
from seglab.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_task(train, cfg, metric=cfg.monitor.metric)


if __name__ == "__main__":
    main()
