from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import HostFiles

if TYPE_CHECKING:
    from uvmsession import UvmSession


@pytest.fixture
def host(tmp_path: Path) -> HostFiles:
    return HostFiles(tmp_path / "host")


@pytest.fixture(scope="module")
def session() -> Iterator[UvmSession]:
    """A real UVM shared by the tests of one module; afterwards nothing of it may remain."""
    from uvmsession import UvmSession, vm_gone

    s = UvmSession()
    try:
        yield s
    finally:
        s.close()
    assert vm_gone(s.state_dir, s.pid) == {}, "the UVM left something behind"
