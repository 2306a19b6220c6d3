"""A network lab made of Linux network namespaces: an "internet", NAT routers, peers.

    with Lab.two_nats(nat_a="eim", nat_b="symmetric") as lab:
        relay = lab.run_logged(lab.inet_ns, [...])           # something on lab.relay_ip
        s = lab.socket(lab.peer_a_ns)                         # a UDP socket living behind NAT A
        lab.block_udp(lab.nat_a_ns)                           # UDP through NAT A now dropped

Topology (`two_nats`; `one_lan` puts both peers on one LAN behind one NAT)::

    inet  (bridge br0: 198.18.0.1 = relay_ip, 198.18.0.2 = relay_ip2)
     ├── nata: wan 198.18.0.10 = nat_a_public_ip  ── lan 10.0.1.1 ── a: eth0 10.0.1.2 = peer_a_ip
     └── natb: wan 198.18.0.20 = nat_b_public_ip  ── lan 10.0.2.1 ── b: eth0 10.0.2.2 = peer_b_ip

NAT kinds (nftables in the NAT namespace, IPv4 only; IPv6 is disabled in the lab):
  "eim"        `masquerade`: endpoint-independent mapping; the source port is kept when free,
               so one socket has one public ip:port for every destination (hole punching works)
  "symmetric"  `masquerade random`: a new random port per destination (hole punching fails)
  "none"       the peer sits on the internet segment itself (nat_x_ns is None and
               nat_x_public_ip == peer_x_ip)
Every NAT filters like a real one (address-and-port-dependent, Linux conntrack): from `wan`
only packets of flows that the inside opened pass (to the peer or to the router itself);
everything else is dropped silently, before conntrack records it (so an early punch packet
from the other side leaves no entry that would steal the port mapping). There is no DNAT.
Conntrack timeouts are the kernel's (UDP: 30 s unreplied, 120 s or more once replied).

The namespaces are named `dn<pid>-<n>-<role>` and have no link to the host: traffic can only
go to loopback and between the lab's own namespaces. Creating a Lab first deletes the `dn*`
namespaces of processes that no longer exist (crashed runs), killing what still runs in them.
`close()` (also on `with` exit, at interpreter exit, and from the pytest fixtures) stops every
process started through the lab (SIGTERM, SIGKILL after a short grace), then anything else left
inside its namespaces, then deletes the namespaces (their links and bridges go with them).
It is idempotent. `tc netem` is not used (not available in every kernel).

Needs root, `ip` (iproute2) and `nft` (nftables): `lab_unavailable_reason()` says why not,
`require_lab()` skips a pytest test (or fails it when DERPNET_REQUIRE_LAB=1).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.interop_peers import LoggedProcess

__all__ = ["Lab", "Side", "NAT_KINDS", "lab_unavailable_reason", "require_lab", "list_namespaces",
           "remove_stale_namespaces", "netns_entered", "call_in_netns", "REQUIRE_LAB"]

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRE_LAB = os.environ.get("DERPNET_REQUIRE_LAB") == "1"
NAT_KINDS = ("eim", "symmetric", "none")

INET_NET = ipaddress.ip_network("198.18.0.0/24")  # RFC 2544 benchmark range: never routed
RELAY_IP = "198.18.0.1"
RELAY_IP2 = "198.18.0.2"
PUBLIC_IPS = {"a": "198.18.0.10", "b": "198.18.0.20"}
LAN_A, LAN_B = "10.0.1.0/24", "10.0.2.0/24"

_NAME_RX = re.compile(r"^dn(\d+)-")
_counter = itertools.count(1)
_CLONE_NEWNET = 0x40000000
_GRACE = 1.0  # seconds between SIGTERM and SIGKILL at teardown
_MASQUERADE = {"eim": "masquerade", "symmetric": "masquerade random"}


# --------------------------------------------------------------------------
# Commands


def _cmd(argv: Sequence[str], *, input: str | None = None, timeout: float = 10.0, check: bool = True
         ) -> subprocess.CompletedProcess:
    """Run a short command; on failure raise RuntimeError naming it and its stderr."""
    p = subprocess.run([str(a) for a in argv], input=input, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed (rc={p.returncode}): {p.stderr.strip()}")
    return p


def _ip_batch(ns: str, lines: Sequence[str]) -> None:
    """`ip -n NS -batch -`: several ip commands in one process."""
    _cmd(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n")


def exec_argv(ns: str, argv: Sequence) -> list[str]:
    """`argv` run inside namespace `ns` (`ip netns exec` execs it: the pid stays the same)."""
    return ["ip", "netns", "exec", ns, *[str(a) for a in argv]]


def list_namespaces() -> list[str]:
    """Names from `ip netns list` (all of them, not only the lab's)."""
    out = _cmd(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(ns: str) -> None:
    """SIGKILL whatever still runs in namespace `ns` (only ever called for the lab's own)."""
    p = _cmd(["ip", "netns", "pids", ns], check=False)
    for word in p.stdout.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(word), signal.SIGKILL)


def _delete_namespace(ns: str) -> None:
    _kill_inside(ns)
    _cmd(["ip", "netns", "del", ns], check=False)


def remove_stale_namespaces() -> list[str]:
    """Delete `dn<pid>-*` namespaces whose pid is gone (a crashed earlier run); returns them."""
    stale = []
    for name in list_namespaces():
        m = _NAME_RX.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _delete_namespace(name)
            stale.append(name)
    return stale


# --------------------------------------------------------------------------
# Entering a namespace from Python (per thread)

_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _enter(ns: str) -> None:
    """Move the calling thread into network namespace `ns`."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def netns_entered(ns: str) -> Iterator[None]:
    """Move the CALLING THREAD (only it) into network namespace `ns`, and back on exit.

    Sockets created meanwhile stay in `ns` for their whole life; threads started meanwhile
    start in `ns`. Prefer `call_in_netns` or `Lab.socket`, which use a throwaway thread."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _enter(ns)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def call_in_netns(ns: str, fn: Callable[[], object]) -> object:
    """Run `fn()` on a fresh thread inside namespace `ns`; return its result (or raise its error)."""
    box: dict = {}

    def target() -> None:
        try:
            _enter(ns)
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name=f"netns-call:{ns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _write_sysctls(ns: str, values: dict) -> None:
    def write() -> None:
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(str(value))
    call_in_netns(ns, write)


# --------------------------------------------------------------------------
# Availability


_probe_lock = threading.Lock()
_probe_result: list[str | None] = []


def lab_unavailable_reason() -> str | None:
    """None if namespaces, veth pairs and nftables can be used here, else why not (cached)."""
    with _probe_lock:
        if not _probe_result:
            _probe_result.append(_probe())
        return _probe_result[0]


def _probe() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the network lab needs root (network namespaces, veth pairs, nftables)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"the network lab needs `{tool}` on PATH (apt-get install {package})"
    ns = f"dn{os.getpid()}-probe{next(_counter)}"
    try:
        _cmd(["ip", "netns", "add", ns])
        _cmd(["ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
        _cmd(exec_argv(ns, ["nft", "add table ip probe; add chain ip probe post { type nat hook postrouting "
                                   "priority srcnat; }; add rule ip probe post oifname p0 masquerade random"]))
        _write_sysctls(ns, {"net.ipv4.ip_forward": 1})
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return f"cannot build a network namespace lab here: {e}"
    finally:
        if ns in list_namespaces():
            _delete_namespace(ns)
    return None


def require_lab() -> None:
    """In a pytest test: skip when the lab cannot be built here (fail if DERPNET_REQUIRE_LAB=1)."""
    import pytest

    reason = lab_unavailable_reason()
    if reason is None:
        return
    if REQUIRE_LAB:
        pytest.fail(f"network lab required (DERPNET_REQUIRE_LAB=1) but {reason}")
    pytest.skip(reason)


# --------------------------------------------------------------------------
# The lab


@dataclass(frozen=True)
class Side:
    """One peer and its router. `nat_ns` is None for kind "none"; `public_ip` is what the
    internet sees (the NAT's wan address, or the peer's own for "none"); `lan_ip` is the
    peer's default gateway (None for "none")."""

    name: str  # "a" or "b"
    peer_ns: str
    peer_ip: str
    nat_kind: str
    nat_ns: str | None
    public_ip: str
    lan_ip: str | None


_LIVE: set = set()  # open labs (strong: a forgotten lab is still closed at exit)


@atexit.register
def _close_all() -> None:
    for lab in list(_LIVE):
        lab.close()


class Lab:
    """A set of namespaces and the processes started in them; build with `two_nats()` or
    `one_lan()`, use as a context manager (or call `close()`)."""

    relay_ip = RELAY_IP    # the relay's address in inet (on its bridge br0)
    relay_ip2 = RELAY_IP2  # a second inet address (a second STUN server or relay)

    def __init__(self) -> None:
        self.stale_removed = remove_stale_namespaces()
        self.prefix = f"dn{os.getpid()}-{next(_counter)}"
        self.namespaces: list[str] = []
        self.topology = ""
        self.inet_ns = ""
        self.a: Side | None = None
        self.b: Side | None = None
        self._procs: list = []          # Popen or LoggedProcess, in start order
        self._cleanups: list[Callable[[], object]] = []
        self._sockets: list[socket.socket] = []  # from socket(): closed at teardown
        self._frozen: set = set()
        self._blocked: set = set()
        self._lock = threading.Lock()
        self._closed = False
        _LIVE.add(self)

    # -- flat attributes for the two sides --------------------------------------------------

    peer_a_ns = property(lambda self: self.a.peer_ns)
    peer_b_ns = property(lambda self: self.b.peer_ns)
    peer_a_ip = property(lambda self: self.a.peer_ip)
    peer_b_ip = property(lambda self: self.b.peer_ip)
    nat_a_ns = property(lambda self: self.a.nat_ns)
    nat_b_ns = property(lambda self: self.b.nat_ns)
    nat_a_kind = property(lambda self: self.a.nat_kind)
    nat_b_kind = property(lambda self: self.b.nat_kind)
    nat_a_public_ip = property(lambda self: self.a.public_ip)
    nat_b_public_ip = property(lambda self: self.b.public_ip)
    nat_a_lan_ip = property(lambda self: self.a.lan_ip)
    nat_b_lan_ip = property(lambda self: self.b.lan_ip)

    # -- building --------------------------------------------------------------------------

    @classmethod
    def two_nats(cls, nat_a: str = "eim", nat_b: str = "eim", *, lan_a: str = LAN_A, lan_b: str = LAN_B) -> Lab:
        """inet (relay_ip) + peer A behind NAT A + peer B behind NAT B. Kinds: NAT_KINDS.
        `lan_b=lan_a` gives both homes the same private subnet (and the same peer address)."""
        for kind in (nat_a, nat_b):
            if kind not in NAT_KINDS:
                raise ValueError(f"NAT kind {kind!r}: expected one of {NAT_KINDS}")
        lab = cls()
        try:
            lab.topology = "two_nats"
            lab._make_inet()
            lab.a = lab._make_side("a", nat_a, lan_a)
            lab.b = lab._make_side("b", nat_b, lan_b)
        except BaseException:
            lab.close()
            raise
        return lab

    @classmethod
    def one_lan(cls, nat: str = "eim", *, lan: str = LAN_A) -> Lab:
        """inet + ONE NAT (ns `nat`, public 198.18.0.10) whose LAN bridge holds peers A (.2) and
        B (.3) of one private subnet: they reach each other directly on their local addresses.
        nat_a_ns == nat_b_ns and nat_a_public_ip == nat_b_public_ip."""
        if nat not in ("eim", "symmetric"):
            raise ValueError(f"one_lan NAT kind {nat!r}: expected 'eim' or 'symmetric'")
        lab = cls()
        try:
            lab.topology = "one_lan"
            lab._make_inet()
            net = ipaddress.ip_network(lan)
            hosts = net.hosts()
            gw, ip_a, ip_b = (str(next(hosts)) for _ in range(3))
            nat_ns = lab._add_ns("nat")
            public = PUBLIC_IPS["a"]
            lab._wan(nat_ns, public)
            _ip_batch(nat_ns, ["link add lan type bridge", f"addr add {gw}/{net.prefixlen} dev lan", "link set lan up"])
            sides = []
            for name, ip in (("a", ip_a), ("b", ip_b)):
                peer_ns = lab._add_ns(name)
                _cmd(["ip", "-n", peer_ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"l{name}",
                      "netns", nat_ns])
                _ip_batch(nat_ns, [f"link set l{name} master lan", f"link set l{name} up"])
                _ip_batch(peer_ns, [f"addr add {ip}/{net.prefixlen} dev eth0", "link set eth0 up",
                                    f"route add default via {gw}"])
                sides.append(Side(name, peer_ns, ip, nat, nat_ns, public, gw))
            lab._nat_rules(nat_ns, nat)
            lab.a, lab.b = sides
        except BaseException:
            lab.close()
            raise
        return lab

    def _add_ns(self, role: str) -> str:
        ns = f"{self.prefix}-{role}"
        _cmd(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        _ip_batch(ns, ["link set lo up"])
        _write_sysctls(ns, {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        return ns

    def _make_inet(self) -> None:
        self.inet_ns = self._add_ns("inet")
        _ip_batch(self.inet_ns, ["link add br0 type bridge", "link set br0 up",
                                 f"addr add {RELAY_IP}/{INET_NET.prefixlen} dev br0",
                                 f"addr add {RELAY_IP2}/{INET_NET.prefixlen} dev br0"])

    def _wan(self, ns: str, public_ip: str, dev: str = "wan") -> None:
        """Plug `dev` of `ns` into inet's bridge with `public_ip`, default route via the relay."""
        port = f"p{ns.rsplit('-', 1)[1]}"[:15]
        _cmd(["ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", port, "netns", self.inet_ns])
        _ip_batch(self.inet_ns, [f"link set {port} master br0", f"link set {port} up"])
        _ip_batch(ns, [f"addr add {public_ip}/{INET_NET.prefixlen} dev {dev}", f"link set {dev} up",
                       f"route add default via {RELAY_IP}"])

    def _make_side(self, name: str, kind: str, lan: str) -> Side:
        public = PUBLIC_IPS[name]
        if kind == "none":
            peer_ns = self._add_ns(name)
            self._wan(peer_ns, public, dev="eth0")
            return Side(name, peer_ns, public, kind, None, public, None)
        net = ipaddress.ip_network(lan)
        hosts = net.hosts()
        gw, ip = str(next(hosts)), str(next(hosts))
        nat_ns = self._add_ns(f"nat{name}")
        peer_ns = self._add_ns(name)
        self._wan(nat_ns, public)
        _cmd(["ip", "-n", peer_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "lan", "netns", nat_ns])
        _ip_batch(nat_ns, [f"addr add {gw}/{net.prefixlen} dev lan", "link set lan up"])
        _ip_batch(peer_ns, [f"addr add {ip}/{net.prefixlen} dev eth0", "link set eth0 up",
                            f"route add default via {gw}"])
        self._nat_rules(nat_ns, kind)
        return Side(name, peer_ns, ip, kind, nat_ns, public, gw)

    def _nat_rules(self, ns: str, kind: str) -> None:
        _write_sysctls(ns, {"net.ipv4.ip_forward": 1})
        self.nft(ns, f"""
table ip dnlab_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" {_MASQUERADE[kind]}
    }}
}}
table inet dnlab_filter {{
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }}
}}
""")

    # -- running things inside -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("lab is closed")

    def exec_argv(self, ns: str, argv: Sequence) -> list[str]:
        """The command line that runs `argv` inside `ns` (a prefix for other process helpers)."""
        return exec_argv(ns, argv)

    def run(self, ns: str, argv: Sequence, **popen_kwargs) -> subprocess.Popen:
        """Start `argv` inside `ns` (stdin defaults to /dev/null); stopped at teardown."""
        self._check_open()
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(exec_argv(ns, argv), **popen_kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def run_logged(self, ns: str, argv: Sequence, *, log_path=None, env: dict | None = None,
                   cwd=None) -> LoggedProcess:
        """Start `argv` inside `ns` as a LoggedProcess (`wait_for_line`, `output`); stopped at teardown."""
        self._check_open()
        proc = LoggedProcess(exec_argv(ns, argv), log_path, env=env, cwd=str(cwd or REPO_ROOT))
        with self._lock:
            self._procs.append(proc)
        return proc

    def check_output(self, ns: str, argv: Sequence, *, timeout: float = 10.0, **kwargs) -> str:
        """Run `argv` inside `ns` to completion and return its stdout (text); raises
        subprocess.CalledProcessError (with stderr) on a non-zero exit."""
        self._check_open()
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.check_output(exec_argv(ns, argv), timeout=timeout, text=True, **kwargs)

    def nft(self, ns: str, script: str) -> None:
        """Load an nftables script (`nft -f -`) inside `ns`."""
        _cmd(exec_argv(ns, ["nft", "-f", "-"]), input=script)

    def socket(self, ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM,
               proto: int = 0) -> socket.socket:
        """A socket of THIS process that lives in namespace `ns` (use it from any thread);
        closed at teardown if still open."""
        self._check_open()
        s = call_in_netns(ns, lambda: socket.socket(family, type, proto))
        with self._lock:
            self._sockets.append(s)
        return s

    def connect(self, ns: str, address: tuple, timeout: float = 5.0) -> socket.socket:
        """A TCP connection from inside `ns` to `address` (like socket.create_connection)."""
        s = self.socket(ns, socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(address)
        except BaseException:
            s.close()
            raise
        return s

    def add_cleanup(self, fn: Callable[[], object]) -> None:
        """Call `fn()` at teardown, before processes are killed (last added, first called)."""
        with self._lock:
            self._cleanups.append(fn)

    # -- faults ----------------------------------------------------------------------------

    def block_udp(self, ns: str, *, allow_ports: Sequence[int] = ()) -> None:
        """Drop UDP at router or host `ns`, now and until unblock_udp (established flows too:
        "UDP blocked mid-transfer"). TCP and ICMP keep working.

        In a NAT namespace: every UDP packet forwarded from or to `wan` is dropped silently
        (the peer's sends succeed and vanish; nothing comes in); LAN-local traffic is untouched.
        In any other namespace (a "none" peer, inet): UDP in and out on every interface but
        loopback is dropped; local sends fail with EPERM, as under a host firewall.
        `allow_ports`: UDP with one of these as source or destination port still passes
        (e.g. the relay's STUN port, for a network that allows only STUN)."""
        self._check_open()
        allow = ""
        if allow_ports:
            ports = ", ".join(str(int(p)) for p in allow_ports)
            allow = f"udp sport {{ {ports} }} accept\n        udp dport {{ {ports} }} accept\n        "
        if ns in {s.nat_ns for s in (self.a, self.b) if s is not None}:
            chains = f"""
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        {allow}iifname "wan" meta l4proto udp drop
        oifname "wan" meta l4proto udp drop
    }}"""
        else:
            chains = f"""
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        {allow}iifname != "lo" meta l4proto udp drop
    }}
    chain output {{
        type filter hook output priority filter - 10; policy accept;
        {allow}oifname != "lo" meta l4proto udp drop
    }}"""
        self.unblock_udp(ns)
        self.nft(ns, f"table inet dnlab_block {{{chains}\n}}\n")
        self._blocked.add(ns)

    def unblock_udp(self, ns: str) -> None:
        """Undo block_udp(ns) (no-op when not blocked)."""
        if ns in self._blocked:
            _cmd(exec_argv(ns, ["nft", "delete table inet dnlab_block"]))
            self._blocked.discard(ns)

    def try_delay(self, ns: str, dev: str, ms: float) -> bool:
        """Add `tc netem` delay on `dev` in `ns` if this kernel has netem; False (and nothing
        changed) when it does not. Tests must not depend on it."""
        p = _cmd(exec_argv(ns, ["tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{ms}ms"]),
                 check=False)
        return p.returncode == 0

    def freeze(self, proc) -> None:
        """SIGSTOP a process (a Popen, LoggedProcess, relay handle with .proc, or a pid)."""
        pid = _pid_of(proc)
        os.kill(pid, signal.SIGSTOP)
        self._frozen.add(pid)

    def thaw(self, proc) -> None:
        """SIGCONT a process frozen with freeze()."""
        pid = _pid_of(proc)
        self._frozen.discard(pid)
        os.kill(pid, signal.SIGCONT)

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything and delete the namespaces. Idempotent. A failing cleanup callback
        does not stop the rest: its error is raised at the end, after the namespaces are gone
        (as is a RuntimeError if one could not be deleted)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cleanups, self._cleanups = self._cleanups[::-1], []
            procs, self._procs = self._procs, []
        for pid in list(self._frozen):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        self._frozen.clear()
        errors = []
        for fn in cleanups:
            try:
                fn()
            except Exception as e:  # teardown goes on; the namespaces must go
                errors.append(e)
        _stop_processes(procs)
        for ns in self.namespaces:
            _kill_inside(ns)  # what they started themselves (it may hold their pipes)
        _release(procs)
        for s in self._sockets:
            s.close()
        self._sockets.clear()
        for ns in reversed(self.namespaces):
            _delete_namespace(ns)
        _LIVE.discard(self)
        left = set(self.namespaces) & set(list_namespaces())
        if left:
            raise RuntimeError(f"lab namespaces not deleted: {sorted(left)}")
        if errors:
            raise errors[0]

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Lab {self.prefix} {self.topology} a={self.a and self.a.nat_kind} b={self.b and self.b.nat_kind}>"


def _pid_of(proc) -> int:
    if isinstance(proc, int):
        return proc
    if hasattr(proc, "pid"):
        return proc.pid
    if hasattr(proc, "proc"):
        return _pid_of(proc.proc)
    raise TypeError(f"no process in {proc!r}")


def _stop_processes(procs: list) -> None:
    """SIGTERM all, wait up to _GRACE for all together, SIGKILL the rest."""
    popens = [p.proc if isinstance(p, LoggedProcess) else p for p in procs]
    for p in popens:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.terminate()
    deadline = time.monotonic() + _GRACE
    for p in popens:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)


def _release(procs: list) -> None:
    """Join log readers and close pipes (after every process that could hold them is dead)."""
    for p in procs:
        if isinstance(p, LoggedProcess):
            with contextlib.suppress(Exception):
                p.stop(timeout=1)  # joins its reader, which has seen EOF
            p = p.proc
        for pipe in (p.stdin, p.stdout, p.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
