"""Shared test configuration: real services started once per session."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

pytest_plugins = ["tests.services.seaweed", "tests.services.postgres"]
