import os
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["SHRINKIT_NO_HASH_CACHE"] = "1"  # tests never touch the user's hash cache (test_io tests it)
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict (or YAML text) to a file and return its path."""
    n = [0]

    def make(data, name=None) -> Path:
        n[0] += 1
        p = tmp_path / f"{name or f'recipe{n[0]}'}.yaml"
        p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return p

    return make
