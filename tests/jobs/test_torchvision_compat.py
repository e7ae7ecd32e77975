"""jobs.torchvision_compat: torchvision (and timm) import here, where the wheel's C extension was built
for another torch; any other import error still reaches the caller."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jobs.torchvision_compat import import_module


def test_torchvision_models_import() -> None:
    try:
        models = import_module("torchvision.models")
    except ImportError as e:
        pytest.skip(f"torchvision is not installed ({e})")
    assert callable(models.resnet18) and models.resnet18(num_classes=3).fc.out_features == 3


def test_another_runtime_error_on_import_is_raised_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_on_import.py").write_text("raise RuntimeError('operator myext::op failed to load')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="myext::op failed to load"):
        import_module("broken_on_import")
    assert "broken_on_import" not in sys.modules
