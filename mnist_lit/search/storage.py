"""Where a search's study lives, and what lets many workers share it.

- `open_storage`: `hydra.sweeper.storage` as an Optuna storage, checked before any work. An
  SQLAlchemy URL (`sqlite:///<file>`, the default in the sweep folder; `postgresql://user@host/db`
  with the `postgres` extra) is an `RDBStorage`; `journal:<file>` is a `JournalStorage` on that file,
  for clusters that share a file system but have no database server.
- Heartbeats: a worker stamps each trial it runs (`Heartbeats`, a trial system attribute, so every
  storage has them: Optuna's own run only inside `study.optimize` and only on RDB storages). A
  RUNNING trial whose stamp is older than the grace period lost its worker (SIGKILL, a machine that
  vanished): `release_stale_trials` puts it back to WAITING, and the next worker to ask for a trial
  gets it, with its parameters, and goes on from its `last.ckpt` where its folder is reachable.
- `password_to_environment`: a password typed in the storage URL never reaches Hydra's records.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from mnist_lit.errors import ConfigError
from mnist_lit.provenance import masked

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage

log = logging.getLogger(__name__)

# `hydra.sweeper.storage=journal:<file>`: Optuna's JournalStorage has no URL scheme of its own.
JOURNAL = "journal:"
# Trial system attributes: when its worker last said it runs the trial (time.time()), and the folder
# of the trial's job (where its last.ckpt is).
HEARTBEAT = "mnist_lit_heartbeat"
FOLDER = "mnist_lit_folder"
# Where `password_to_environment` puts a password typed in `hydra.sweeper.storage`.
PASSWORD_VARIABLE = "MNIST_LIT_STORAGE_PASSWORD"
HOW_TO_GIVE_A_PASSWORD = (
    "give it in PGPASSFILE or ~/.pgpass (PostgreSQL), or in an environment variable: "
    "hydra.sweeper.storage='postgresql://user:${oc.env:DB_PASSWORD}@host/db'"
)


def open_storage(url: str) -> BaseStorage:
    """The Optuna storage `url` names, connected: one line naming hydra.sweeper.storage and what to
    fix when the scheme is unknown, the driver missing, the server unreachable or the password wrong."""
    import optuna
    from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, ProgrammingError, SQLAlchemyError

    def refused(problem: str) -> ConfigError:
        return ConfigError(f"hydra.sweeper.storage={masked(url)}: {problem}")

    if url.startswith(JOURNAL):
        path = Path(url.removeprefix(JOURNAL))
        if not path.parent.is_dir():
            raise refused(f"the folder {path.parent} does not exist; give a file in a folder every worker can reach")
        try:
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        except OSError as error:
            raise refused(f"cannot open the journal file ({error.strerror or error})") from None
    engine = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else None
    try:
        tries = 0
        while True:
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine)
            except (IntegrityError, ProgrammingError):
                # Workers started together on a new database all create Optuna's tables ("duplicate key",
                # "relation already exists"); one wins and the others find them there when they try again.
                tries += 1
                if tries == 3:
                    raise
                time.sleep(1.0)
    except (NoSuchModuleError, ArgumentError):
        raise refused(
            "not a storage this sweeper knows: use sqlite:///<file>, postgresql://<user>@<host>/<database> "
            "or journal:<file>"
        ) from None
    except ImportError:  # Optuna's, for the database's missing driver (psycopg for postgresql://)
        raise refused("the database's driver is not installed: pip install -e '.[postgres]'") from None
    except SQLAlchemyError as error:
        reason = " ".join(str(getattr(error, "orig", None) or error).split())
        advice = (
            HOW_TO_GIVE_A_PASSWORD
            if "password" in reason
            else "check the host, port and database, and that the server runs"
        )
        raise refused(f"cannot connect ({masked(reason)}); {advice}") from None


def password_to_environment(args: list[str]) -> list[str]:
    """`hydra.sweeper.storage=<url with a password>` with the password moved into the environment
    (`PASSWORD_VARIABLE`, which the search's jobs inherit) and read back by `${oc.env:...}`: Hydra
    records the URL without it (`.hydra/`, multirun.yaml). Other arguments as they are."""
    from mnist_lit.provenance import URL_PASSWORD

    rewritten = []
    for arg in args:
        key, _, value = arg.partition("=")
        match = URL_PASSWORD.search(value) if key.lstrip("+") == "hydra.sweeper.storage" else None
        if match and not match.group(2).startswith("${"):
            os.environ[PASSWORD_VARIABLE] = match.group(2)
            value = value[: match.start(2)] + "${oc.env:" + PASSWORD_VARIABLE + "}" + value[match.end(2) :]
            arg = f"{key}={value}"
        rewritten.append(arg)
    return rewritten


class Heartbeats:
    """Stamps the trials this worker runs every `interval` seconds, in a thread, while in its `with`."""

    def __init__(self, storage: BaseStorage, interval: float) -> None:
        self.storage = storage
        self.interval = interval
        self.trial_ids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trial heartbeats", daemon=True)

    def beat(self, trial_ids: Iterable[int], at: float | None = None) -> None:
        """Stamp `trial_ids` now (or `at`); a trial that finished in the meantime is no longer stamped.

        A trial another worker put back to WAITING (this one's stamps came late: a stalled machine)
        is taken back before anyone asks for it; one already taken runs twice, and the first told wins."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        for trial_id in list(trial_ids):
            try:
                released = at is None and self.storage.get_trial(trial_id).state == TrialState.WAITING
                if released and not self.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    log.warning(f"Trial id {trial_id}: another worker took it over while this one ran it")
                    self.trial_ids.discard(trial_id)
                    continue
                self.storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time() if at is None else at)
            except (UpdateFinishedTrialError, KeyError):
                self.trial_ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat(self.trial_ids)

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        if error is not None:
            # Stopped by a signal or an error: the trials it ran are stale at once, for the next worker
            # (or this search, resumed) to go on with, instead of after the grace period.
            self.beat(self.trial_ids, at=0.0)


def release_stale_trials(study: optuna.Study, grace_period: float) -> None:
    """Put back to WAITING the RUNNING trials whose worker has not stamped them for `grace_period`
    seconds, so that the next worker to ask for a trial takes it over. Trials that live workers run
    are never touched. (A trial without a stamp counts from its start.)"""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        stamp = trial.system_attrs.get(HEARTBEAT)
        if stamp is None:
            stamp = trial.datetime_start.timestamp() if trial.datetime_start else now
        if now - stamp <= grace_period:
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.WAITING)
        except UpdateFinishedTrialError:  # its worker finished it after all
            continue
        silence = "stopped" if stamp == 0.0 else f"last stamped it {now - stamp:.0f} s ago"
        log.warning(f"Trial {trial.number}: its worker {silence}; the next worker to ask takes it over")
