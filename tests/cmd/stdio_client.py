"""A client program that talks through a ProxyCommand, as ssh does: runs it with
`sh -c "exec COMMAND"` (ssh's own way: the shell must not keep a copy of the pipes),
writes to its stdin, reads its stdout, and prints one JSON line with what it saw.

    python -m tests.cmd.stdio_client upload N COMMAND     # "U\\n" + N bytes, close stdin, read the digest
    python -m tests.cmd.stdio_client download N COMMAND   # "D N\\n", read N bytes and EOF with stdin open,
                                                          # then close stdin

The service on the far side is tests.cmd.procs.TransferService. Result keys: ok, detail,
rc (the ProxyCommand's exit status), stdout_eof_with_stdin_open (download).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

from tests.cmd.procs import TransferService


def _upload(proc: subprocess.Popen, n: int) -> dict:
    assert proc.stdin is not None and proc.stdout is not None
    want = hashlib.sha256()
    blob = os.urandom(1 << 20)

    def write() -> None:
        assert proc.stdin is not None
        proc.stdin.write(b"U\n")
        left = n
        while left:
            k = min(left, len(blob))
            proc.stdin.write(blob[:k])
            want.update(blob[:k])
            left -= k
        proc.stdin.close()  # the half-close: only the digest may come back

    writer = threading.Thread(target=write, name="stdio-client-writer")
    writer.start()
    got = proc.stdout.read()  # to EOF
    writer.join()
    ok = got == want.hexdigest().encode()
    return {"ok": ok, "detail": "" if ok else f"stdout was {got[:200]!r} ({len(got)} bytes)"}


def _download(proc: subprocess.Popen, n: int) -> dict:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"D %d\n" % n)
    proc.stdin.flush()  # stdin stays open
    h = hashlib.sha256()
    got = 0
    while True:
        b = proc.stdout.read1(1 << 16)
        if not b:
            break
        h.update(b)
        got += len(b)
    eof_with_stdin_open = proc.poll() is None  # the stream's end closed stdout; the process waits for stdin
    proc.stdin.close()
    intact = h.hexdigest() == TransferService.expected(got)
    ok = got == n and intact
    return {"ok": ok, "detail": "" if ok else f"got {got} of {n} bytes (intact: {intact})",
            "stdout_eof_with_stdin_open": eof_with_stdin_open}


def main(argv: list[str]) -> int:
    mode, n, command = argv[0], int(argv[1]), argv[2]
    with open(os.environ.get("STDIO_CLIENT_STDERR", os.devnull), "wb") as err:
        proc = subprocess.Popen(["sh", "-c", f"exec {command}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err)
        result = _upload(proc, n) if mode == "upload" else _download(proc, n)
        result["rc"] = proc.wait(timeout=60)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
