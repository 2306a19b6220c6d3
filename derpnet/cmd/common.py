"""What the derpconnect commands share: errors with exit codes, the identity key file,
the relay named by --derp, TLS settings, logging, signals, and bounded start-up."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import argparse
    from types import FrameType

from .. import derpmap
from ..errors import AuthenticationError, HandshakeError, UpgradeError
from ..keys import PrivateKey, PublicKey, describe_key_text, key_file_mode_problem, redact_key_material

log = logging.getLogger("derpnet.cmd")

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1  # a runtime failure (relay unreachable, port in use, refused, ...): as the Go tool
EXIT_USAGE = 2  # a mistake on the command line (malformed key, missing --derp, bad region, ...)


class UserError(Exception):
    """An error to report as one line on stderr, then exit with `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


class UsageError(UserError):
    """A command-line mistake. Its message may quote what the user typed, so anything in it
    that may be key material is replaced by what kind of text it was."""

    def __init__(self, message: str) -> None:
        super().__init__(redact_key_material(message), EXIT_USAGE)


# --------------------------------------------------------------------------
# Logging


class _Formatter(logging.Formatter):
    """Go's `log` layout (`2006/01/02 15:04:05 message`); the logger name only for the
    libraries' own records in debug mode."""

    def __init__(self, debug: bool) -> None:
        super().__init__(datefmt="%Y/%m/%d %H:%M:%S")
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        if self.debug and not record.name.startswith("derpnet.cmd"):
            msg = f"[{record.name}] {msg}"
        line = f"{self.formatTime(record, self.datefmt)} {msg}"
        if record.exc_info and self.debug:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(verbose: bool, debug: bool) -> None:
    """derpconnect's and the libraries' (derpnet, derpquic) lines at info, anything else at
    warning (info with -v); everything at debug with --debug. All to stderr, like the Go tool."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(debug or verbose))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    # our lines and the libraries' notable events (relay link lost/restored, peers refused)
    for name in ("derpnet", "derpquic"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic's per-packet chatter


# --------------------------------------------------------------------------
# Keys


def user_config_dir() -> Path:
    """Go's `os.UserConfigDir()`: `$XDG_CONFIG_HOME` (if absolute) or `~/.config` on Linux and
    other Unixes, `~/Library/Application Support` on macOS, `%AppData%` on Windows."""
    if sys.platform == "win32":
        appdata = os.environ.get("AppData")
        if not appdata:
            raise UserError("cannot find the user config directory: %AppData% is not set")
        return Path(appdata)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support"
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg)
    home = os.environ.get("HOME") or os.path.expanduser("~")
    if not home or home == "~":
        raise UserError("cannot find the user config directory: neither $XDG_CONFIG_HOME nor $HOME is set")
    return Path(home) / ".config"


def key_path(name: str) -> Path:
    """Where `--key NAME` lives: `<user config dir>/derpconnect/NAME`, as the Go tool."""
    if redact_key_material(name) != name:
        raise UsageError("--key takes the name of a key file, not a key (not shown); "
                         "use --key-file PATH for a file elsewhere")
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise UsageError(f"--key {name!r}: give a plain name (the file lives in "
                         f"{user_config_dir() / 'derpconnect'}); use --key-file PATH for a path")
    return user_config_dir() / "derpconnect" / name


def key_file_arg(text: str, what: str = "--key-file") -> Path:
    """A key file path from the command line. A key pasted where a path goes would become a
    file name, then a log line: refused without showing it."""
    if redact_key_material(text) != text:
        raise UsageError(f"{what} takes a file path, not a key (not shown)")
    return Path(text).expanduser()


def identity_path(args: argparse.Namespace) -> Path:
    if getattr(args, "key_file", None):
        return key_file_arg(args.key_file)
    return key_path(args.key)


def load_key(path: Path) -> PrivateKey:
    try:
        key = PrivateKey.load(path)
    except FileNotFoundError:
        raise
    except PermissionError:
        raise UserError(f"cannot read key file {path}: permission denied") from None
    except IsADirectoryError:
        raise UsageError(f"key file {path} is a directory") from None
    except OSError as e:
        raise UserError(f"cannot read key file {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"malformed key file: {e}") from None
    problem = key_file_mode_problem(path)
    if problem:
        log.warning("%s", problem)
    return key


def create_key_file(path: Path, key: PrivateKey, *, raw: bool = True, overwrite: bool = False) -> None:
    """Write `key` to `path` with mode 0600, atomically. Unless `overwrite`, fails with
    FileExistsError if the file exists, even when another process creates it at the same
    moment (the new file is linked into place, never renamed over an existing one)."""
    if overwrite:
        key.save(path, raw=raw)
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-key-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.raw if raw else (key.to_text() + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def load_or_create_identity(args: argparse.Namespace) -> tuple[PrivateKey, Path]:
    """The node's private key: --key-file PATH, or --key NAME under the user config dir;
    created (raw 32 bytes, mode 0600, the Go tool's format) on first use."""
    path = identity_path(args)
    try:
        return load_key(path), path
    except FileNotFoundError:
        pass
    key = PrivateKey.generate()
    try:
        create_key_file(path, key)
    except FileExistsError:  # created by another process just now: use that one
        return load_key(path), path
    except OSError as e:
        raise UserError(f"cannot create key file {path}: {e.strerror or e}") from None
    log.info("created a new private key in %s (public key %s)", path, key.public_key.b64())
    return key, path


KEY_FORMS = "the 43-character base64url key `serve` prints, nodekey:<64 hex> or 64 hex characters"


class KeyInUse(UserError):
    """Another derpconnect on this machine holds the identity lock."""


def lock_identity(path: Path, *, exclusive: bool) -> int | None:
    """Lock `PATH.lock` next to the key file for as long as the process runs (the kernel
    drops the lock when it ends, even on a crash): `serve` exclusively, `join` shared. Two
    processes with one key take each other's traffic at the relay (it delivers to the newest
    connection of a key), so a `serve` never starts next to another user of its key. Returns
    the descriptor to keep open (None where locks are unavailable: then nothing is checked)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:  # a read-only directory: no lock rather than no service
        log.debug("cannot create %s: %s; the key is not locked", lock_path, e.strerror or e)
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        who = "another derpconnect (a serve or a join)" if exclusive else "a derpconnect serve"
        raise KeyInUse(f"key file {path} is in use by {who} on this machine: two processes with one key "
                       f"take each other's traffic at the relay; give this one its own identity with "
                       f"--key NAME (e.g. --key laptop)") from None
    except OSError as e:  # a file system without locks
        os.close(fd)
        log.debug("cannot lock %s: %s; the key is not locked", lock_path, e.strerror or e)
        return None
    return fd


def parse_public_key(text: str, what: str = "public key") -> PublicKey:
    """A public key from the command line. The error says what was received (its kind and
    length, never its characters: it may be a secret pasted in the wrong place) and the
    forms expected."""
    try:
        return PublicKey.parse(text)
    except (ValueError, TypeError) as e:
        detail = str(e)
        for prefix in ("public key: ", "nodekey: "):
            if detail.startswith(prefix):
                detail = detail[len(prefix):]
        if "private key" in detail:  # the reason is what matters (never share it)
            raise UsageError(f"malformed {what} ({describe_key_text(text)}): {detail}") from None
        why = "" if detail.startswith("expected") else f": {detail}"
        raise UsageError(f"malformed {what}: got {describe_key_text(text)}{why}; expected {KEY_FORMS}") from None


# --------------------------------------------------------------------------
# Relay


def derp_map(args: argparse.Namespace) -> derpmap.DerpMap:
    try:
        return derpmap.load(getattr(args, "derp_map", None))
    except derpmap.DerpMapError as e:
        raise UsageError(str(e)) from None


def relay_target(args: argparse.Namespace) -> derpmap.RelayTarget:
    spec = getattr(args, "derp", None)
    if not spec:
        raise UsageError("no relay given: use --derp=HOST (a DERP server host name such as "
                         "derp1f.tailscale.com, a URL, or a region code: see `derpconnect regions`), "
                         "or set DERPNET_DERP")
    try:
        target = derpmap.resolve(spec, derp_map(args) if _may_be_region(spec) else None)
    except derpmap.DerpMapError as e:
        raise UsageError(f"--derp={spec}: {e}") from None
    if "://" not in spec and target.region is None and target.host.startswith("https://"):
        # a bare HOST:PORT: most often a dev relay, which speaks plain HTTP by default
        plain = "http://" + target.host[len("https://"):]
        log.info("--derp=%s taken as %s (TLS); for a plain-HTTP relay such as `derpconnect relay` "
                 "use --derp=%s", spec.strip(), target.host, plain)
    return target


def _may_be_region(spec: str) -> bool:
    s = spec.strip()
    return "." not in s and ":" not in s and "/" not in s


def relay_ssl_for(args: argparse.Namespace, target: derpmap.RelayTarget) -> Callable[[str], dict[str, Any]]:
    """The TLS options for each host of `target`, as keyword arguments: --derp-ca for every
    host when given (the map's InsecureForTests never overrides it); else no certificate
    check for the hosts whose own map node is InsecureForTests, the default check for all
    others."""
    ctx = relay_ssl_context(args)
    if ctx is not None:
        if target.insecure:
            log.warning("the DERP map marks %s InsecureForTests: ignored, --derp-ca is checked",
                        ", ".join(sorted(target.insecure_hosts)))
        return lambda host: {"ssl_context": ctx}

    def for_host(host: str) -> dict[str, Any]:
        if host not in target.insecure_hosts:
            return {}
        log.warning("the DERP map marks relay %s InsecureForTests: its TLS certificate is not checked", host)
        return {"ssl_context": derpmap.unverified_context()}

    return for_host


def relay_ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """None (the library's default verification) unless --derp-ca is given."""
    ca = getattr(args, "derp_ca", None)
    if not ca:
        return None
    try:
        return ssl.create_default_context(cafile=str(Path(ca).expanduser()))
    except FileNotFoundError:
        raise UsageError(f"--derp-ca {ca}: no such file") from None
    except (ssl.SSLError, OSError, ValueError) as e:
        raise UsageError(f"--derp-ca {ca}: not a PEM CA certificate file ({e})") from None


_RELAY_PREFIX = re.compile(r"^(?:relay \S+?: )+")
_RESOLVE_PREFIX = re.compile(r"^cannot resolve \S+: ")


def _detail(e: BaseException) -> str:
    """The exception's own text without the "relay URL: " the library puts in front (the
    line names the relay once, itself)."""
    text = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
    return _RELAY_PREFIX.sub("", str(text))


def describe_error(e: BaseException, relay: str = "") -> str:
    """One human line for an exception from connecting to a relay or a peer; the relay's
    URL appears once."""
    where = f"relay {relay}" if relay else "relay"
    detail = _detail(e)
    if isinstance(e, ssl.SSLCertVerificationError):
        return (f"TLS certificate of {where} not trusted: {e.verify_message or e.reason or detail} "
                f"(for a private CA use --derp-ca FILE)")
    if isinstance(e, ssl.SSLError) or (isinstance(e, ConnectionResetError) and "TLS handshake" in detail):
        return f"TLS with {where} failed: {getattr(e, 'reason', None) or detail}{_plain_http_hint(relay)}"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve {where}: {_RESOLVE_PREFIX.sub('', detail)}"
    if isinstance(e, ConnectionRefusedError):
        return f"{where} refused the connection (nothing listening there?)"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return f"{where} did not answer in time"
    if isinstance(e, UpgradeError):
        return f"{where} is not a DERP server or refused us: {detail}"
    if isinstance(e, HandshakeError):
        return f"DERP handshake with {where} failed: {detail}"
    if isinstance(e, AuthenticationError):
        return f"authentication failed: {detail}"
    return f"{where}: {detail}"


def _plain_http_hint(relay: str) -> str:
    """A TLS handshake that fails at once is most often a plain-HTTP relay (such as
    `derpconnect relay` without --tls) named with https://."""
    if not relay.startswith("https://"):
        return ""
    return f" (if it is a plain-HTTP relay, use --derp=http://{relay[len('https://'):]})"


# --------------------------------------------------------------------------
# Signals and bounded start-up


class Stopper:
    """SIGINT/SIGTERM set `event` (the first time; a second signal exits at once)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""
        self._old: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def install(self) -> Stopper:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.event.set()

    def restore(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old.clear()

    def is_set(self) -> bool:
        return self.event.is_set()


class Interrupted(Exception):
    """Start-up was interrupted by a signal."""


def run_bounded(fn: Callable[[], T], timeout: float, what: str, stop: Stopper) -> T:
    """Run fn() in a helper thread; give up after `timeout` seconds (UserError) or on a
    signal (Interrupted). A late result is closed if it has a close()."""
    box: dict[str, Any] = {}
    done = threading.Event()
    abandoned = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e
        done.set()
        if abandoned.is_set() and "value" in box:
            close = getattr(box["value"], "close", None)
            if close:
                try:
                    close()
                except Exception:
                    pass

    threading.Thread(target=target, name=f"start:{what}", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not done.wait(0.1):
        if stop.is_set():
            abandoned.set()
            raise Interrupted()
        if time.monotonic() >= deadline:
            abandoned.set()
            raise UserError(f"{what}: no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def close_bounded(objs: Iterable[Any], timeout: float = 0.5, linger: float | None = None) -> None:
    """Close objects in a helper thread, waiting at most `timeout` seconds overall
    (`close(linger=...)` where the object takes it: derpquic's Listener and Dialer)."""
    objs = [o for o in objs if o is not None]
    if not objs:
        return

    def target() -> None:
        for o in objs:
            try:
                if linger is not None:
                    try:
                        o.close(linger=linger)
                        continue
                    except TypeError:
                        pass
                o.close()
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                log.debug("close %r: %s", o, e)

    th = threading.Thread(target=target, name="shutdown-close", daemon=True)
    th.start()
    th.join(timeout)


def host_port(text: str) -> str:
    """argparse type: HOST:PORT (kept as text; the library parses it)."""
    import argparse

    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


def path_options(args: object) -> dict[str, Any]:
    """The direct-path options of serve and join (--no-direct, --stun) for derpquic."""
    options: dict[str, Any] = {"direct": not getattr(args, "no_direct", False)}
    stun = getattr(args, "stun", None)
    if stun:
        options["stun"] = stun
    return options


def positive_float(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    import argparse

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < v < 1e9:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def max_conns(text: str) -> int:
    """argparse type of --max-conns: an integer from 1 to 10000."""
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= v <= 10000:
        raise argparse.ArgumentTypeError("must be between 1 and 10000")
    return v


def local_endpoint(text: str, *, default_host: str, what: str) -> tuple[str, int]:
    """`PORT` or `HOST:PORT` (`[v6]:PORT`) -> (host, port)."""
    s = text.strip()
    host = default_host
    port_s = s
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or not s[end + 1:].startswith(":"):
            raise UsageError(f"{what} {text!r}: expected PORT, HOST:PORT or [IPv6]:PORT")
        host, port_s = s[1:end], s[end + 2:]
    elif ":" in s:
        host, port_s = s.rsplit(":", 1)
        if ":" in host:
            raise UsageError(f"{what} {text!r}: write an IPv6 address as [ADDR]:PORT")
        if not host:
            host = default_host
    if not port_s.isdigit() or int(port_s) > 65535:
        raise UsageError(f"{what} {text!r}: {port_s!r} is not a port number (0-65535)")
    return host, int(port_s)
