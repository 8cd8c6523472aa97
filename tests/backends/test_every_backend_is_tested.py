"""Every backend registered in this environment has a conformance test module here."""

from __future__ import annotations

import re
from pathlib import Path

import gpurag

HERE = Path(__file__).resolve().parent


def test_every_registered_backend_subclasses_the_conformance_kit() -> None:
    tested = set()
    for module in HERE.glob("test_*.py"):
        text = module.read_text()
        if "(BackendConformance)" in text:
            tested.update(re.findall(r'backend_name\s*=\s*"([^"]+)"', text))
    untested = sorted(set(gpurag.get_registry("backends")) - tested)
    assert not untested, f"backends without a BackendConformance subclass in tests/backends: {untested}"
