"""Coverage-guided fuzzing of the DERP codec and handshakes with atheris (libFuzzer).

    python fuzz/derp_fuzz.py -max_total_time=60 /tmp/corpus fuzz/corpus

A crash writes `crash-*` files: add them to fuzz/corpus/ (they become regression
inputs replayed by tests/test_fuzz_corpus.py) and fix the bug.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["derpnet"]):
    import derpnet.connection  # noqa: F401
    import derpnet.events  # noqa: F401
    import derpnet.frames  # noqa: F401
    import derpnet.handshake  # noqa: F401
    import derpnet.http11  # noqa: F401

from fuzz.targets import run  # noqa: E402


def main() -> None:
    atheris.Setup(sys.argv, run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
