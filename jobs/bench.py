"""`nrm-ood bench`: the speed and memory targets, measured side by side in one run.

1. NRM scoring time / plain inference time of the same CNN and batch (target <= 2.0x);
2. end-to-end job throughput (Parquet -> scores, local files and the S3 endpoint) / in-memory
   scoring throughput of the same model with the same torch threads as the job's actors (>= 0.8);
3. peak memory (driver + Ray processes, RSS sampled every 0.2 s) at 1x and 10x the dataset (flat within 20%);
4. images/s on a GPU when torch sees one.
Writes a markdown report (docs/benchmarks.md by default) with the command and the machine.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import nrm
from nrm.config import ModelConfig
from nrm.fit import refit
from nrm.names import DEFAULT_DETECTOR, DEFAULT_FEATURES
from nrm.scores import COLUMNS, RENDERED

Echo = Callable[[str], None]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def _time(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)  # the VM's steal time only ever adds: the best run is the least noisy estimate


def device_sync(device: str | torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work before a clock is read (nothing on a CPU)."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def random_model(cfg: ModelConfig, device: str = "cpu") -> nrm.NRM:
    torch.manual_seed(0)
    return nrm.NRM(cfg).to(device).eval().requires_grad_(False)


def fastest(fns: dict[str, Callable[[], Any]], reps: int) -> tuple[float, str]:
    """(best-run seconds, label) of the fastest of ``fns``: plain inference is always the best we can do."""
    times = {label: _time(fn, reps) for label, fn in fns.items()}
    label = min(times, key=lambda k: times[k])
    return times[label], label


def plain_variants(module: torch.nn.Module, x: torch.Tensor, sync: Callable[[], None],
                   precision: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                   ) -> dict[str, Callable[[], Any]]:
    """The user's torch module as it runs fastest: as given, with BatchNorm fused into the convs
    (torch.fx's own fusion, where the module traces), in either memory format; each run inside
    ``precision()`` (the NRM's own, so that both sides compute in the same precision)."""
    import copy

    variants: dict[str, torch.nn.Module] = {"as given": module}
    try:
        from torch.fx.experimental.optimization import fuse

        variants["BN fused"] = fuse(copy.deepcopy(module))
    except Exception:  # noqa: BLE001 - a module fx cannot trace keeps its unfused forward
        pass
    xcl = x.contiguous(memory_format=torch.channels_last)
    fns: dict[str, Callable[[], Any]] = {}
    for label, mod in variants.items():
        mcl = copy.deepcopy(mod).to(memory_format=torch.channels_last)  # type: ignore[call-overload]

        def run(m: torch.nn.Module = mod, inp: torch.Tensor = x) -> None:
            with torch.no_grad(), precision():
                m(inp)
            sync()

        def run_cl(m: torch.nn.Module = mcl, inp: torch.Tensor = xcl) -> None:
            with torch.no_grad(), precision():
                m(inp)
            sync()

        fns[label] = run
        fns[f"{label}, channels_last"] = run_cl
    return fns


# The forward-only columns of the default table: the classifier's and the default detector on gate statistics.
CLASSIFIER = [c for c in COLUMNS if c not in RENDERED]  # pred, max_softmax, max_logit, energy
FORWARD_ONLY = [*CLASSIFIER, "det_mahalanobis"]
BASELINES = ["mahalanobis_feat", "knn", "vim"]  # the post-hoc baselines, fitted with `fit-detector --baselines`


def full_table(model: nrm.NRM) -> list[str]:
    """The full score's columns: every column of the default table, the post-hoc baselines left out."""
    return [c for c in model.columns if c not in BASELINES]


def fit_for_cost(model: nrm.NRM, bank: int = 45000) -> None:
    """Fit the default detector and the post-hoc baselines on random data of the real sizes (a KNN
    bank of ``bank`` rows, as a CIFAR-10 training split gives): only their cost is measured."""
    from nrm import posthoc as P

    device = model.mean.device
    refit(model, [torch.randn(256, *model.input_shape, device=device) for _ in range(2)])
    if model.config.fitted.posthoc:
        return
    f, logits = model.penultimate(torch.randn(512, *model.input_shape, device=device))
    feats = f[torch.randint(len(f), (bank,))].cpu() + 0.01 * torch.randn(bank, f.shape[1])
    head = model.node_params(model.classifier.name)
    labels = torch.arange(bank) % len(model.config.classes)
    model.config.fitted.posthoc = P.fit_all(feats, logits.cpu()[torch.randint(len(f), (bank,))], labels,
                                            head["weight"].double().cpu(), head["bias"].double().cpu(),
                                            len(model.config.classes))


def _plain_then_fit(model: nrm.NRM, plain_module: torch.nn.Module, batch: int, reps: int,
                    ) -> tuple[torch.Tensor, Callable[[], None], dict[str, Any]]:
    """A random batch, the device's sync, and plain inference at its fastest ({"plain_s", "plain"});
    then the model's detector and baselines are fitted for cost."""
    device = model.mean.device
    x = torch.randn(batch, *model.input_shape, device=device)
    sync = device_sync(device)
    tp, plain_label = fastest(plain_variants(plain_module, x, sync, model.autocast), reps)
    fit_for_cost(model)
    return x, sync, {"plain_s": tp, "plain": plain_label}


def overhead(model: nrm.NRM, plain_module: torch.nn.Module, batch: int, reps: int) -> dict[str, Any]:
    """NRM score time / plain inference time, each at its fastest memory format: the default table
    (every NRM column and the default detector), its forward-only columns, the classifier's columns
    alone (no unit statistics), and the post-hoc baselines alone. ``plain_module`` is the user's own
    module (or the NRM itself for a preset)."""
    x, sync, res = _plain_then_fit(model, plain_module, batch, reps)
    tp = res["plain_s"]
    default = full_table(model)
    for label, cols in (("score", default), ("forward", FORWARD_ONLY), ("classifier", CLASSIFIER),
                        ("baselines", ["pred", *BASELINES])):
        for cl in (False, True):
            model.use_channels_last(cl)

            def run(cols: list[str] = cols, m: nrm.NRM = model) -> None:
                m.score(x, columns=cols)
                sync()

            res[f"{label}_s_{'cl' if cl else 'nchw'}"] = _time(run, reps)
        res[f"{label}_s"] = min(res[f"{label}_s_nchw"], res[f"{label}_s_cl"])
        res[f"{label}_ratio"] = res[f"{label}_s"] / tp
    model.use_channels_last(False)
    res["images_per_s"] = batch / res["score_s"]
    return res


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the shared ResNets' normalisation


def bench_models(device: str, shared: Path | None, only: tuple[str, ...] = ()) -> list[tuple[str, nrm.NRM, torch.nn.Module]]:
    """(label, NRM, the module plain inference runs) for every preset and the CIFAR ResNets: the
    shared pretrained ones converted when ``shared`` holds them, else the resnet-cifar preset.
    ``only``: keep the models whose label contains one of these strings (all when empty)."""
    out = _bench_models(device, shared)
    return [m for m in out if not only or any(o.lower() in m[0].lower() for o in only)]


def _bench_models(device: str, shared: Path | None) -> list[tuple[str, nrm.NRM, torch.nn.Module]]:
    out: list[tuple[str, nrm.NRM, torch.nn.Module]] = []
    for name, width in (("gray28", 0.5), ("gray28", 1.0), ("rgb32-small", 1.0), ("rgb32-allconv", 0.5)):
        m = random_model(nrm.preset(name, width), device)
        out.append((f"{name} w{width}", m, m))
    src = shared / "models" / "cifar10-resnet" if shared else None
    for depth in (20, 56):
        if src is not None and (src / f"resnet{depth}.safetensors").is_file():
            from jobs.convert import build_module, read_weights

            user = build_module(f"{src / 'resnet.py'}:resnet{depth}")
            user.load_state_dict(read_weights(src / f"resnet{depth}.safetensors"))
            converted = nrm.from_torch(user.eval(), (3, 32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD)  # its README's
            out.append((f"ResNet-{depth} (pretrained, converted)", converted.to(device), user.to(device)))
        else:
            m = random_model(nrm.preset("resnet-cifar", 1.0, depth=depth), device)
            out.append((f"resnet-cifar depth {depth} (preset)", m, m))
    return out


def speed_section(devices: list[str], batch: int, reps: int, shared: Path | None, echo: Echo,
                  only: tuple[str, ...] = ()) -> list[str]:
    lines = ["## 1. NRM score / plain inference (targets: <= 2.0x full score, <= 1.15x forward-only columns)", "",
             "Plain = the network's own torch module at its fastest: for the ResNets the user's `resnet.py` module "
             "with BatchNorm fused by torch.fx and the faster memory format; for the presets the NRM's own forward "
             "(which is the module), in the faster format. Full score = `model.score(x)`: forward + one "
             "vector-Jacobian product (the in-place reverse pass, no autograd) + every column of the default "
             f"table, with `nrm-ood train`'s default detector ({DEFAULT_DETECTOR}[{DEFAULT_FEATURES}]) fitted. "
             f"Forward-only = `model.score(x, columns=[{', '.join(FORWARD_ONLY)}])`, no backward pass. "
             "Classifier = its first four columns alone (no unit statistics: what `score --columns` of "
             "confidence columns costs). Baselines = the post-hoc columns alone "
             f"({', '.join(BASELINES)}; KNN with a bank of 45,000 training rows, as CIFAR-10 gives: its cost grows "
             f"with the bank, not with the network). Best of {reps} runs after a warm-up (this VM's timings vary by "
             f"tens of percent between runs; noise only adds time); torch threads "
             f"{torch.get_num_threads()}.", "",
             "| model | device | batch | plain (ms) | plain variant | full score (ms) | ratio | forward-only (ms) "
             "| ratio | classifier (ms) | ratio | baselines (ms) | ratio | NRM images/s | targets met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for device in devices:
        batches = [batch] if device == "cpu" else [512, 4096]
        for label, model, plain in bench_models(device, shared, only):
            for b in batches:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                r = overhead(model, plain, b, reps)
                met = r["score_ratio"] <= 2.0 and r["forward_ratio"] <= 1.15
                mem = f"; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""
                lines.append(f"| {label} | {device} | {b} | {r['plain_s'] * 1e3:.1f} | {r['plain']} | "
                             f"{r['score_s'] * 1e3:.1f} | {r['score_ratio']:.2f}x | {r['forward_s'] * 1e3:.1f} | "
                             f"{r['forward_ratio']:.2f}x | {r['classifier_s'] * 1e3:.1f} | {r['classifier_ratio']:.2f}x | "
                             f"{r['baselines_s'] * 1e3:.1f} | {r['baselines_ratio']:.2f}x | "
                             f"{r['images_per_s']:.0f}{mem} | {'yes' if met else 'no'} |")
                echo(f"  {label} {device} b{b}: full {r['score_ratio']:.2f}x, forward-only {r['forward_ratio']:.2f}x, "
                     f"classifier {r['classifier_ratio']:.2f}x")
    if "cuda" not in devices:
        lines += ["", "No GPU on this machine: GPU figures come from `scripts/gpu_check.sh` on a machine with one."]
    return lines


def _first_call(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compiled_overhead(model: nrm.NRM, plain_module: torch.nn.Module, batch: int, reps: int) -> dict[str, Any]:
    """The forward-only columns and the full score (the default table, as in section 1) with
    ``NRM.use_compile`` in the model's fast layout (as the scoring actors run them: channels_last,
    NCHW for fp32 on CUDA), against plain inference eager at its fastest (the targets' ratio) and the
    plain module compiled in the same layout (the like-for-like ratio); each first call's seconds are
    its compile time."""
    import copy

    x, sync, res = _plain_then_fit(model, plain_module, batch, reps)
    model.use_fast_layout().use_compile(True)
    layout = torch.channels_last if model.channels_last else torch.contiguous_format
    tp, xin = res["plain_s"], x.contiguous(memory_format=layout)
    module = torch.compile(copy.deepcopy(plain_module).to(memory_format=layout))  # type: ignore[call-overload]

    def plain_run() -> None:
        with torch.no_grad(), model.autocast():
            module(xin)
        sync()

    res["plain_compile_s"] = _first_call(plain_run)
    res["plain_compiled_s"] = _time(plain_run, reps)
    default = full_table(model)
    for label, cols in (("forward", FORWARD_ONLY), ("score", default)):
        def run(cols: list[str] = cols) -> None:
            model.score(x, columns=cols)
            sync()

        res[f"{label}_compile_s"] = _first_call(run)
        res[f"{label}_s"] = _time(run, reps)
        res[f"{label}_ratio"] = res[f"{label}_s"] / tp
        res[f"{label}_ratio_compiled"] = res[f"{label}_s"] / res["plain_compiled_s"]
    model.use_compile(False).use_channels_last(False)
    return res


def compile_section(device: str, batch: int, reps: int, shared: Path | None, echo: Echo,
                    only: tuple[str, ...] = ()) -> list[str]:
    """The forward-only columns and the full score of section 1 again with torch.compile (``nrm-ood
    score --compile``); ``batch`` on a CPU, 4096 on a GPU."""
    batch = batch if device == "cpu" else 4096
    lines = ["## 1b. With torch.compile (`nrm-ood score --compile`)", "",
             "The forward-only columns and the full score of section 1 with `NRM.use_compile` (inductor, in the "
             "model's fast layout as the scoring actors run it; the full score's forward and top-down walk compile "
             "as one graph, so the ReLUs, their gradients, the residual sums and the statistics fuse into a few "
             "loops around the convolutions), against plain inference as in section 1 (eager, at its fastest: the "
             "targets' ratio) and against the plain module compiled the same way (the like-for-like ratio). "
             f"Compile = the first call's seconds, paid once per batch shape and actor. Best of {reps} runs after "
             "that call.", "",
             "| model | device | batch | plain eager (ms) | plain compiled (ms) | forward-only compiled (ms) "
             "| ratio to eager plain | ratio to compiled plain | full score compiled (ms) | ratio to eager plain "
             "| ratio to compiled plain | compile s (plain / forward-only / full) | targets met (eager plain) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, model, plain in bench_models(device, shared, only):
        r = compiled_overhead(model, plain, batch, reps)
        met = r["forward_ratio"] <= 1.15 and r["score_ratio"] <= 2.0
        lines.append(f"| {label} | {device} | {batch} | {r['plain_s'] * 1e3:.1f} | {r['plain_compiled_s'] * 1e3:.1f} | "
                     f"{r['forward_s'] * 1e3:.1f} | {r['forward_ratio']:.2f}x | {r['forward_ratio_compiled']:.2f}x | "
                     f"{r['score_s'] * 1e3:.1f} | {r['score_ratio']:.2f}x | {r['score_ratio_compiled']:.2f}x | "
                     f"{r['plain_compile_s']:.0f} / {r['forward_compile_s']:.0f} / {r['score_compile_s']:.0f} | "
                     f"{'yes' if met else 'no'} |")
        echo(f"  {label} compiled: forward-only {r['forward_ratio']:.2f}x ({r['forward_ratio_compiled']:.2f}x of compiled "
             f"plain), full {r['score_ratio']:.2f}x ({r['score_ratio_compiled']:.2f}x)")
    return lines


def precision_section(device: str, batch: int, reps: int, shared: Path | None, echo: Echo) -> list[str]:
    """Speed of the full score per precision on ResNet-20, eager and compiled, against plain inference
    in the same precision, and (with the shared data) the change in AUROC; ``batch`` on a CPU, 4096 on
    a GPU."""
    batch = batch if device == "cpu" else 4096
    label, model, plain = _bench_models(device, shared)[4]  # ResNet-20
    x = torch.randn(batch, *model.input_shape, device=device)
    sync = device_sync(device)
    auroc = precision_auroc(model, shared, device) if shared else {}
    fit_for_cost(model)
    default = full_table(model)
    lines = ["## 2. Reduced precision (`--precision`)", "",
             f"{label}, {device}, batch {batch}, full score (section 1's), channels_last, eager and with "
             "`--compile`; plain = the user's module in the same precision at its fastest (as section 1). AUROC of "
             "`latent_prior` and `max_logit` (CIFAR-10 test, first 2,000 rows, against textures32's report half and "
             "MNIST as RGB, first 2,000 rows) with the same fitted state, eager.", "",
             "| precision | plain (ms) | full score (ms) | ratio to plain | speed vs fp32 | full score compiled (ms) "
             "| ratio to plain | speed vs fp32 eager | AUROC textures32 latent_prior / max_logit "
             "| AUROC MNIST latent_prior / max_logit |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = None
    for p in ("fp32", "bf16", "fp16", "tf32"):
        model.set_precision(p).use_channels_last(False)
        try:
            tp, _ = fastest(plain_variants(plain, x, sync, model.autocast), reps)
            model.use_channels_last(True)
            t = _time(lambda: (model.score(x, columns=default), sync()), reps)
        except RuntimeError as e:  # a precision this device cannot run
            lines.append(f"| {p} | not available ({str(e).splitlines()[0][:80]}) | | | | | | | | |")
            continue
        base = base or t
        compiled, compiled_ms = "not run (fp16 on a CPU: slower than fp32, eager) | - | -", "not run"
        if device != "cpu" or p != "fp16":
            model.use_compile(True)
            model.score(x, columns=default)  # compiles
            tc = _time(lambda: (model.score(x, columns=default), sync()), reps)
            model.use_compile(False)
            compiled_ms = f"{tc * 1e3:.1f} ms"
            compiled = f"{tc * 1e3:.1f} | {tc / tp:.2f}x | {base / tc:.2f}x"
        cells = [_auroc_cell(auroc.get(p, {}), name) for name in ("textures32", "mnist")]
        lines.append(f"| {p} | {tp * 1e3:.1f} | {t * 1e3:.1f} | {t / tp:.2f}x | {base / t:.2f}x | {compiled} | "
                     f"{cells[0]} | {cells[1]} |")
        echo(f"  {p}: plain {tp * 1e3:.1f} ms, full {t * 1e3:.1f} ms, compiled {compiled_ms}")
    model.set_precision("fp32").use_channels_last(False)
    return lines


def _auroc_cell(a: dict[str, dict[str, float]], name: str) -> str:
    return " / ".join(f"{a[name][c]:.4f}" for c in ("latent_prior", "max_logit")) if name in a else "-"


def precision_auroc(model: nrm.NRM, shared: Path, device: str) -> dict[str, dict[str, dict[str, float]]]:
    """precision -> OOD set -> column -> AUROC, on the shared sets (empty when they are absent)."""
    from jobs.datasets import load_images
    from nrm.metrics import auroc

    data = shared / "datasets"
    sets = {"in": data / "cifar10" / "test", "textures32": data / "textures32" / "test", "mnist": data / "mnist" / "test"}
    if not all(p.is_dir() for p in sets.values()):
        return {}
    xs = {k: model.preprocess(torch.from_numpy(load_images(str(v), model.input_shape, 2000))) for k, v in sets.items()}
    order = np.random.default_rng(0).permutation(len(xs["textures32"]))  # scripts/split_textures.py's report half
    xs["textures32"] = xs["textures32"][torch.from_numpy(np.sort(order[len(order) // 2 :]))]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for p in ("fp32", "bf16", "fp16", "tf32"):
        model.set_precision(p)
        try:
            cols = {k: {c: torch.cat([model.score(v[i : i + 256], columns=[c])[c] for i in range(0, len(v), 256)])
                        for c in ("latent_prior", "max_logit")} for k, v in xs.items()}
        except RuntimeError:
            continue
        out[p] = {k: {c: float(auroc(cols["in"][c].double().cpu().numpy(), cols[k][c].double().cpu().numpy()))
                      for c in ("latent_prior", "max_logit")} for k in ("textures32", "mnist")}
    model.set_precision("fp32")
    return out


def _write_shards(root: Path, n: int, shards: int, shape: tuple[int, int, int]) -> None:
    from PIL import Image

    from jobs.datasets import png_cells, write_hf_parquet

    c, h, w = shape
    rng = np.random.default_rng(0)
    per = (n + shards - 1) // shards
    for s in range(shards):
        m = min(per, n - s * per)
        if m <= 0:
            break
        # smooth random images (closer to real PNG sizes than white noise)
        base = rng.integers(0, 256, (m, h // 4 + 1, w // 4 + 1, c), dtype=np.uint8)
        images = np.stack([np.asarray(Image.fromarray(b.squeeze(-1) if c == 1 else b).resize(
            (w, h), Image.Resampling.BILINEAR)) for b in base])
        write_hf_parquet(root / f"part-{s:05d}.parquet", png_cells(images, str(s)),
                         rng.integers(0, 10, m), row_group_size=1024)


class PeakRSS:
    """Peak resident memory of this process and all its descendants (Ray's raylet and workers)."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            with contextlib.suppress(Exception):
                total += p.memory_info().rss
        return total

    def __enter__(self) -> PeakRSS:
        def loop() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self._sample())
                time.sleep(0.2)

        self.t = threading.Thread(target=loop, daemon=True)
        self.t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.t.join()


def request_counts(log: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        for method in ("GET", "HEAD", "PUT", "POST", "DELETE"):
            if f'"{method} ' in line:
                counts[method] = counts.get(method, 0) + 1
    return counts


def decode_throughput(data: Path, shape: tuple[int, int, int]) -> float:
    """Images/s of Parquet read + PNG decode in this one process (one CPU), as a read task does it."""
    from jobs.images import Policy
    from jobs.pipeline import ReadSpec, read_unit
    from jobs.planning import plan_inputs
    from jobs.storage import Store

    store = Store()
    plan = plan_inputs(store, store.list_parquet(str(data))[:2], None, None, None)
    spec = ReadSpec(store, shape, Policy.adapt)
    t = time.perf_counter()
    n = sum(len(read_unit(u, spec)["id"]) for u in plan.units)
    return n / (time.perf_counter() - t)


def in_memory_throughput(ckpt: Path, data: Path, threads: int, batch: int) -> float:
    """Images/s of model.score on already decoded, preprocessed tensors (no I/O, no Ray), in the
    layout the scoring actors use (``use_fast_layout``: channels_last on a CPU)."""
    from jobs.datasets import load_labelled

    model = nrm.load(ckpt).use_fast_layout()
    x, _ = load_labelled(str(data), model.input_shape, limit=8192)
    xs = model.preprocess(torch.from_numpy(x))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def run() -> None:
            for i in range(0, len(xs), batch):
                model.score(xs[i : i + batch])

        return len(xs) / _time(run, 3)
    finally:
        torch.set_num_threads(old)


def job(ckpt: str, data: str, out: str, batch: int, echo: Echo) -> tuple[dict[str, Any], float]:
    from jobs.pipeline import ScoreOptions, run_score

    with PeakRSS() as mem:
        res = run_score(ScoreOptions(model=ckpt, input=data, output=out, batch_size=batch), echo=lambda s: None)
    m = res.manifest
    assert m["rows"]["in"] == m["rows"]["ok"] + m["rows"]["error"]
    echo(f"  job {data}: {m['rows']['in']} rows, {m['timings']['images_per_s']} images/s, peak RSS {mem.peak / 2**20:.0f} MiB")
    return m, mem.peak


def start_moto(log: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    """moto's S3 server on 127.0.0.1; its request log (one line per HTTP request) goes to ``log``."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        return None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    return None


SECTIONS = ("speed", "compile", "precision", "job")


def run(out_md: Path | None, n: int, batch: int, reps: int, echo: Echo, command: str,
        sections: tuple[str, ...] = SECTIONS, shared: Path | None = None, devices: tuple[str, ...] = (),
        only: tuple[str, ...] = ()) -> str:
    """Run the chosen ``sections`` and return the markdown report; write it to ``out_md`` when given.
    ``devices``: where section 1 runs (default: the CPU, and the GPU when torch sees one); the compile
    and precision sections run on the last of them. ``only``: the models of sections 1 and 1b whose
    label contains one of these strings (all when empty)."""
    from jobs.allocator import keep_freed_memory

    kept = keep_freed_memory()  # as the CLI and the scoring actors run: plain and NRM alike
    lines = ["# Benchmarks", "", f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}.", "",
             f"Machine: {machine()}. Freed memory {'kept in the process' if kept else 'returned to the system'} "
             "(jobs/allocator.py).", ""]
    devices = devices or ("cpu", *(["cuda"] if torch.cuda.is_available() else []))
    if "speed" in sections:
        echo("NRM scoring vs plain inference ...")
        lines += speed_section(list(devices), batch, reps, shared, echo, only) + [""]
    if "compile" in sections:
        echo("NRM scoring vs plain inference, compiled ...")
        lines += compile_section(devices[-1], batch, reps, shared, echo, only) + [""]
    if "precision" in sections:
        echo("reduced precision ...")
        lines += precision_section(devices[-1], batch, reps, shared, echo) + [""]
    if "job" in sections:
        lines += job_sections(n, batch, echo)
    text = "\n".join(lines) + "\n"
    if out_md is not None:
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_md.write_text(text)
    return text


def job_sections(n: int, batch: int, echo: Echo) -> list[str]:
    """End-to-end job throughput (local and S3), read + decode throughput, peak memory at 1x and 10x."""
    from jobs.pipeline import init_ray

    lines: list[str] = []
    # 2./3. end to end ----------------------------------------------------------------------
    init_ray(None)
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    with tempfile.TemporaryDirectory(prefix="nrm-bench-") as tmp:
        root = Path(tmp)
        ckpt = root / "ckpt"
        model = random_model(nrm.preset("gray28", 0.5))
        from nrm.fit import fit

        xs = torch.randn(256, *model.input_shape)
        fit(model, [xs], [xs])
        nrm.save(model, ckpt)
        echo(f"writing {n} and {10 * n} generated 28x28 PNG images ...")
        _write_shards(root / "data1x", n, 8, model.input_shape)
        _write_shards(root / "data10x", 10 * n, 40, model.input_shape)
        threads = 1  # what each actor gets on this machine (cpus_per_actor 1)
        mem_1t = in_memory_throughput(ckpt, root / "data1x", threads, batch)
        mem_all = in_memory_throughput(ckpt, root / "data1x", max(1, int(cpus)), batch)
        echo(f"  in-memory: {mem_1t:.0f} images/s (1 thread), {mem_all:.0f} (all cores)")
        decode = decode_throughput(root / "data1x", model.input_shape)
        echo(f"  read + decode: {decode:.0f} images/s per CPU")
        echo("end-to-end job, local files ...")
        m1, peak1 = job(str(ckpt), str(root / "data1x"), str(root / "out"), batch, echo)
        m10, peak10 = job(str(ckpt), str(root / "data10x"), str(root / "out"), batch, echo)
        s3, requests = None, {}
        moto = start_moto(root / "moto.log")
        if moto is not None:
            echo("   ... and through the S3 endpoint (moto server on 127.0.0.1)")
            proc, url = moto
            saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
            os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
            try:
                from jobs.storage import Store

                s3c = Store().s3()
                s3c.create_bucket(Bucket="nrm-bench")
                for f in sorted((root / "data1x").glob("*.parquet")):
                    s3c.upload_file(str(f), "nrm-bench", f"data/{f.name}")
                for f in sorted(ckpt.iterdir()):
                    s3c.upload_file(str(f), "nrm-bench", f"model/{f.name}")
                ray.shutdown()  # workers must see the endpoint variables
                init_ray(None)
                before = request_counts(root / "moto.log")
                s3, _ = job("s3://nrm-bench/model", "s3://nrm-bench/data", "s3://nrm-bench/out", batch, echo)
                after = request_counts(root / "moto.log")
                requests = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                proc.terminate()
    lines += ["", "## 3. End-to-end job throughput / in-memory scoring throughput (target >= 0.8)", "",
              f"Generated 28x28 grayscale PNG shards (HF image layout), gray28 w0.5 checkpoint, batch {batch}, "
              f"embedded Ray with {cpus:g} CPUs: 1 scoring actor x 1 CPU (torch threads 1) + read/decode tasks at 0.5 CPU. "
              "Job time includes planning, Ray start-up of the pipeline, decode, score, Parquet write and the manifest.", "",
              f"In-memory `model.score` on preprocessed tensors: **{mem_1t:.0f} images/s with 1 thread** "
              f"(what one actor gets here), {mem_all:.0f} images/s with {int(cpus)} threads.", "",
              "| input | rows | job images/s | / in-memory (1 thread) | / in-memory (all cores) | target met |",
              "|---|---|---|---|---|---|"]
    for label, m in (("local 1x", m1), ("local 10x", m10), ("S3 (moto) 1x", s3)):
        if m is None:
            lines.append(f"| {label} | - | not measured (moto server not installed) | | | |")
            continue
        ips = m["timings"]["images_per_s"]
        lines.append(f"| {label} | {m['rows']['in']} | {ips:.0f} | {ips / mem_1t:.2f} | {ips / mem_all:.2f} | "
                     f"{'yes' if ips / mem_1t >= 0.8 else 'no'} |")
    if s3 is not None:
        shards = s3["inputs"]["count"]
        total = sum(requests.values())
        lines += ["", f"S3 requests of that run (moto's request log): {total} in all for {shards} input shards of "
                  f"{s3['rows']['in'] // max(1, shards)} rows and {s3['outputs']['count']} output files: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(requests.items()))
                  + f" (~{total / max(1, shards):.1f} requests per input shard, everything included)."]
    lines += ["", "## 4. Read + decode throughput per CPU", "",
              f"Parquet row groups read and PNG-decoded by `read_unit` in one process: **{decode:.0f} images/s per CPU** "
              "(28x28 grayscale)."]
    growth = peak10 / peak1 - 1
    lines += ["", "## 5. Peak memory at 1x and 10x the dataset (target: flat within 20%)", "",
              "Peak RSS of the driver and every Ray process it started (raylet, GCS, workers), sampled every 0.2 s.", "",
              "| dataset | rows | peak RSS (MiB) |", "|---|---|---|",
              f"| 1x | {m1['rows']['in']} | {peak1 / 2**20:.0f} |",
              f"| 10x | {m10['rows']['in']} | {peak10 / 2**20:.0f} |", "",
              f"Growth 1x -> 10x: {growth:+.1%} ({'met' if abs(growth) <= 0.2 else 'not met'}).", ""]
    return lines
