"""Checkpoints: a directory with config.json + weights.safetensors. Round trip, the config.json
contract, every CheckpointError, and that nothing in a checkpoint directory is ever unpickled."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import assert_same_config, make_checkpoint, tiny_config

import nrm
from nrm.config import Fitted, ModelConfig, Threshold
from nrm.fit import apply
from nrm.graph import Node
from nrm.ops import Conv


def read_config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def write_config(ckpt: Path, cfg: dict) -> None:
    (ckpt / "config.json").write_text(json.dumps(cfg))


def rewrite_weights(ckpt: Path, edit: Callable[[dict[str, torch.Tensor]], None], record_hash: bool = True) -> None:
    """Edit the tensors and rewrite weights.safetensors; with ``record_hash`` config.json's
    weights_sha256 is updated too, so the check under test is the one that fires."""
    tensors = load_file(str(ckpt / "weights.safetensors"))
    edit(tensors)
    save_file(tensors, str(ckpt / "weights.safetensors"))
    if record_hash:
        cfg = read_config(ckpt)
        cfg["weights_sha256"] = hashlib.sha256((ckpt / "weights.safetensors").read_bytes()).hexdigest()
        write_config(ckpt, cfg)


# --------------------------------------------------------------------------- round trip


def test_round_trip_same_scores_and_model_id(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = nrm.NRM(tiny_config(channels=3, size=8, classes=4)).eval().requires_grad_(False)
    apply(model, Fitted(sigma2=0.42, log_partition=[0.1, -0.2, 0.3, 1.5], normaliser="class_mean",
                        threshold=Threshold("latent_loglik", -1.25, 0.95)))
    mid = nrm.save(model, tmp_path / "a")
    assert mid == nrm.model_id(tmp_path / "a")
    assert mid == hashlib.sha256((tmp_path / "a" / "weights.safetensors").read_bytes()).hexdigest()

    loaded = nrm.load(tmp_path / "a", expect_model_id=mid)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert_same_config(loaded.config, model.config)
    x = torch.randn(7, 3, 8, 8)
    a, b = model.score(x), loaded.score(x)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    torch.testing.assert_close(loaded.log_partition, torch.tensor([0.1, -0.2, 0.3, 1.5]))
    # a second save of the loaded model writes the same bytes: the id is stable
    assert nrm.save(loaded, tmp_path / "b") == mid


def test_config_json_keys(tiny_ckpt: Path) -> None:
    cfg = read_config(tiny_ckpt)
    assert {"format", "version", "input", "classes", "nodes", "sigma2", "log_partition", "threshold",
            "weights_sha256"} <= set(cfg)
    assert "layers" not in cfg
    assert cfg["format"] == "nrm-checkpoint" and cfg["version"] == 3
    assert set(cfg["input"]) == {"channels", "height", "width", "mean", "std"}
    assert (cfg["input"]["channels"], cfg["input"]["height"], cfg["input"]["width"]) == (1, 8, 8)
    assert cfg["classes"] == ["c0", "c1", "c2"]
    assert [node["op"] for node in cfg["nodes"]] == [
        "conv", "relu", "maxpool", "conv", "relu", "global_avgpool", "flatten", "linear"]
    assert cfg["nodes"][0] == {"name": "conv1", "op": "conv", "inputs": ["input"], "attrs": {
        "in": 1, "out": 4, "kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1,
        "bias": True}}
    assert cfg["nodes"][2] == {"name": "maxpool1", "op": "maxpool", "inputs": ["relu1"], "attrs": {
        "kernel": [2, 2], "stride": [2, 2], "padding": [0, 0], "dilation": [1, 1], "ceil_mode": False}}
    assert cfg["nodes"][-1] == {"name": "classifier", "op": "linear", "inputs": ["flatten1"],
                                "attrs": {"in": 6, "out": 3, "bias": True}}
    assert isinstance(cfg["sigma2"], float) and cfg["sigma2"] > 0
    assert len(cfg["log_partition"]) == 3
    assert set(cfg["threshold"]) == {"score", "value", "tpr", "reference"}  # reference: nrm.reference
    assert cfg["threshold"]["score"] == "latent_loglik" and cfg["threshold"]["tpr"] == 0.95
    assert cfg["weights_sha256"] == nrm.model_id(tiny_ckpt)
    assert sorted(load_file(str(tiny_ckpt / "weights.safetensors"))) == [
        "classifier.bias", "classifier.weight", "conv1.bias", "conv1.weight", "conv2.bias", "conv2.weight"]


def test_load_rejects_unexpected_model_id(tiny_ckpt: Path) -> None:
    with pytest.raises(nrm.CheckpointError, match="sha256"):
        nrm.load(tiny_ckpt, expect_model_id="0" * 64)


def test_load_bytes_loads_what_load_loads(tiny_ckpt: Path) -> None:
    from nrm.checkpoint import load_bytes

    config, weights = (tiny_ckpt / "config.json").read_bytes(), (tiny_ckpt / "weights.safetensors").read_bytes()
    a, b = nrm.load(tiny_ckpt), load_bytes(config, weights, expect_model_id=nrm.model_id(tiny_ckpt))
    assert_same_config(b.config, a.config)
    assert all(torch.equal(b.state_dict()[k], v) for k, v in a.state_dict().items())


def test_load_bytes_names_the_checkpoint_it_was_given(tiny_ckpt: Path) -> None:
    from nrm.checkpoint import load_bytes

    config = (tiny_ckpt / "config.json").read_bytes()
    with pytest.raises(nrm.CheckpointError, match="checkpoint 's3://b/m': weights.safetensors has sha256 "):
        load_bytes(config, b"not the weights", name="s3://b/m")


# --------------------------------------------------------------------------- bad checkpoints


def test_missing_config(tiny_ckpt: Path) -> None:
    (tiny_ckpt / "config.json").unlink()
    with pytest.raises(nrm.CheckpointError, match="config.json"):
        nrm.load(tiny_ckpt)


def test_missing_weights(tiny_ckpt: Path) -> None:
    (tiny_ckpt / "weights.safetensors").unlink()
    with pytest.raises(nrm.CheckpointError, match="weights.safetensors"):
        nrm.load(tiny_ckpt)


def test_not_a_directory(tmp_path: Path, tiny_ckpt: Path) -> None:
    with pytest.raises(nrm.CheckpointError, match="not a directory"):
        nrm.load(tiny_ckpt / "weights.safetensors")
    with pytest.raises(nrm.CheckpointError, match="not a directory"):
        nrm.load(tmp_path / "does-not-exist")


def test_unknown_op_type(tiny_ckpt: Path) -> None:
    cfg = read_config(tiny_ckpt)
    cfg["nodes"][0]["op"] = "conv3d"
    write_config(tiny_ckpt, cfg)
    with pytest.raises(nrm.CheckpointError, match=r"node 'conv1'.*'conv3d'"):
        nrm.load(tiny_ckpt)


def test_invalid_json(tiny_ckpt: Path) -> None:
    (tiny_ckpt / "config.json").write_text("{not json")
    with pytest.raises(nrm.CheckpointError, match="not valid JSON"):
        nrm.load(tiny_ckpt)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda c: c.update(format="onnx"), "format"),
    (lambda c: c.update(version=4), "version"),
    (lambda c: c.update(sigma2=-1.0), "sigma2"),
    (lambda c: c.update(log_partition=[0.0]), "log_partition"),
    (lambda c: c["nodes"][3]["attrs"].update({"in": 5}), "conv2"),
    (lambda c: c["nodes"][0]["attrs"].update(dilatation=2), "dilatation"),
    (lambda c: c.pop("nodes"), "nodes"),
    (lambda c: c.update(extra_key=1), "extra_key"),
], ids=["format", "version", "sigma2", "log_partition", "in-mismatch", "unknown-param", "no-nodes", "unknown-key"])
def test_invalid_config_values(tiny_ckpt: Path, edit: Callable[[dict], object], match: str) -> None:
    cfg = read_config(tiny_ckpt)
    edit(cfg)
    write_config(tiny_ckpt, cfg)
    with pytest.raises(nrm.CheckpointError, match=match):
        nrm.load(tiny_ckpt)


def test_weight_shape_mismatch(tiny_ckpt: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["conv2.weight"] = torch.zeros(6, 4, 5, 5)

    rewrite_weights(tiny_ckpt, edit)
    with pytest.raises(nrm.CheckpointError, match=r"'conv2.weight' has shape \(6, 4, 5, 5\).*\(6, 4, 3, 3\)"):
        nrm.load(tiny_ckpt)


def test_missing_and_extra_tensors(tiny_ckpt: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["conv9.weight"] = t.pop("conv1.weight")

    rewrite_weights(tiny_ckpt, edit)
    with pytest.raises(nrm.CheckpointError, match=r"missing \['conv1.weight'\].*\['conv9.weight'\]"):
        nrm.load(tiny_ckpt)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight(tiny_ckpt: Path, bad: float) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["classifier.bias"][1] = bad

    rewrite_weights(tiny_ckpt, edit)
    with pytest.raises(nrm.CheckpointError, match="'classifier.bias' has 1 non-finite"):
        nrm.load(tiny_ckpt)


def test_tampered_weights_tensor(tiny_ckpt: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["conv1.weight"] *= 2

    rewrite_weights(tiny_ckpt, edit, record_hash=False)
    with pytest.raises(nrm.CheckpointError, match="sha256"):
        nrm.load(tiny_ckpt)


def test_tampered_weights_byte(tiny_ckpt: Path) -> None:
    data = bytearray((tiny_ckpt / "weights.safetensors").read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data
    (tiny_ckpt / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(nrm.CheckpointError, match="sha256"):
        nrm.load(tiny_ckpt)


def test_swapped_weights_from_another_checkpoint(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a", seed=0)
    b = make_checkpoint(tmp_path / "b", seed=1)
    shutil.copy(b / "weights.safetensors", a / "weights.safetensors")
    with pytest.raises(nrm.CheckpointError, match="sha256"):
        nrm.load(a)


def test_truncated_weights_without_recorded_hash(tiny_ckpt: Path) -> None:
    cfg = read_config(tiny_ckpt)
    del cfg["weights_sha256"]
    write_config(tiny_ckpt, cfg)
    data = (tiny_ckpt / "weights.safetensors").read_bytes()
    (tiny_ckpt / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(nrm.CheckpointError, match="not a safetensors file"):
        nrm.load(tiny_ckpt)


# --------------------------------------------------------------------------- never unpickle


class _Marker:
    """Unpickling this object creates the file at ``path``: proof that a pickle was executed."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def _payload(kind: str, marker: Path, tmp: Path) -> bytes:
    if kind == "pickle":
        return pickle.dumps({"conv1.weight": _Marker(marker)})
    f = tmp / "payload.pt"
    torch.save({"conv1.weight": _Marker(marker)}, f)  # a zip holding data.pkl
    return f.read_bytes()


