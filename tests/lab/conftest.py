"""The network lab's fixtures (defined in tests/lab/fixtures.py so other folders can reuse them)."""

from tests.lab.fixtures import eim_lab, lab_factory, lan_lab  # noqa: F401
