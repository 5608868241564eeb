"""Train (and optionally prune) an image classifier: ``python train.py [overrides]``.

With no arguments: the embedded digits data and a small CNN on CPU. See ``conf/`` for the
config groups and ``lightning_ifprune/app/run.py`` for what is run.

Expected user errors — data or ``init_from`` not on disk, bad config values — print one
``error: <message>`` line on stderr and exit with status 1, without a traceback; in a multirun
each failed job prints its line and the sweep exits with status 1 at the end. Other exceptions
(bugs) show their traceback. Set ``HYDRA_FULL_ERROR=1`` for the full traceback of every error
(:mod:`lightning_ifprune.app.errors`).
"""

import hydra
from omegaconf import DictConfig

from lightning_ifprune.app import run_reporting_errors, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run_reporting_errors(train, cfg)


if __name__ == "__main__":
    main()