@pytest.mark.parametrize("kind", ["pickle", "torch_save"])
def test_payload_is_live(tmp_path: Path, kind: str) -> None:
    """The payloads below really run code when unpickled (so their absence of effect means something)."""
    marker = tmp_path / "pwned"
    data = _payload(kind, marker, tmp_path)
    if kind == "pickle":
        pickle.loads(data)
    else:
        (tmp_path / "p.pt").write_bytes(data)
        torch.load(tmp_path / "p.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch_save"])
@pytest.mark.parametrize("record_hash", [True, False])
def test_pickle_as_weights_is_never_executed(tiny_ckpt: Path, tmp_path: Path, kind: str, record_hash: bool) -> None:
    marker = tmp_path / "pwned"
    (tiny_ckpt / "weights.safetensors").write_bytes(_payload(kind, marker, tmp_path))
    if not record_hash:  # get past the hash check, to the safetensors parser
        cfg = read_config(tiny_ckpt)
        del cfg["weights_sha256"]
        write_config(tiny_ckpt, cfg)
    with pytest.raises(nrm.CheckpointError, match="sha256" if record_hash else "not a safetensors file"):
        nrm.load(tiny_ckpt)
    nrm.model_id(tiny_ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch_save"])
def test_pytorch_model_bin_beside_is_ignored(tiny_ckpt: Path, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    (tiny_ckpt / "pytorch_model.bin").write_bytes(_payload(kind, marker, tmp_path))
    (tiny_ckpt / "model.pkl").write_bytes(_payload("pickle", marker, tmp_path))
    nrm.load(tiny_ckpt)  # the valid checkpoint still loads, from safetensors only
    assert not marker.exists()
    (tiny_ckpt / "weights.safetensors").unlink()
    with pytest.raises(nrm.CheckpointError, match="weights.safetensors"):
        nrm.load(tiny_ckpt)  # and never falls back to the pickle
    assert not marker.exists()


# --------------------------------------------------------------------------- bugs


def test_round_trip_conv_without_bias(tmp_path: Path) -> None:
    cfg = tiny_config()
    nodes = list(cfg.nodes)
    nodes[0] = Node("conv1", Conv(1, 4, 3, 1, 1, bias_=False), nodes[0].inputs)
    model = nrm.NRM(ModelConfig(cfg.input, cfg.classes, nodes)).eval()
    nrm.save(model, tmp_path / "c")
    loaded = nrm.load(tmp_path / "c")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("edit", [
    lambda c: [c],  # top level is not an object -> AttributeError
    lambda c: {**c, "input": {**c["input"], "channels": "one"}},  # int("one") -> plain ValueError
    lambda c: (c["nodes"][0]["attrs"].update(stride=0), c)[1],  # validate: ZeroDivisionError
    lambda c: (c["nodes"][0]["attrs"].update(out=-4), c["nodes"][3]["attrs"].update({"in": -4}), c)[2],
], ids=["not-an-object", "channels-not-int", "stride-0", "negative-channels"])
def test_malformed_config_raises_checkpoint_error(tiny_ckpt: Path, edit: Callable[[dict], object]) -> None:
    write_config(tiny_ckpt, edit(read_config(tiny_ckpt)))  # type: ignore[arg-type]
    with pytest.raises(nrm.CheckpointError):
        nrm.load(tiny_ckpt)


# --------------------------------------------------------------------------- format version 2


def test_v2_nodes_hold_op_inputs_and_attrs(tmp_path: Path) -> None:
    """A graph with a residual add: each node's inputs name the nodes it reads."""
    cfg = nrm.preset("resnet-cifar", width=0.25, classes=3, depth=8)
    nrm.save(nrm.NRM(cfg), tmp_path / "r")
    saved = read_config(tmp_path / "r")
    assert saved["version"] == 3 and "layers" not in saved
    add = next(n for n in saved["nodes"] if n["op"] == "add")
    assert add == {"name": "layer1.0.add", "op": "add", "inputs": ["layer1.0.conv2", "relu1"], "attrs": {}}
    assert [n["name"] for n in saved["nodes"]] == [n.name for n in cfg.nodes]


def test_detector_arrays_live_in_safetensors_and_round_trip_exactly(tiny_ckpt: Path, tmp_path: Path) -> None:
    from nrm.fit import refit

    model = nrm.load(tiny_ckpt)
    det = refit(model, [torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(0))], name="mahalanobis",
                feature_set="gates")
    nrm.save(model, tmp_path / "d")
    saved = read_config(tmp_path / "d")
    assert saved["detectors"]["fitted"][0]["tensors"] == {"means": {"$tensor": "detector.det_mahalanobis.means"},
                                                          "precision": {"$tensor": "detector.det_mahalanobis.precision"}}
    tensors = load_file(str(tmp_path / "d" / "weights.safetensors"))
    assert tensors["detector.det_mahalanobis.means"].dtype == torch.float64
    assert torch.equal(tensors["detector.det_mahalanobis.means"], det.main.tensors()["means"])
    loaded = nrm.load(tmp_path / "d").config.fitted.detector
    assert loaded is not None
    for key in ("means", "precision"):
        assert loaded.main.tensors()[key].dtype == torch.float64
        assert torch.equal(loaded.main.tensors()[key], det.main.tensors()[key]), key


def test_detector_array_missing_from_safetensors(tiny_ckpt: Path) -> None:
    cfg = read_config(tiny_ckpt)
    cfg["detectors"] = {"fitted": [{"name": "mahalanobis", "options": {"features": "gates"}, "tensors": {
        "means": {"$tensor": "detector.det_mahalanobis.means"}, "precision": {"$tensor": "detector.det_mahalanobis.precision"}}}]}
    del cfg["weights_sha256"]
    write_config(tiny_ckpt, cfg)
    with pytest.raises(nrm.CheckpointError,
                       match=r"detector array 'detector.det_mahalanobis.means' is not in weights.safetensors"):
        nrm.load(tiny_ckpt)


V1_MEANS = [[0.25, 0.5, 0.75, 1.0], [1.0, 0.0, 0.5, 0.5]]
V1_PRECISION = [[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.5, 1.0]]


def _write_v1(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint in format version 1, written by hand: a layer list and a detector as float lists."""
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    weights = {"conv1.weight": torch.randn(4, 1, 3, 3, generator=g), "conv1.bias": torch.randn(4, generator=g),
               "classifier.weight": torch.randn(2, 4, generator=g), "classifier.bias": torch.randn(2, generator=g)}
    save_file(weights, str(path / "weights.safetensors"))
    write_config(path, {
        "format": "nrm-checkpoint", "version": 1,
        "input": {"channels": 1, "height": 6, "width": 6, "mean": [0.5], "std": [0.25]},
        "classes": ["a", "b"],
        "layers": [{"type": "conv", "name": "conv1", "in": 1, "out": 4, "kernel": 3, "stride": 1, "padding": 1,
                    "bias": True},
                   {"type": "relu"}, {"type": "maxpool", "kernel": 2, "stride": 2}, {"type": "global_avgpool"},
                   {"type": "flatten"}, {"type": "linear", "name": "classifier", "in": 4, "out": 2}],
        "sigma2": 0.5, "log_partition": [0.0, 0.0], "normaliser": "none", "threshold": None,
        "detector": {"name": "mahalanobis", "features": "gates",
                     "params": {"means": V1_MEANS, "precision": V1_PRECISION}},
    })
    return weights


def test_version_1_checkpoint_loads_and_scores(tmp_path: Path) -> None:
    weights = _write_v1(tmp_path / "v1")
    model = nrm.load(tmp_path / "v1")
    assert [n.name for n in model.config.nodes] == ["conv1", "relu1", "maxpool1", "global_avgpool1", "flatten1",
                                                    "classifier"]
    assert torch.equal(model.node_params("conv1")["weight"], weights["conv1.weight"])
    x = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    cols = model.score(x)
    # det_mahalanobis by hand: -(f - mu_pred)^T P (f - mu_pred), f the conv1 gates' on-rates
    z = torch.nn.functional.conv2d(x, weights["conv1.weight"], weights["conv1.bias"], padding=1)
    f = (z > 0).double().mean(dim=(2, 3))
    d = f - torch.tensor(V1_MEANS, dtype=torch.float64)[cols["pred"]]
    expected = -torch.einsum("ni,ij,nj->n", d, torch.tensor(V1_PRECISION, dtype=torch.float64), d)
    torch.testing.assert_close(cols["det_mahalanobis"], expected.float())
    # saved again, it is a version-2 checkpoint with the arrays in safetensors
    nrm.save(model, tmp_path / "v2")
    assert read_config(tmp_path / "v2")["version"] == 3
    assert torch.equal(load_file(str(tmp_path / "v2" / "weights.safetensors"))["detector.det_mahalanobis.precision"],
                       torch.tensor(V1_PRECISION, dtype=torch.float64))


V2 = Path(__file__).parent / "data" / "v2"  # written by nrm at e0f4e4f (tests/nrm/data/make_v2.py)


def test_version_2_checkpoint_loads_every_detector_and_scores_as_it_did() -> None:
    model = nrm.load(V2 / "checkpoint")
    det = model.config.fitted.detector
    assert det is not None and det.main is not None and det.main.column == "det_mahalanobis"
    assert len(det.candidates) == 10 and det.selection and [d.column for d in det.baselines] == ["mahalanobis_feat",
                                                                                                 "knn", "vim"]
    saved = load_file(str(V2 / "scores.safetensors"))
    cols = model.score(saved.pop("x"))
    assert cols.keys() == saved.keys()
    for k, v in saved.items():  # float rounding apart (a float32 product's order follows torch's thread count)
        torch.testing.assert_close(cols[k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_version_2_checkpoint_saved_again_is_version_3_with_the_same_model_id(tmp_path: Path) -> None:
    model = nrm.load(V2 / "checkpoint")
    assert nrm.save(model, tmp_path / "v3") == nrm.model_id(V2 / "checkpoint")
    saved = read_config(tmp_path / "v3")
    assert saved["version"] == 3 and "detector" not in saved and "posthoc" not in saved
    assert [e["name"] for e in saved["detectors"]["fitted"]][-3:] == ["mahalanobis_feat", "knn", "vim"]
    (ja, ta), (jb, tb) = nrm.load(tmp_path / "v3").config.to_json(), model.config.to_json()
    assert ja == jb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda c: c["nodes"][4].update(inputs=["relu9"]), r"node 'relu2' \(relu\): input\(s\) \['relu9'\] are not defined"),
    (lambda c: c["nodes"][3]["attrs"].update({"in": 5}), r"node 'conv2': conv expects \(C=5, H, W\)"),
    (lambda c: c["nodes"][1].update(name="conv1"), r"node 'conv1': duplicate name"),
    (lambda c: c["nodes"][2].update(inputs=["conv1", "relu1"]), r"node 'maxpool1'.*takes 1 input"),
], ids=["undefined-input", "in-channels", "duplicate", "arity"])
def test_graph_error_in_config_names_the_node(tiny_ckpt: Path, edit: Callable[[dict], object], match: str) -> None:
    cfg = read_config(tiny_ckpt)
    edit(cfg)
    write_config(tiny_ckpt, cfg)
    with pytest.raises(nrm.CheckpointError, match=match):
        nrm.load(tiny_ckpt)


def test_refitting_a_detector_keeps_the_model_id_and_changes_the_file_hash(tiny_ckpt: Path, tmp_path: Path) -> None:
    from nrm.checkpoint import file_sha256
    from nrm.fit import refit

    model = nrm.load(tiny_ckpt)
    refit(model, [torch.randn(40, 1, 8, 8)])
    nrm.save(model, tmp_path / "refit")
    assert nrm.model_id(tmp_path / "refit") == nrm.model_id(tiny_ckpt)
    assert file_sha256(tmp_path / "refit") != file_sha256(tiny_ckpt)
    assert read_config(tmp_path / "refit")["weights_sha256"] == file_sha256(tmp_path / "refit")
