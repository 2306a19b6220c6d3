"""Tools for developers, not tests (see each module)."""
