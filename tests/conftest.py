"""Session-wide test settings."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """lmforge's user cache (compiled decoders, infer/compile_cache.py) goes to a temporary directory, never the
    home directory; subprocesses inherit it."""
    os.environ["LMFORGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("lmforge-cache"))
