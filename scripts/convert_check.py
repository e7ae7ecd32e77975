"""Bring-your-own-model check: a user's torch classifier against its converted NRM, on a labelled split.

    python scripts/convert_check.py MODEL.py:factory WEIGHTS CKPT_DIR DATA [--limit N]
Prints top-1 of the torch module and of the NRM checkpoint on DATA (normalised with the checkpoint's
mean/std, float32), how many predictions differ, and the largest relative logit difference in float64
on the first --f64-rows rows."""

from __future__ import annotations

import argparse
import copy
import json

import torch

import nrm
from jobs.convert import build_module, read_weights
from jobs.datasets import load_labelled


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("module")
    ap.add_argument("weights")
    ap.add_argument("ckpt")
    ap.add_argument("data")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--f64-rows", type=int, default=1000)
    a = ap.parse_args()
    net = build_module(a.module)
    net.load_state_dict(read_weights(__import__("pathlib").Path(a.weights)))
    net.eval()
    model = nrm.load(a.ckpt)
    x, y = load_labelled(a.data, model.config.input, a.limit)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y).long()
    pt, pn, worst = [], [], 0.0
    net64, model64 = copy.deepcopy(net).double(), copy.deepcopy(model).double()
    with torch.no_grad():
        for i in range(0, len(xs), 500):
            b = model.preprocess(xs[i : i + 500])
            lt, ln = net(b), model(b)
            pt.append(lt.argmax(1))
            pn.append(ln.argmax(1))
            if i < a.f64_rows:
                b64 = b.double()
                l64t, l64n = net64(b64), model64(b64)
                worst = max(worst, float((l64t - l64n).abs().max() / l64t.abs().max()))
    pt_, pn_ = torch.cat(pt), torch.cat(pn)
    print(json.dumps({"rows": len(ys), "top1_torch": round(float((pt_ == ys).float().mean()), 4),
                      "top1_nrm": round(float((pn_ == ys).float().mean()), 4),
                      "predictions_differing": int((pt_ != pn_).sum()),
                      "f64_rows": min(a.f64_rows, len(ys)), "max_rel_logit_diff_float64": worst}))


if __name__ == "__main__":
    main()
