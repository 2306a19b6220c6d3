"""Packet sizes of one QUIC connection: what the peer and our options allow, capped by
the path (the relay carries 64 KiB, a direct UDP path what its probes found). Pure."""

from __future__ import annotations

from .config import GO_PACKET_SIZE

__all__ = ["MIN_PACKET_SIZE", "PacketSizing", "packet_size"]

#: QUIC's smallest datagram size (RFC 9000 14): never go below it, whatever the path says.
MIN_PACKET_SIZE = 1200


def packet_size(uncapped: int, path_mtu: int) -> int:
    """The packet size for a connection that could use `uncapped` bytes on a path that
    carries `path_mtu`: the smaller, but at least QUIC's minimum."""
    return max(MIN_PACKET_SIZE, min(uncapped, path_mtu))


class PacketSizing:
    """A connection starts at the Go peer's size; once the handshake shows one of ours it
    may grow (applied after the next flush, see `negotiated`); a path change resizes."""

    def __init__(self) -> None:
        #: The largest packet our options and the peer allow, whatever the path (Go peers:
        #: GO_PACKET_SIZE; our peers: up to 65,527 once the handshake says so).
        self.uncapped = GO_PACKET_SIZE
        self._upgrade = 0  # the size to switch to after the next flush

    def negotiated(self, ours_max: int, peer_max: int, path_mtu: int) -> None:
        """The handshake showed one of our peers: up to `ours_max` (our options), `peer_max`
        (what it reads), on a path of `path_mtu`. Deferred: the client's Finished flight may
        still hold an Initial packet, and aioquic pads those to the full size."""
        self.uncapped = min(ours_max, peer_max)
        self._upgrade = packet_size(self.uncapped, path_mtu)

    def for_path(self, path_mtu: int) -> int:
        """The size to use now that the path carries `path_mtu` (cancels a pending upgrade)."""
        self._upgrade = 0
        return packet_size(self.uncapped, path_mtu)

    def take_upgrade(self) -> int:
        """The pending size to switch to after a flush, once (0: none)."""
        size, self._upgrade = self._upgrade, 0
        return size
