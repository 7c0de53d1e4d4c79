"""Shared test configuration: deterministic hypothesis runs (CI must not flake on a new random draw)."""

import os

from hypothesis import settings

settings.register_profile("attnkit", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "attnkit"))
