"""Expected user errors of ``train.py``: one ``error: <message>`` line on stderr, no traceback.

Missing data or files and bad config values (``ValueError``, ``FileNotFoundError``,
``TypeError`` and the library's subclasses of them, also when Hydra's ``instantiate`` wraps them
in an ``InstantiationException``) are user errors; any other exception is a bug and keeps its
traceback. ``HYDRA_FULL_ERROR=1`` keeps the full traceback of user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, TypeError)
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
EXIT_USER_ERROR = 1

T = TypeVar("T")


class UserError(CompactHydraException):
    """A user error of one multirun job; Hydra reports it as its one-line message at the end."""


def root_cause(exc: BaseException) -> BaseException:
    """``exc`` with the ``InstantiationException`` wrappers of Hydra's ``instantiate`` peeled off."""
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def user_error_message(exc: BaseException) -> str | None:
    """The message to show for an expected user error; None for anything else (a bug)."""
    root = root_cause(exc)
    if not isinstance(root, USER_ERRORS):
        return None
    return str(root).strip() or type(root).__name__


def full_errors_requested() -> bool:
    """Whether ``HYDRA_FULL_ERROR=1`` asks for full tracebacks (Hydra's own switch)."""
    return os.environ.get(FULL_ERROR_ENV) == "1"


def _job_label() -> str | None:
    """``job N (overrides)`` inside a Hydra multirun job, else None."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    overrides = " ".join(str(o) for o in hydra_cfg.overrides.task)
    return f"job {hydra_cfg.job.num} ({overrides})"


def run_reporting_errors(task: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """``task(cfg)``, with user errors reported as one ``error: <message>`` line on stderr.

    A single run then exits with status 1. In a multirun the failed job's line names the job
    and the job fails with a :class:`UserError`, so the other jobs still run and Hydra exits
    with status 1 at the end, repeating the first failure's message.
    """
    try:
        return task(cfg)
    except Exception as exc:
        message = user_error_message(exc)
        if message is None or full_errors_requested():
            raise
        job = _job_label()
        sys.stdout.flush()
        if job is None:
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from None
        print(f"error: {job}: {message}", file=sys.stderr, flush=True)
        raise UserError(f"error: {message}") from None
