"""A Ray connection for one command, and what keeps it tidy: it ends with the command, even on a signal or when
the process is killed (the watchdog), and a Ray task's UserError reaches the user as one clear message.

The ``ray`` engine (:mod:`histoembed.engines.ray`) runs its work inside ``session``; ``ray`` itself (the
optional extra ``histoembed[ray]``) is imported only by ``ray_module``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

from histoembed.core import cpus
from histoembed.core.errors import UserError

INSTALL_HINT = "install the extra: pip install 'histoembed[ray]' (Ray Data 2.60), or run with --engine local"


def ray_module():
    """The ``ray`` module with Ray Data, or a clear message when the extra is not installed."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UserError(f"--engine ray needs Ray, which is not installed here ({e.msg})", hint=INSTALL_HINT) from None
    return ray


@contextlib.contextmanager
def session(address: str | None) -> Iterator[None]:
    """A Ray connection for the command: join ``address`` (or RAY_ADDRESS), else start Ray on this machine.

    An already connected process (a notebook, a test) keeps its connection and it is not closed.
    """
    ray = ray_module()
    if ray.is_initialized():
        yield
        return
    kwargs: dict = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    # "local" always starts an instance of its own: Ray's default (None) would join any Ray it finds
    # running on this machine, another user's or another run's included.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        kwargs["num_cpus"] = cpus.usable_cpus()  # the CPUs this process may use
    previous = _signal_handlers()
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        _restore(previous)
        where = "this machine" if address == "local" else address
        raise UserError(f"cannot start or join Ray at {where} ({e})",
                        hint="start the cluster with `ray start --head` (and `ray start --address HEAD:6379` on "
                             "the other machines), then pass --ray-address auto or HEAD:6379") from None
    watchdog = _start_watchdog(ray) if address == "local" else None
    _interrupt_on_signals(previous)
    try:
        yield
    finally:
        try:
            ray.shutdown()
        finally:
            _restore(previous)
            if watchdog is not None:
                _stop_watchdog(watchdog)


SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


def _signal_handlers() -> dict | None:
    """The handlers now installed, or None off the main thread (where none can be installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return {sig: signal.getsignal(sig) for sig in SIGNALS}


def _interrupt_on_signals(previous: dict | None) -> None:
    """SIGTERM, SIGINT and SIGHUP raise KeyboardInterrupt, so ``session``'s ``ray.shutdown()`` runs.

    Killed by a signal's default action, the driver would leave the instance's agents and workers
    behind (Ray's own SIGTERM handler, set by ``ray.init``, is never taken back).
    """
    if previous is None:
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in SIGNALS:
        if previous[sig] is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(sig, interrupt)


def _restore(previous: dict | None) -> None:
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _start_watchdog(ray) -> subprocess.Popen | None:
    """``histoembed.engines.ray_watchdog`` beside a local instance: it ends the instance if this process is killed."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        session_dir = ray._private.worker._global_node.get_session_dir_path()
        return subprocess.Popen([sys.executable, "-m", "histoembed.engines.ray_watchdog", session_dir,
                                 os.path.dirname(ray.__file__)], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # it outlives a closed terminal's SIGHUP
    except (AttributeError, OSError):  # Ray's internals moved: no watchdog, Ray's own clean-up only
        return None


def _stop_watchdog(watchdog: subprocess.Popen) -> None:
    """Ray was shut down here: the watchdog leaves without killing anything."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        watchdog.communicate(b"done\n", timeout=10)


@contextlib.contextmanager
def quiet(name: str) -> Iterator[None]:
    """Only critical log records of logger ``name`` (and its children) while inside."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def user_error(e: BaseException) -> UserError | None:
    """The UserError a Ray task raised, from inside Ray's wrappers (RayTaskError, Ray Data's), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise a task's UserError as itself, so the command prints it as one clear message."""
    try:
        yield
    except Exception as e:
        found = user_error(e)
        if found is None:
            raise
        raise UserError(found.problem, path=found.path, hint=found.hint) from None
