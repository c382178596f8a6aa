"""The sweep's Optuna storage (``hydra.sweeper.storage``): a database or journal file that other processes,
other machines and earlier runs wrote. Only this module opens one. What it holds that decides which jobs
launch is checked here before a job does: the round's bounds (a round ends within ``n_trials`` of its start),
a stored or enqueued trial's parameters (inside the search space), the search space of the trials already
there (the same kinds of distribution), and the file or server itself (reachable, a database of this
Optuna's schema, a journal whose lines parse). Anything wrong is one ``UserError`` line that names the
storage without its password.

Storage strings: ``sqlite:///...`` or any SQLAlchemy URL is Optuna's RDB storage (``postgresql://`` takes
the psycopg driver of the search extra); a plain path (no ``://``) is Optuna's journal file; None is a
study in this process's memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cifarkit.core.errors import UserError
from cifarkit.core.untrusted.text import shown

ROUND_START = "cifarkit:round_start"  # the study's user attributes: the first trial number of the current round
ROUND_END = "cifarkit:round_end"  # ... and the number it stops before (its start + the n_trials it was opened with)
MAX_TRIALS = 10_000_000  # no stored trial number or round bound is larger


def is_journal(storage: str) -> bool:
    return "://" not in storage


def named(storage: Any) -> str:
    """The storage as a message names it: a URL without its password."""
    if not isinstance(storage, str) or is_journal(storage):
        return shown(storage)
    try:
        from sqlalchemy.engine import make_url

        return shown(make_url(storage).render_as_string(hide_password=True))
    except Exception:  # not a URL SQLAlchemy parses: nothing in it is known to be a password, so say less
        return shown(storage.split("://", 1)[0] + "://...")


def _why(e: BaseException) -> str:
    """The first line of a driver's error, without a password it might quote."""
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    return shown(text[0] if text else e.__class__.__name__)[:200]


def open_storage(storage: Any) -> Any:
    """An Optuna storage for a ``storage`` string (see the module's doc), or the value itself when it is
    already a storage object or None; a storage that cannot be read is one line."""
    if not isinstance(storage, str):
        return storage
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend
    from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError

    where = named(storage)
    if is_journal(storage):
        path = Path(storage).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))  # replays every line now
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
            raise UserError(
                f"the Optuna journal file {where} has a line that is not one of Optuna's journal records "
                f"({_why(e)}); restore it from a copy, or start a new study in another file "
                "(hydra.sweeper.storage=<new path>)"
            ) from None
        except OSError as e:
            raise UserError(f"cannot open the Optuna journal file {where} ({_why(e)}); fix its folder") from None
    if storage.startswith("sqlite:///"):  # SQLite creates its file but not the folder it lives in
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else None
    try:
        try:
            return RDBStorage(storage, engine_kwargs=engine)
        except IntegrityError:  # another process created the schema at the same moment: it is there now
            return RDBStorage(storage, engine_kwargs=engine)
    except RuntimeError as e:  # an older Optuna's schema
        if "optuna storage upgrade" not in str(e):
            raise
        old = str(e).split("(set up by optuna ", 1)[-1].split(")", 1)[0]
        raise UserError(
            f"the Optuna study storage {where} was written by Optuna {old} and this is Optuna {optuna.__version__}: "
            f"upgrade it once with `optuna storage upgrade --storage {where}` (back the file up first), then run "
            "again"
        ) from None
    except ArgumentError as e:  # not a URL, or a database SQLAlchemy has no dialect for
        raise UserError(
            f"hydra.sweeper.storage={where} is not a storage URL this can open ({_why(e)}); give "
            "sqlite:///<file>, postgresql://<user>:<password>@<host>:<port>/<database>, or a journal file's path"
        ) from None
    except ModuleNotFoundError as e:
        raise UserError(
            f"hydra.sweeper.storage={where} needs the database driver {e.name}: pip install it, or use "
            "postgresql:// (psycopg, in the search extra)"
        ) from None
    except SQLAlchemyError as e:
        text = str(getattr(e, "orig", None) or e)
        if storage.startswith("sqlite") and "not a database" in text:
            why = "the file is not an SQLite database; point hydra.sweeper.storage at the study's database"
        elif "password authentication failed" in text or "Access denied" in text:
            why = f"{_why(e)}; check the user and password"
        elif "Connection refused" in text or "could not translate host name" in text or "timeout" in text.lower():
            why = f"cannot reach the server: {_why(e)}; start it, or check the host and port"
        elif "does not exist" in text:
            why = f"{_why(e)}; create it first (docs/sweeps.md)"
        else:
            why = _why(e)
        raise UserError(f"cannot open the Optuna study storage {where}: {why}") from None


