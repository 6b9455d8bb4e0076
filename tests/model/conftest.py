"""Shared fixtures of the model tests."""

from tests.helpers import one_thread  # noqa: F401  (autouse: one intra-op thread for the tiny shapes)
