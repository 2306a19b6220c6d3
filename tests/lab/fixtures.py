"""pytest fixtures for the network lab. tests/lab/conftest.py imports them; another test
folder can do the same (`from tests.lab.fixtures import lab_factory, ...` in its conftest).

    def test_x(lab_factory):
        lab = lab_factory("two_nats", nat_a="eim", nat_b="symmetric")   # or "one_lan"
    def test_y(eim_lab): ...      # Lab.two_nats("eim", "eim")
    def test_z(lan_lab): ...      # Lab.one_lan()

Each fixture first calls require_lab() (skip with the reason, or fail when
DERPNET_REQUIRE_LAB=1) and closes its labs in a finalizer, whatever the test did.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.lab.netns import Lab, require_lab


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest) -> Callable[..., Lab]:
    """`make(topology="two_nats", **kwargs) -> Lab` (Lab.two_nats or Lab.one_lan); all closed at teardown."""
    require_lab()
    labs: list = []

    def close_all() -> None:
        errors = []
        for lab in reversed(labs):
            try:
                lab.close()
            except Exception as e:  # close every lab, then report
                errors.append(e)
        if errors:
            raise errors[0]

    request.addfinalizer(close_all)

    def make(topology: str = "two_nats", **kwargs) -> Lab:
        if topology not in ("two_nats", "one_lan"):
            raise ValueError(f"unknown lab topology {topology!r}")
        lab = getattr(Lab, topology)(**kwargs)
        labs.append(lab)
        return lab

    return make


@pytest.fixture
def eim_lab(lab_factory) -> Lab:
    """Two peers, each behind an endpoint-independent-mapping NAT."""
    return lab_factory("two_nats", nat_a="eim", nat_b="eim")


@pytest.fixture
def lan_lab(lab_factory) -> Lab:
    """Two peers on one LAN behind one NAT."""
    return lab_factory("one_lan")
