"""Every test under tests/gpu carries the ``gpu`` marker (deselected by default; select with
``python -m pytest -m gpu tests/gpu``). Modules skip themselves where CUDA is absent."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
