"""`nrm-ood convert` (jobs/convert.py) through CliRunner and once as the console script, and
`nrm-ood train --init` fine-tuning a converted model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support import png_bytes, random_images, write_hf_parquet
from typer.testing import CliRunner

import nrm
from jobs.cli import app

runner = CliRunner(env={"COLUMNS": "200"})

MODEL_FILE = '''
import torch
from torch import nn


def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def gray():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
'''


def _net(tmp_path: Path, factory: str = "make") -> torch.nn.Module:
    """The module the model file builds, with seeded weights and BN statistics (what the user trained)."""
    ns: dict[str, object] = {}
    exec(MODEL_FILE, ns)  # noqa: S102 - our own test source
    torch.manual_seed(0)
    net = ns[factory]()  # type: ignore[operator]
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
                m.running_var.uniform_(0.5, 1.5)  # type: ignore[union-attr]
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


@pytest.fixture
def user_model(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    (tmp_path / "model.py").write_text(MODEL_FILE)
    net = _net(tmp_path)
    save_file(dict(net.state_dict()), str(tmp_path / "w.safetensors"))
    return tmp_path, net


def _convert(root: Path, weights: Path, *extra: str) -> object:
    return runner.invoke(app, ["convert", "--module", f"{root / 'model.py'}:make", "--weights", str(weights),
                               "--input-shape", "3,8,8", "--out", str(root / "ckpt"), *extra])


def _same_logits(root: Path, net: torch.nn.Module) -> None:
    model = nrm.load(root / "ckpt")
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)


def test_convert_safetensors_checkpoint_loads(user_model: tuple[Path, torch.nn.Module]) -> None:
    root, net = user_model
    r = _convert(root, root / "w.safetensors", "--mean", "0.5,0.4,0.3", "--std", "0.2,0.25,0.3", "--classes",
                 "cat,dog,fox")
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    assert "next: nrm-ood fit-detector" in r.output  # type: ignore[attr-defined]
    model = nrm.load(root / "ckpt")
    assert model.config.classes == ["cat", "dog", "fox"]
    assert model.config.input.mean == (0.5, 0.4, 0.3) and model.config.input.std == (0.2, 0.25, 0.3)
    _same_logits(root, net)


def test_convert_reads_a_pt_state_dict(user_model: tuple[Path, torch.nn.Module]) -> None:
    root, net = user_model
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, root / "w.pt")
    r = _convert(root, root / "w.pt")
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    _same_logits(root, net)


class _Marker:
    """Unpickling this creates the file at ``path``: proof that a pickle's code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_convert_never_runs_a_pickle_with_code(user_model: tuple[Path, torch.nn.Module]) -> None:
    root, _ = user_model
    marker = root / "pwned"
    torch.save({"0.weight": _Marker(marker)}, root / "evil.pt")
    _convert(root, root / "evil.pt")
    assert not marker.exists() and not (root / "ckpt").exists()


def test_convert_refuses_a_pickle_with_code_clearly(user_model: tuple[Path, torch.nn.Module]) -> None:
    root, _ = user_model
    torch.save({"0.weight": _Marker(root / "pwned")}, root / "evil.pt")
    r = _convert(root, root / "evil.pt")
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # type: ignore[attr-defined]
    assert r.exit_code == 1  # type: ignore[attr-defined]
    assert f"error: --weights {root / 'evil.pt'}: cannot be read as a state dict" in r.output  # type: ignore[attr-defined]


@pytest.mark.parametrize("spec", ["model.py", "missing.py:make", "model.py:nothing"])
def test_bad_module_spec_is_one_line(user_model: tuple[Path, torch.nn.Module], spec: str) -> None:
    root, _ = user_model
    r = runner.invoke(app, ["convert", "--module", str(root / spec), "--input-shape", "3,8,8", "--out",
                            str(root / "ckpt")])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --module {str(root / spec)!r}: "), r.output


