"""The small part of HTTP/1.1 DERP needs, sans-IO: request and response heads, parsed and built.

Layer: protocol. Only message heads are handled (the DERP upgrade and the relay's probe endpoints have
no request bodies). Parsers take a buffer and return None until a whole head is there;
they raise on garbage or on a head larger than MAX_HEAD_SIZE, so a slowloris cannot
make us buffer without bound.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import RemoteProtocolError

__all__ = [
    "MAX_HEAD_SIZE", "Request", "Response", "parse_request_head", "parse_response_head",
    "build_request", "build_response", "REASONS",
]

MAX_HEAD_SIZE = 16 << 10
_MAX_HEADERS = 100

REASONS = {
    101: "Switching Protocols", 200: "OK", 204: "No Content", 400: "Bad Request",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    413: "Payload Too Large", 426: "Upgrade Required", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
}


@dataclass
class _Head:
    headers: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str, default: str | None = None) -> str | None:
        """First value of a header, by case-insensitive name."""
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return default


@dataclass
class Request(_Head):
    method: str = "GET"
    target: str = "/"
    version: str = "HTTP/1.1"

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class Response(_Head):
    status: int = 200
    reason: str = ""
    version: str = "HTTP/1.1"


def _head_end(buf: bytes | bytearray) -> int | None:
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_SIZE + 4)
    if end < 0:
        if len(buf) > MAX_HEAD_SIZE:
            raise RemoteProtocolError(f"HTTP head larger than {MAX_HEAD_SIZE} bytes")
        return None
    return end + 4


def _split_head(raw: bytes) -> tuple[str, list[tuple[str, str]]]:
    try:
        text = raw.decode("iso-8859-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise RemoteProtocolError("undecodable HTTP head") from None
    lines = text.split("\r\n")
    start = lines[0]
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            raise RemoteProtocolError(f"malformed HTTP header line {line[:60]!r}")
        headers.append((name, value.strip()))
        if len(headers) > _MAX_HEADERS:
            raise RemoteProtocolError("too many HTTP headers")
    return start, headers


def parse_request_head(buf: bytes | bytearray) -> tuple[Request, int] | None:
    """Parse a request head at the start of `buf`: (Request, bytes consumed), or None if incomplete."""
    if buf and not (65 <= buf[0] <= 90):  # request methods are upper-case tokens
        raise RemoteProtocolError("not an HTTP request")
    end = _head_end(buf)
    if end is None:
        return None
    start, headers = _split_head(bytes(buf[: end - 4]))
    parts = start.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not (parts[0].isascii() and parts[0].isalpha()):
        raise RemoteProtocolError(f"malformed HTTP request line {start[:80]!r}")
    return Request(headers=headers, method=parts[0], target=parts[1], version=parts[2]), end


def parse_response_head(buf: bytes | bytearray) -> tuple[Response, int] | None:
    """Parse a response head at the start of `buf`: (Response, bytes consumed), or None if incomplete."""
    end = _head_end(buf)
    if end is None:
        return None
    start, headers = _split_head(bytes(buf[: end - 4]))
    parts = start.split(" ", 2)
    if (len(parts) < 2 or not parts[0].startswith("HTTP/")
            or not (len(parts[1]) == 3 and parts[1].isascii() and parts[1].isdigit())):
        raise RemoteProtocolError(f"malformed HTTP status line {start[:80]!r}")
    reason = parts[2] if len(parts) > 2 else ""
    return Response(headers=headers, status=int(parts[1]), reason=reason, version=parts[0]), end


def _headers_bytes(headers: Iterable[tuple[str, str]]) -> str:
    out = []
    for k, v in headers:
        if "\r" in k or "\n" in k or "\r" in v or "\n" in v:
            raise ValueError("CR/LF in an HTTP header")
        out.append(f"{k}: {v}\r\n")
    return "".join(out)


def build_request(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    return (f"{method} {target} HTTP/1.1\r\n" + _headers_bytes(headers) + "\r\n").encode("iso-8859-1")


def build_response(status: int, headers: dict[str, str] | Iterable[tuple[str, str]] = (),
                   body: bytes = b"", *, reason: str | None = None, content_length: bool = True) -> bytes:
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    if content_length and status not in (101, 204) and not any(k.lower() == "content-length" for k, _ in items):
        items.append(("Content-Length", str(len(body))))
    head = f"HTTP/1.1 {status} {reason or REASONS.get(status, 'Unknown')}\r\n" + _headers_bytes(items) + "\r\n"
    return head.encode("iso-8859-1") + body
