"""Wrote tests/nrm/data/v2 with nrm at commit e0f4e4f (config format version 2; run there as
`PYTHONPATH=. python tests/nrm/data/make_v2.py tests/nrm/data/v2`): tiny graph, a chosen detector with
the candidates of the study beside it, its selection table and the post-hoc baselines; plus the scores it makes."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from support import tiny_config  # noqa: E402

import nrm  # noqa: E402
from nrm.fit import fit, fit_posthoc, refit  # noqa: E402

out = Path(sys.argv[1])
torch.manual_seed(0)
model = nrm.NRM(tiny_config(channels=1, size=8, classes=3)).eval().requires_grad_(False)
g = torch.Generator().manual_seed(0)
x = torch.randn(200, 1, 8, 8, generator=g)
fit(model, [x[:100]], [x[100:]])
refit(model, [x[100:]], val_ood={"far": [torch.randn(60, 1, 8, 8, generator=g) * 30 + 5]}, fit_batches=[x[:100]], candidates=True)
labels = torch.arange(100) % 3
fit_posthoc(model, [x[:100]], labels, knn_k=5)
nrm.save(model, out / "checkpoint")
q = torch.randn(7, 1, 8, 8, generator=g)
cols = model.score(q)
save_file({"x": q.contiguous(), **{k: v.contiguous() for k, v in cols.items()}}, str(out / "scores.safetensors"))
print(model.extra_columns, nrm.model_id(out / "checkpoint"))
