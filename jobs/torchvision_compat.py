"""Import torchvision (and what imports it, such as timm) where its C extension does not match torch.

A torchvision wheel built for another torch (here: a CUDA build beside the CPU torch 2.13.0) cannot
load its C ops, and ``import torchvision`` then fails in ``torchvision._meta_registrations``, which
registers fake kernels for those ops: "operator torchvision::nms does not exist". Its model
definitions and PIL transforms are pure Python and work without the C ops. So :func:`import_module`
imports normally and, only when the import fails with that error, retries with the two registration
modules stubbed out, logging one warning that says why. Detection and video ops (nms, roi_align,
decode_jpeg) stay unavailable then; a machine with a matching pair of builds never takes this path.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import types

log = logging.getLogger(__name__)

REGISTRATIONS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")
_MISSING_OP = re.compile(r"operator torchvision::\w+ does not exist")


def import_module(name: str) -> types.ModuleType:
    """``importlib.import_module(name)``; where that fails because torchvision's C extension does not
    match this torch, the same import again with torchvision's fake-op registrations stubbed out."""
    try:
        return importlib.import_module(name)
    except RuntimeError as e:
        if not _MISSING_OP.search(str(e)):
            raise
        reason = str(e).splitlines()[0]
    top = {"torchvision", name.partition(".")[0]}
    for loaded in [m for m in sys.modules if m.partition(".")[0] in top]:
        del sys.modules[loaded]  # what the failed import left half-initialised
    for stub in REGISTRATIONS:
        sys.modules[stub] = types.ModuleType(stub)
    module = importlib.import_module(name)
    log.warning("importing %s: torchvision's C extension does not match this torch (%s), so its fake-op "
                "registrations were skipped; its models and transforms are pure Python and work, its C ops "
                "(nms, roi_align, image decoding) do not", name, reason)
    return module


def import_torchvision() -> types.ModuleType:
    """torchvision, imported as :func:`import_module` does."""
    return import_module("torchvision")