def test_unconvertible_module_exits_1_naming_the_op(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Flatten(), "
                                   "nn.Linear(64, 4), nn.GELU(), nn.Linear(4, 2))\n")
    r = runner.invoke(app, ["convert", "--module", f"{tmp_path / 'm.py'}:make", "--input-shape", "1,8,8", "--out",
                            str(tmp_path / "ckpt")])
    assert r.exit_code == 1
    assert r.output.startswith("error: 2: GELU is not piecewise-linear"), r.output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_console_script_converts_in_a_subprocess(user_model: tuple[Path, torch.nn.Module]) -> None:
    root, net = user_model
    exe = Path(sys.executable).with_name("nrm-ood")
    assert exe.is_file()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([str(exe), "convert", "--module", f"{root / 'model.py'}:make", "--weights",
                        str(root / "w.safetensors"), "--input-shape", "3,8,8", "--out", str(root / "ckpt")],
                       env=env, cwd=root, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"checkpoint {root / 'ckpt'} (model_id {nrm.model_id(root / 'ckpt')[:12]})" in r.stdout
    _same_logits(root, net)


def test_train_init_fine_tunes_a_converted_model(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(MODEL_FILE)
    net = _net(tmp_path, "gray")
    save_file(dict(net.state_dict()), str(tmp_path / "w.safetensors"))
    r = runner.invoke(app, ["convert", "--module", f"{tmp_path / 'model.py'}:gray", "--weights",
                            str(tmp_path / "w.safetensors"), "--input-shape", "1,8,8", "--mean", "0.4", "--std",
                            "0.3", "--out", str(tmp_path / "init")])
    assert r.exit_code == 0, r.output
    write_hf_parquet(tmp_path / "train.parquet", [png_bytes(p) for p in random_images(48, seed=3)],
                     labels=[i % 3 for i in range(48)])
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "train.parquet"), "--init", str(tmp_path / "init"),
                            "--out", str(tmp_path / "tuned"), "--epochs", "1", "--batch-size", "16", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    init, tuned = nrm.load(tmp_path / "init"), nrm.load(tmp_path / "tuned")
    assert [n.to_dict() for n in tuned.config.nodes] == [n.to_dict() for n in init.config.nodes]
    assert tuned.config.input == init.config.input and tuned.config.input.mean == (0.4,)
    assert not torch.equal(tuned.node_params("0")["weight"], init.node_params("0")["weight"])


def test_train_init_refuses_arch_options(tiny_ckpt: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["train", "--data", str(tmp_path), "--init", str(tiny_ckpt), "--depth", "20",
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "error: --init fine-tunes the checkpoint's own network; drop --arch, --width and --depth" in r.output


# --------------------------------------------------------------------------- importable factories, kwargs, class files


def test_convert_an_importable_torchvision_factory_with_kwargs(tmp_path: Path) -> None:
    from jobs.torchvision_compat import import_module

    try:
        models = import_module("torchvision.models")
    except ImportError as e:
        pytest.skip(f"torchvision cannot be imported ({e})")
    torch.manual_seed(0)
    net = models.resnet18(num_classes=10, width_per_group=64).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)  # type: ignore[union-attr]
                m.running_var.uniform_(0.5, 1.5)  # type: ignore[union-attr]
    save_file(dict(net.state_dict()), str(tmp_path / "w.safetensors"))
    r = runner.invoke(app, ["convert", "--module", "torchvision.models:resnet18", "--module-kwargs",
                            "num_classes=10,width_per_group=64", "--weights", str(tmp_path / "w.safetensors"),
                            "--input-shape", "3,64,64", "--out", str(tmp_path / "ckpt")])
    assert r.exit_code == 0, r.output
    model = nrm.load(tmp_path / "ckpt")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("text", ["cat\ndog\nfox\n", '["cat", "dog", "fox"]'], ids=["lines", "json"])
def test_classes_file_names_the_outputs(user_model: tuple[Path, torch.nn.Module], text: str) -> None:
    root, _ = user_model
    (root / "classes.txt").write_text(text)
    r = _convert(root, root / "w.safetensors", "--classes-file", str(root / "classes.txt"))
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    assert nrm.load(root / "ckpt").config.classes == ["cat", "dog", "fox"]


def test_classes_file_of_the_wrong_length_is_refused(user_model: tuple[Path, torch.nn.Module]) -> None:
    root, _ = user_model
    (root / "classes.txt").write_text("tench, Tinca tinca\ngoldfish\n")
    r = _convert(root, root / "w.safetensors", "--classes-file", str(root / "classes.txt"))
    assert r.exit_code == 1  # type: ignore[attr-defined]
    assert r.output.strip() == (f"error: --classes-file {root / 'classes.txt'}: 2 class names, but the network "  # type: ignore[attr-defined]
                                f"has 3 outputs")
    assert not (root / "ckpt").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ("num_classes=ten", "num_classes=ten: the value is not a Python literal"),
    ("num_classes", "expected name=value pairs separated by commas"),
], ids=["not-a-literal", "not-a-pair"])
def test_bad_module_kwargs_are_a_usage_error_naming_the_pair(user_model: tuple[Path, torch.nn.Module], kwargs: str,
                                                            message: str) -> None:
    root, _ = user_model
    r = _convert(root, root / "w.safetensors", "--module-kwargs", kwargs)
    assert r.exit_code == 2  # type: ignore[attr-defined]
    assert message in " ".join(r.output.split())  # type: ignore[attr-defined]


def test_a_keyword_the_factory_does_not_take_is_one_line(user_model: tuple[Path, torch.nn.Module]) -> None:
    root, _ = user_model
    r = _convert(root, root / "w.safetensors", "--module-kwargs", "depth=(2, 3)")
    assert r.exit_code == 1  # type: ignore[attr-defined]
    lines = r.output.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith(f"error: --module '{root / 'model.py'}:make': make(depth=(2, 3)) "
                                                   f"failed (TypeError: "), r.output  # type: ignore[attr-defined]


def test_a_module_that_cannot_be_imported_is_one_line(tmp_path: Path) -> None:
    r = runner.invoke(app, ["convert", "--module", "no_such_package.models:make", "--input-shape", "3,8,8", "--out",
                            str(tmp_path / "ckpt")])
    assert r.exit_code == 1
    assert r.output.startswith("error: --module 'no_such_package.models:make': cannot import no_such_package.models "
                               "(ModuleNotFoundError: "), r.output


def test_classes_and_classes_file_together_are_refused(user_model: tuple[Path, torch.nn.Module]) -> None:
    root, _ = user_model
    (root / "classes.txt").write_text("a\nb\nc\n")
    r = _convert(root, root / "w.safetensors", "--classes", "a,b,c", "--classes-file", str(root / "classes.txt"))
    assert r.exit_code == 1  # type: ignore[attr-defined]
    assert r.output.strip() == "error: give --classes or --classes-file, not both"  # type: ignore[attr-defined]
