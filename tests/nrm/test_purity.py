"""nrm is the pure-PyTorch core: importing it, or any of its submodules, pulls in none of the edge
dependencies (ray, typer, boto3, pyarrow). Checked in a fresh interpreter, since this test session
has already imported them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("ray", "typer", "boto3", "botocore", "pyarrow")

PROBE = """
import importlib, json, pkgutil, sys
import nrm
names = sorted(m.name for m in pkgutil.walk_packages(nrm.__path__, "nrm."))
for name in names:
    importlib.import_module(name)
forbidden = {FORBIDDEN!r}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
print(json.dumps({{"file": nrm.__file__, "submodules": names, "loaded": loaded}}))
"""


def test_nrm_imports_no_edge_dependencies(tmp_path: Path) -> None:
    # run outside the repository's tests/ so that tests/nrm cannot shadow the package
    out = subprocess.run([sys.executable, "-c", PROBE.format(FORBIDDEN=FORBIDDEN)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["file"].endswith("__init__.py")
    assert {"nrm.checkpoint", "nrm.config", "nrm.convert", "nrm.fit", "nrm.graph", "nrm.metrics", "nrm.model",
            "nrm.ops", "nrm.presets", "nrm.scores", "nrm.training"} <= set(result["submodules"])
    assert result["loaded"] == []
