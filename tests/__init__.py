"""Unit tests of the unibus core (no broker)."""
