"""The Hydra application: ``train(cfg)`` runs the phases of :mod:`.run`, built by
:mod:`.instantiators`, one :func:`.phases.run_phase` per phase; :mod:`.errors` turns user
errors into one ``error: ...`` line for ``train.py``."""

from lightning_ifprune.app.errors import run_reporting_errors
from lightning_ifprune.app.run import train

__all__ = ["run_reporting_errors", "train"]
