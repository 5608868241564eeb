"""The Hydra application: ``train(cfg)`` runs the phases of :mod:`.run`, built by
:mod:`.instantiators`, one :func:`.phases.run_phase` per phase."""

from lightning_ifprune.app.run import train

__all__ = ["train"]
