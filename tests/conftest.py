from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import HostFiles


@pytest.fixture
def host(tmp_path: Path) -> HostFiles:
    return HostFiles(tmp_path / "host")