def load_study(storage: Any, study_name: str | None, **options: Any) -> Any:
    """The stored study ``study_name`` (KeyError when there is none)."""
    import optuna

    return optuna.load_study(study_name=study_name, storage=open_storage(storage), **options)


def create_study(storage: Any, study_name: str | None, **options: Any) -> Any:
    """The study ``study_name``, created when the storage has none of that name."""
    import optuna

    return optuna.create_study(study_name=study_name, storage=open_storage(storage), load_if_exists=True, **options)


def stored_round(
    user_attrs: Mapping[str, Any], trials: int, n_trials: int, storage: Any, study: str, done: Callable[[range], bool]
) -> range | None:
    """The study's current round (trial numbers from its start, as many as it was opened with), or None before
    the first; bounds that follow from the run: integers, it starts within the trials there are, and a round
    this sweep would join (``done`` says it is not finished) holds at most ``n_trials``."""
    end, start = user_attrs.get(ROUND_END), user_attrs.get(ROUND_START, None)
    if end is None:
        return None
    if start is None:  # a study whose round was opened before round starts were stored
        start = max(0, end - n_trials) if isinstance(end, int) and not isinstance(end, bool) else 0
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))
    if ints and 0 <= start <= trials and 0 < end - start <= MAX_TRIALS:
        current = range(start, end)
        if len(current) <= n_trials or done(current):
            return current
    raise UserError(
        f"the Optuna study {shown(study)} in {named(storage)} holds a round of trials {shown(repr(start))} to "
        f"{shown(repr(end))} (user attributes {ROUND_START}, {ROUND_END}), outside what this sweep can run "
        f"({trials} trials there, n_trials={n_trials}); run with the n_trials the study was started with, or "
        "start a new study (hydra.sweeper.study_name=<new name>)"
    )


def contains(dist: Any, value: Any) -> bool:
    """Whether ``value`` is one an Optuna distribution could have given (in range, on its step, a choice)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return any(type(value) is type(c) and value == c for c in dist.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if isinstance(dist, IntDistribution):
        ok = float(value).is_integer() and dist.low <= value <= dist.high
        return ok and (int(value) - dist.low) % dist.step == 0
    if isinstance(dist, FloatDistribution):
        if not dist.low <= value <= dist.high:
            return False
        if dist.step is None:
            return True
        k = (value - dist.low) / dist.step
        return abs(k - round(k)) < 1e-8
    return False


def check_params(
    number: int, params: Mapping[str, Any], fixed: Mapping[str, Any], space: Mapping[str, Any], storage: Any, study: str
) -> None:
    """A trial's parameters, sampled, enqueued or copied from a stored trial, inside the search space
    ``space`` (name: distribution) before its job launches: Optuna itself only warns about an enqueued
    value outside it, and runs it. ``fixed``: the values the storage fixed for it (enqueued)."""
    for name, value in {**fixed, **params}.items():
        dist = space.get(name)
        if dist is None:
            why = f"{shown(name)}={shown(repr(value))[:60]}, not a parameter of the search space"
        elif not contains(dist, value):
            why = f"{shown(name)}={shown(repr(value))[:60]}, outside the search space ({shown(dist)[:160]})"
        else:
            continue
        raise UserError(
            f"trial {number} of the Optuna study {shown(study)} in {named(storage)} would run {why}; "
            "remove that enqueued trial (or start a new study: hydra.sweeper.study_name=<new name>)"
        )


def check_space(trials: list[Any], space: Mapping[str, Any], storage: Any, study: str) -> None:
    """The search space against the distributions the study's trials were sampled from: a parameter whose
    kind of distribution (or set of choices) changed cannot continue in the same study."""
    from optuna.distributions import check_distribution_compatibility

    seen: dict[str, Any] = {}
    for t in trials:
        for name, dist in t.distributions.items():
            seen.setdefault(name, dist)
    for name, dist in space.items():
        if name not in seen:
            continue
        try:
            check_distribution_compatibility(seen[name], dist)
            same_choices = not hasattr(dist, "choices") or tuple(seen[name].choices) == tuple(dist.choices)
        except ValueError:
            same_choices = False
        if not same_choices:
            raise UserError(
                f"the search space changed since the Optuna study {shown(study)} in {named(storage)} began: "
                f"{shown(name)} was {shown(seen[name])[:120]}, now {shown(dist)[:120]}; start a new study "
                f"for it (hydra.sweeper.study_name=<new name>), or search {shown(name)} as before"
            )
