"""Fixtures shared by the end-to-end modules (each module still defines its own ``relay``)."""

from __future__ import annotations

import json

import pytest
from helpers import Sink


@pytest.fixture(scope="module")
def sink():
    """A real downstream SMTP server on loopback for the module's relay to deliver to."""
    with Sink() as s:
        yield s


@pytest.fixture(scope="module")
def alias(relay):
    """The buyer alias of the seeded pair S1/B1 (``helpers.seed_pair``) of the module's relay."""
    return json.loads(relay.cli("alias", "S1", "B1", "--json").stdout)["buyer_alias"]
