"""Write the seed inputs of fuzz/targets.py into fuzz/corpus/ (run once; the files are checked in)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fuzz.targets import seeds  # noqa: E402

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
os.makedirs(out, exist_ok=True)
for name, data in seeds().items():
    with open(os.path.join(out, f"seed-{name}"), "wb") as f:
        f.write(data)
print(f"wrote {len(seeds())} seeds to {out}")
