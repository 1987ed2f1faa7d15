"""One logged-in PKCS#11 session per process, with every call serialized and errors translated."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Protocol, TypeVar

import pkcs11
import pkcs11.exceptions as p11err

from hsm.errors import (
    HsmConfigError,
    HsmError,
    HsmUnavailableError,
    KeyNotFoundError,
    MechanismNotSupportedError,
    PinIncorrectError,
    TokenNotFoundError,
)
from hsm.uri import Pkcs11Uri, apply_module_env

log = logging.getLogger(__name__)

T = TypeVar("T")

# Return codes after which the session (or the whole library) must be rebuilt before the
# next call: the device went away, the token directory vanished, or the handle is stale.
_UNAVAILABLE: tuple[type[p11err.PKCS11Error], ...] = (
    p11err.DeviceError,
    p11err.DeviceMemory,
    p11err.DeviceRemoved,
    p11err.TokenNotPresent,
    p11err.TokenNotRecognised,
    p11err.SessionClosed,
    p11err.SessionHandleInvalid,
    p11err.SessionCount,
    p11err.UserNotLoggedIn,
    p11err.KeyHandleInvalid,
    p11err.ObjectHandleInvalid,
    p11err.GeneralError,
    p11err.FunctionFailed,
)


class SessionObserver(Protocol):
    """Told about every PKCS#11 call (e.g. by the server, for metrics); must be cheap and never raise."""

    def hsm_call(self, action: str, seconds: float, error: BaseException | None) -> None: ...


_observer: SessionObserver | None = None


def set_observer(observer: SessionObserver | None) -> None:
    """Install (or remove, with None) the process-wide observer of PKCS#11 calls."""
    global _observer  # one observer per process, like the session itself
    _observer = observer


def translate(err: p11err.PKCS11Error, action: str) -> HsmError:
    """Map a python-pkcs11 exception to the HSM layer's error with a sentence saying what failed."""
    name = type(err).__name__
    if isinstance(err, p11err.PinIncorrect | p11err.PinLocked | p11err.PinExpired | p11err.PinInvalid):
        return PinIncorrectError(f"{action}: the token rejected the PIN ({name})")
    if isinstance(err, p11err.NoSuchToken):
        return TokenNotFoundError(f"{action}: no such token")
    if isinstance(err, p11err.NoSuchKey):
        return KeyNotFoundError(f"{action}: no such key")
    if isinstance(err, p11err.MechanismInvalid | p11err.FunctionNotSupported):
        return MechanismNotSupportedError(f"{action}: mechanism not supported by the module ({name})")
    if isinstance(err, _UNAVAILABLE):
        return HsmUnavailableError(f"{action}: HSM unavailable ({name})")
    return HsmError(f"{action}: PKCS#11 error {name}")


