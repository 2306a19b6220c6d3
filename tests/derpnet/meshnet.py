"""A DERP mesh on loopback for tests: members are our relay or Tailscale's derper, all
started with the same `--mesh-psk-file` and `--mesh-with` naming every member (derper's way).

Members speak plain HTTP, so derper's mesh client is told to dial `http://` with
TS_DEBUG_USE_DERP_HTTP=1 (in the environment of every member; ours honours it too).
`Peer` is a DERP client that records what it receives; `deliver()` sends until the packet
arrives (a mesh forms as its members' watch links connect; derper retries every 5 s).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from derpnet.client import DerpClient
from derpnet.keys import PrivateKey, PublicKey
from tests.interop_peers import GoDerper, free_port
from tests.relays import OurRelay

MESH_ENV = "TS_DEBUG_USE_DERP_HTTP"


def write_mesh_key(path: Path, key: bytes | None = None) -> Path:
    path.write_text((key or os.urandom(32)).hex() + "\n")
    path.chmod(0o600)
    return path


class Mesh:
    """Members of one mesh: `kinds` like ("derper", "derper", "ours"); start with `with`."""

    def __init__(self, workdir: Path, kinds: Sequence[str], *, key_file: Path | None = None,
                 our_args: Sequence[str] = ("--mesh-retry", "0.5")) -> None:
        self.workdir = workdir
        self.kinds = list(kinds)
        self.key_file = key_file or write_mesh_key(workdir / "mesh.key")
        self.ports = [free_port() for _ in kinds]
        self.mesh_with = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        self.members: list[GoDerper | OurRelay] = []
        self.our_args = list(our_args)
        self._saved_env = os.environ.get(MESH_ENV)

    def member_args(self, kind: str) -> list[str]:
        if kind == "derper":
            return ["-mesh-psk-file", str(self.key_file), "-mesh-with", self.mesh_with]
        return ["--mesh-psk-file", str(self.key_file), "--mesh-with", self.mesh_with, *self.our_args]

    def start(self) -> Mesh:
        os.environ[MESH_ENV] = "1"  # inherited by every member process
        try:
            for i, (kind, port) in enumerate(zip(self.kinds, self.ports, strict=True)):
                wd = self.workdir / f"member{i}-{kind}"
                m: GoDerper | OurRelay
                if kind == "derper":
                    m = GoDerper(wd, port=port, extra_args=self.member_args(kind))
                else:
                    m = OurRelay(port=port, workdir=str(wd), extra_args=[*self.member_args(kind), "-v"])
                self.members.append(m)
                m.start()
        except BaseException:
            self.stop()
            raise
        return self

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def stop(self) -> None:
        for m in self.members:
            m.stop()
        if self._saved_env is None:
            os.environ.pop(MESH_ENV, None)
        else:
            os.environ[MESH_ENV] = self._saved_env

    def __enter__(self) -> Mesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Peer:
    """A DERP client on one member that records the packets it receives."""

    def __init__(self, url: str, key: PrivateKey | None = None) -> None:
        self.key = key or PrivateKey.generate()
        self.public_key = self.key.public_key
        self.url = url
        self._cond = threading.Condition()
        self.received: list[tuple[PublicKey, bytes]] = []
        self.closed = threading.Event()
        self.client = DerpClient(url, self.key, on_packet=self._on_packet, on_close=lambda c, e: self.closed.set())
        self.client.connect()

    def _on_packet(self, src: PublicKey, data: bytes) -> None:
        with self._cond:
            self.received.append((src, data))
            self._cond.notify_all()

    def wait_for(self, src: PublicKey, data: bytes, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: (src, data) in self.received, timeout)

    def close(self) -> None:
        self.client.close()


def deliver(sender: Peer, receiver: Peer, tag: str, timeout: float = 30.0, every: float = 0.25) -> float:
    """Send `tag` from `sender` to `receiver` until it arrives; seconds it took. AssertionError on timeout."""
    data = tag.encode()
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        sender.client.send_packet(receiver.public_key, data)
        if receiver.wait_for(sender.public_key, data, every):
            return time.monotonic() - start
    raise AssertionError(f"{tag!r} from {sender.url} never reached {receiver.url} within {timeout:g}s")
