"""Train (and optionally prune) an image classifier: ``python train.py [overrides]``.

With no arguments: the embedded digits data and a small CNN on CPU. See ``conf/`` for the
config groups and ``lightning_ifprune/app.py`` for what is run.
"""

import hydra
from omegaconf import DictConfig

from lightning_ifprune.app import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    train(cfg)


if __name__ == "__main__":
    main()