class Pkcs11Session:
    """Owns the process's PKCS#11 library handle and its single logged-in session.

    SoftHSM runs without internal locks once python-pkcs11 has initialised it with
    C_Initialize(NULL), and python-pkcs11 releases the GIL inside every call, so two threads
    in one process must never be inside the module at once: ``run`` holds a lock for the
    whole call. Closing a logged-in session logs out every session of the process, so there is
    exactly one, kept open until ``close``.
    """

    def __init__(self, uri: Pkcs11Uri, lock: threading.RLock) -> None:
        self.uri = uri
        self._lock = lock
        self._lib: Any = None
        self._session: pkcs11.Session | None = None
        self._generation = 0
        self._closed = False
        self._users = 0
        self._epoch = -1
        #: The last open failed on a module view that predates this call: worth one re-look.
        self._stale_view = False
        #: SHA-256 of the last PIN the token rejected (never the PIN itself).
        self._rejected_pin: bytes | None = None

    @classmethod
    def shared(cls, uri: Pkcs11Uri) -> Pkcs11Session:
        """The process's session for ``uri``'s token, shared by every user in the process.

        A second session would need its own login, and closing either would log out both.
        Each call must be paired with one ``close``.
        """
        key = (uri.module_path, uri.token)
        with _registry_lock:
            session = _sessions.get(key)
            if session is not None and not session._closed and session.uri.pin_source != uri.pin_source:
                # One login per token per process: a second PIN source would silently reuse the first.
                raise HsmConfigError(f"token {uri.token!r} is already open in this process with another PIN source")
            if session is None or session._closed:
                lock = _module_locks.setdefault(uri.module_path, threading.RLock())
                session = _sessions[key] = cls(uri, lock)
            session._users += 1
            return session

    @property
    def generation(self) -> int:
        """Bumped on every (re)login: object handles from older generations are stale."""
        return self._generation

    def open(self) -> None:
        with self._lock:
            self._ensure_open()

    def _ensure_open(self) -> pkcs11.Session:
        if self._closed:
            raise HsmError("the HSM session has been closed")
        try:
            return self._open_once()
        except TokenNotFoundError:
            if not self._stale_view:
                raise
        # The module was initialised before the token appeared: a remoting client (p11-kit)
        # or a network HSM's module lists the slots it saw at C_Initialize. One fresh look.
        return self._open_once()

    def _open_once(self) -> pkcs11.Session:
        path = self.uri.module_path
        self._stale_view = False
        # True once this call has re-initialised the module: its slot list is then current.
        # (A first load is not: python-pkcs11 keeps one handle per path, maybe initialised long ago.)
        fresh_view = False
        if self._lib is not None and _module_needs_reinit.get(path):
            # C_Finalize + C_Initialize is the only way back after the device or the token
            # directory went away; it fails for as long as they are still gone.
            try:
                self._lib.reinitialize()
            except p11err.PKCS11Error as err:
                raise HsmUnavailableError(f"re-initialising PKCS#11 module {path}: {type(err).__name__}") from err
            _module_needs_reinit[path] = False
            _module_epochs[path] = _module_epochs.get(path, 0) + 1
            fresh_view = True
        epoch = _module_epochs.get(path, 0)
        if self._session is not None and self._epoch == epoch:
            return self._session
        # Either never opened, or the library was re-initialised (by us or another token's
        # session in this process): the old handle is gone, and may even have been reissued.
        self._session = None
        pin = self.uri.read_pin()
        pin_digest = hashlib.sha256(pin.encode()).digest()
        if pin_digest == self._rejected_pin:
            # Every failed C_Login counts towards locking the user (a Luna partition locks
            # after a few): a rejected PIN is not tried again until its source changes.
            raise PinIncorrectError(
                f"opening token {self.uri.token!r}: the token rejected this PIN before; "
                "not trying it again until the PIN source changes"
            )
        if self._lib is None:
            apply_module_env(self.uri)
            try:
                self._lib = pkcs11.lib(path)
            except (p11err.PKCS11Error, OSError) as err:
                raise HsmUnavailableError(f"cannot load PKCS#11 module {path}") from err
        try:
            token = self._lib.get_token(token_label=self.uri.token)
            try:
                self._session = token.open(rw=True, user_pin=pin)
            except p11err.UserAlreadyLoggedIn:
                # Login state belongs to the application, not the session: something in this
                # process (or a remoting server that kept its module instance across our
                # reconnect) is still logged in, and a new session shares that login. The
                # session the refused C_Login ran in stays open inside the module until
                # C_Finalize; one handle, not worth an unwrapped C_CloseSession.
                log.info("token %r: already logged in; sharing the existing login", self.uri.token)
                self._session = token.open(rw=True)
        except p11err.PKCS11Error as err:
            translated = translate(err, f"opening token {self.uri.token!r}")
            if isinstance(translated, PinIncorrectError):
                self._rejected_pin = pin_digest
                raise translated from err
            # The module's view of its slots may be stale (e.g. a token that came back):
            # re-initialise before the next attempt.
            _module_needs_reinit[path] = True
            self._stale_view = not fresh_view
            if isinstance(translated, HsmUnavailableError | TokenNotFoundError):
                raise translated from err
            raise HsmUnavailableError(f"opening token {self.uri.token!r}: {type(err).__name__}") from err
        self._epoch = epoch
        self._generation += 1
        log.info("logged in to token %r (generation %d)", self.uri.token, self._generation)
        return self._session

    def run(self, action: str, fn: Callable[[pkcs11.Session], T]) -> T:
        """Run ``fn`` with the session, holding the process-wide PKCS#11 lock."""
        observer = _observer
        if observer is None:
            return self._run(action, fn)
        # Timed once the lock is held (waiting for it is contention, not HSM latency); reported after
        # it is released so the observer never lengthens the critical section.
        elapsed = 0.0
        failure: BaseException | None = None
        try:
            with self._lock:
                started = time.perf_counter()
                try:
                    return self._run(action, fn)
                finally:
                    elapsed = time.perf_counter() - started
        except BaseException as err:
            failure = err
            raise
        finally:
            observer.hsm_call(action, elapsed, failure)

    def _run(self, action: str, fn: Callable[[pkcs11.Session], T]) -> T:
        with self._lock:
            session = self._ensure_open()
            try:
                return fn(session)
            except p11err.PKCS11Error as err:
                translated = translate(err, action)
                if isinstance(translated, HsmUnavailableError):
                    self._drop()
                raise translated from err

    def _drop(self) -> None:
        """Forget the session after a device error; the next call re-initialises the library.

        Old handles are invalid after C_Finalize, and a new C_Login on a still-initialised
        library answers UserAlreadyLoggedIn, so recovery is a full reinitialize then login,
        done lazily by the next call so that it is retried until the HSM is back.
        """
        self._session = None
        _module_needs_reinit[self.uri.module_path] = True

    def reconnect(self) -> None:
        """Re-initialise the library and log in again (after the token came back)."""
        with self._lock:
            self._drop()
            self._ensure_open()

    def close(self) -> None:
        """Release one user's hold; the last one logs out. Idempotent once closed."""
        with _registry_lock, self._lock:
            if self._closed:
                return
            self._users -= 1
            if self._users > 0:
                return
            self._closed = True
            _sessions.pop((self.uri.module_path, self.uri.token), None)
            if self._session is not None:
                with suppress(p11err.PKCS11Error):
                    self._session.close()
                self._session = None


_registry_lock = threading.Lock()
_sessions: dict[tuple[str, str], Pkcs11Session] = {}
#: One lock per loaded module: SoftHSM is unsafe across tokens too, not only per session.
_module_locks: dict[str, threading.RLock] = {}
#: Bumped when a module is re-initialised; sessions opened under an older epoch are dead.
_module_epochs: dict[str, int] = {}
#: Set after a device/session error: the next call into the module re-initialises it first.
_module_needs_reinit: dict[str, bool] = {}


def module_lock(module_path: str) -> threading.RLock:
    """The lock serializing every call into ``module_path`` in this process."""
    with _registry_lock:
        return _module_locks.setdefault(module_path, threading.RLock())
