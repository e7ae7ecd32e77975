"""Offline checks of infra/: manifests, IAM policy, image pins and the CLI calls they contain.

Nothing here needs Docker, a cluster or the network:
  * every YAML file parses;
  * built-in Kubernetes kinds validate against kubernetes_validate's 1.31 strict schemas;
  * RayCluster / RayJob / RayCronJob follow the KubeRay v1.6.0 field list in
    kuberay_v1_6_fields.py, and their embedded pod templates validate as core/v1 types;
  * token authentication is on in every head, worker, autoscaler and submitter container;
  * the IAM policy is least-privilege and covers every s3:// location the manifests use;
  * the Dockerfiles pin every runtime dependency inside pyproject's ranges;
  * every `nrm-ood <command> --option` written in infra/ exists in the Typer app.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import json
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
KUBE_VERSION = "1.31"  # schemas shipped by kubernetes_validate; EKS and GKE still support it

CLI = "nrm-ood"
TOKEN_SECRET = "nrm-ood-ray-token"
TOKEN_KEY = "auth_token"  # the key KubeRay's authOptions.secretName expects
SERVICE_ACCOUNT = "nrm-ood-runner"


def _load_fields_module() -> Any:
    # Loaded by path so that it works under any pytest import mode.
    path = Path(__file__).with_name("kuberay_v1_6_fields.py")
    spec = importlib.util.spec_from_file_location("kuberay_v1_6_fields", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building classes
    spec.loader.exec_module(module)
    return module


F = _load_fields_module()


# --------------------------------------------------------------------------- loading


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"})


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kube_docs() -> list[tuple[str, dict[str, Any]]]:
    """(label, document) for every Kubernetes object under infra/kuberay/."""
    out = []
    for path in sorted((INFRA / "kuberay").glob("*.yaml")):
        for i, doc in enumerate(load_docs(path)):
            out.append((f"{path.name}#{i}:{doc.get('kind')}", doc))
    return out


def ray_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(label, d) for label, d in kube_docs() if d.get("apiVersion") == F.API_VERSION]


def builtin_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(label, d) for label, d in kube_docs() if d.get("apiVersion") != F.API_VERSION]


def docs_of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in kube_docs() if d.get("kind") == kind]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayClusterSpec of a RayCluster, RayJob or RayCronJob."""
    kind = doc["kind"]
    if kind == "RayCluster":
        return doc["spec"]
    if kind == "RayJob":
        return doc["spec"]["rayClusterSpec"]
    if kind == "RayCronJob":
        return doc["spec"]["jobTemplate"]["rayClusterSpec"]
    raise ValueError(f"not a KubeRay kind: {kind!r}")


def job_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] == "RayJob":
        return doc["spec"]
    if doc["kind"] == "RayCronJob":
        return doc["spec"]["jobTemplate"]
    return None


# --------------------------------------------------------------------------- YAML + built-in kinds


def test_infra_has_the_expected_files() -> None:
    expected = {
        "docker/Dockerfile",
        "docker/Dockerfile.cpu",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-score.yaml",
        "kuberay/raycronjob-audit.yaml",
        "kuberay/serviceaccount-irsa.yaml",
        "kuberay/secret-example.yaml",
        "aws/cluster.yaml",
        "aws/iam-policy.json",
        "README.md",
    }
    missing = {f for f in expected if not (INFRA / f).is_file()}
    assert not missing, f"missing under infra/: {sorted(missing)}"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


@pytest.mark.parametrize("label,doc", builtin_docs(), ids=[label for label, _ in builtin_docs()])
def test_builtin_kinds_validate_offline(label: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_every_kubernetes_object_is_builtin_or_kuberay() -> None:
    kinds = {d["kind"] for _, d in kube_docs()}
    assert {"RayCluster", "RayJob", "RayCronJob", "Secret", "ServiceAccount"} <= kinds
    for label, doc in ray_docs():
        assert doc["kind"] in F.KINDS, f"{label}: no field list for kind {doc['kind']!r}"


# --------------------------------------------------------------------------- KubeRay field list


def _wrap_core(tag: str, value: Any) -> dict[str, Any]:
    """A complete core/v1 object holding ``value``, so kubernetes_validate can check it."""
    meta = {"name": "field-check"}
    container = {"name": "field-check", "image": "field-check"}
    if tag == F.POD_TEMPLATE:
        return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": value}
    if tag == F.OBJECT_META:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": value}
    if tag == F.SERVICE:
        return {**value, "apiVersion": "v1", "kind": "Service"}
    container_field = {
        F.ENV_VARS: "env",
        F.ENV_FROM: "envFrom",
        F.RESOURCES: "resources",
        F.SECURITY_CONTEXT: "securityContext",
        F.VOLUME_MOUNTS: "volumeMounts",
    }[tag]
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": meta,
        "template": {"spec": {"containers": [{**container, container_field: value}]}},
    }


def check_fields(
    value: Any, node: Any, path: str, core: list[tuple[str, str, Any]] | None = None
) -> list[str]:
    """Problems of ``value`` against a kuberay_v1_6_fields node, as "path: message" strings.

    Values tagged core/v1 are appended to ``core`` (path, tag, value) for kubernetes_validate.
    """
    core = [] if core is None else core
    if isinstance(node, F.Obj):
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        problems = [
            f"{path}.{key}: unknown field (allowed: {', '.join(sorted(node.fields))})"
            for key in value
            if key not in node.fields
        ]
        problems += [f"{path}.{key}: required field missing" for key in sorted(node.required - set(value))]
        for key, sub in value.items():
            if key in node.fields:
                problems += check_fields(sub, node.fields[key], f"{path}.{key}", core)
        return problems
    if isinstance(node, F.ListOf):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [
            p for i, item in enumerate(value) for p in check_fields(item, node.item, f"{path}[{i}]", core)
        ]
    if isinstance(node, F.OneOf):
        return [] if value in node.values else [f"{path}: {value!r} is not one of {node.values}"]
    if node == F.STRING:
        ok = isinstance(value, str)
    elif node == F.INTEGER:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif node == F.NUMBER:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif node == F.BOOLEAN:
        ok = isinstance(value, bool)
    elif node == F.STRING_MAP:
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    elif node == F.OPAQUE:
        ok = True
    elif isinstance(node, str) and node.startswith("core/v1 "):
        core.append((path, node, value))
        ok = True
    else:
        raise AssertionError(f"unknown node {node!r} in kuberay_v1_6_fields")
    return [] if ok else [f"{path}: {value!r} is not a {node}"]


@pytest.mark.parametrize("label,doc", ray_docs(), ids=[label for label, _ in ray_docs()])
def test_kuberay_documents_follow_v1_6_fields(label: str, doc: dict[str, Any]) -> None:
    core: list[tuple[str, str, Any]] = []
    problems = check_fields(doc, F.KINDS[doc["kind"]], doc["kind"], core)
    assert not problems, f"{label}:\n" + "\n".join(problems)
    assert core, "expected embedded core/v1 values (pod templates) to validate"
    for path, tag, value in core:
        try:
            kubernetes_validate.validate(_wrap_core(tag, value), KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{label}: {path} is not a valid {tag}: {where}: {e.message}")


@pytest.mark.parametrize(
    "kind,mutate,expected",
    [
        (
            "RayJob",
            lambda d: d["spec"].__setitem__("rayClusterSpce", d["spec"].pop("rayClusterSpec")),
            "rayClusterSpce",
        ),
        (
            "RayCluster",
            lambda d: d["spec"].__setitem__("workerGroupSpec", d["spec"].pop("workerGroupSpecs")),
            "workerGroupSpec",
        ),
        ("RayCronJob", lambda d: d["spec"].__setitem__("timeZone", "Europe/Paris"), "timeZone"),
        ("RayCronJob", lambda d: d["spec"].pop("schedule"), "schedule: required"),
        ("RayJob", lambda d: d["spec"].__setitem__("schedule", "0 3 * * *"), "spec.schedule"),
        (
            "RayCluster",
            lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
            "rayStartParams",
        ),
        ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("maxReplica", 3), "maxReplica"),
    ],
)
def test_field_check_rejects_typos(kind: str, mutate: Any, expected: str) -> None:
    doc = copy.deepcopy(docs_of_kind(kind)[0])
    mutate(doc)
    problems = check_fields(doc, F.KINDS[kind], kind)
    assert any(expected in p for p in problems), problems


def test_core_validation_rejects_a_bad_pod_template() -> None:
    template = copy.deepcopy(cluster_spec(docs_of_kind("RayCluster")[0])["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["imagePulPolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_wrap_core(F.POD_TEMPLATE, template), KUBE_VERSION, strict=True)


def test_jobs_create_the_same_cluster_as_raycluster_yaml() -> None:
    # One cluster shape to maintain: RayJob and RayCronJob embed raycluster.yaml's spec verbatim.
    reference = docs_of_kind("RayCluster")[0]["spec"]
    for kind in ("RayJob", "RayCronJob"):
        for doc in docs_of_kind(kind):
            assert cluster_spec(doc) == reference, (
                f"{kind} {doc['metadata']['name']} drifted from raycluster.yaml"
            )


def test_cluster_shape() -> None:
    spec = docs_of_kind("RayCluster")[0]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), "the head is a CPU node"
    (gpu_group,) = spec["workerGroupSpecs"]
    assert 0 <= gpu_group["minReplicas"] < gpu_group["maxReplicas"]
    worker = gpu_group["template"]["spec"]["containers"][0]
    for part in ("requests", "limits"):
        assert str(worker["resources"][part]["nvidia.com/gpu"]) == "1"


# --------------------------------------------------------------------------- token auth + secrets


def _secrets() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("stringData", {}) for d in docs_of_kind("Secret")}


def _ray_containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = cluster_spec(doc)
    for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        yield f"head/{c['name']}", c
    for group in spec.get("workerGroupSpecs", []):
        for c in group["template"]["spec"]["containers"]:
            yield f"worker {group['groupName']}/{c['name']}", c
    job = job_spec(doc)
    if job is not None:
        # K8sJobMode (the default) runs `ray job submit` in this pod: it needs the token too.
        assert job.get("submissionMode", "K8sJobMode") == "K8sJobMode"
        assert "submitterPodTemplate" in job, "the submitter pod needs RAY_AUTH_* env"
        for c in job["submitterPodTemplate"]["spec"]["containers"]:
            yield f"submitter/{c['name']}", c
    autoscaler = spec.get("autoscalerOptions")
    if spec.get("enableInTreeAutoscaling"):
        assert autoscaler is not None, "the autoscaler sidecar needs RAY_AUTH_* env"
        yield "autoscaler", autoscaler


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("label,doc", ray_docs(), ids=[label for label, _ in ray_docs()])
def test_token_auth_is_on_everywhere(label: str, doc: dict[str, Any]) -> None:
    spec = cluster_spec(doc)
    assert spec.get("authOptions") == {"mode": "token", "secretName": TOKEN_SECRET}, label
    assert TOKEN_KEY in _secrets()[TOKEN_SECRET]
    seen = 0
    for where, container in _ray_containers(doc):
        env = _env(container)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{label} {where}: RAY_AUTH_MODE"
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        assert ref == {"name": TOKEN_SECRET, "key": TOKEN_KEY}, (
            f"{label} {where}: RAY_AUTH_TOKEN from the Secret"
        )
        if where != "autoscaler":
            value = env.get("AWS_REQUEST_CHECKSUM_CALCULATION", {}).get("value")
            assert value == "when_required", f"{label} {where}: AWS_REQUEST_CHECKSUM_CALCULATION"
        seen += 1
    assert seen >= 3, f"{label}: expected head, worker and autoscaler containers at least"


@pytest.mark.parametrize("label,doc", ray_docs(), ids=[label for label, _ in ray_docs()])
def test_s3_credentials_come_from_irsa_or_secret(label: str, doc: dict[str, Any]) -> None:
    spec = cluster_spec(doc)
    account = docs_of_kind("ServiceAccount")[0]
    assert account["metadata"]["name"] == SERVICE_ACCOUNT
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        assert template["spec"]["serviceAccountName"] == SERVICE_ACCOUNT
        for c in template["spec"]["containers"]:
            refs = [e["secretRef"] for e in c.get("envFrom", []) if "secretRef" in e]
            assert {"name": "nrm-ood-s3-credentials", "optional": True} in refs, (
                f"{label} {c['name']}: static keys from the Secret, optional so IRSA clusters work"
            )
    assert "nrm-ood-s3-credentials" in _secrets()


def test_example_secrets_hold_only_placeholders() -> None:
    for name, data in _secrets().items():
        for key, value in data.items():
            if re.search(r"TOKEN|SECRET|KEY", key, re.IGNORECASE):
                assert "REPLACE_ME" in value, f"Secret {name}.{key} must be an obvious placeholder"


def test_cluster_launcher_config_follows_rays_schema() -> None:
    # The `ray up` config schema ships inside the pinned ray wheel (ray/autoscaler/ray-schema.json).
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin is not None, "ray is a dependency of the project"
    schema = json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())
    (cfg,) = load_docs(INFRA / "aws" / "cluster.yaml")
    jsonschema.validate(cfg, schema)
    typo = {**cfg, "max_worker": 3}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)


def test_cluster_launcher_enables_token_auth() -> None:
    (cfg,) = load_docs(INFRA / "aws" / "cluster.yaml")
    run_options = cfg["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in run_options
    assert "--env AWS_REQUEST_CHECKSUM_CALCULATION=when_required" in run_options
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), key
    gpu = cfg["available_node_types"]["ray.worker.gpu"]
    assert gpu["node_config"]["InstanceType"].startswith("g5.")
    assert 0 <= gpu["min_workers"] < gpu["max_workers"] <= cfg["max_workers"]
    head = cfg["available_node_types"][cfg["head_node_type"]]
    for node in (head, gpu):
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


# --------------------------------------------------------------------------- IAM policy


def _policy() -> dict[str, Any]:
    return json.loads((INFRA / "aws" / "iam-policy.json").read_text())


def _as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


def test_iam_policy_is_least_privilege() -> None:
    policy = _policy()
    assert policy["Version"] == "2012-10-17"
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        assert "NotAction" not in st and "NotResource" not in st
        for action in _as_list(st["Action"]):
            assert action.startswith("s3:") and "*" not in action, f"{st.get('Sid')}: {action}"
        for resource in _as_list(st["Resource"]):
            assert resource != "*" and resource.startswith("arn:aws:s3:::"), resource
            bucket = resource.removeprefix("arn:aws:s3:::").split("/", 1)[0]
            assert bucket and "*" not in bucket, f"{st.get('Sid')}: wildcard bucket in {resource}"
        if "s3:ListBucket" in _as_list(st["Action"]):
            assert st["Condition"]["StringLike"]["s3:prefix"], "ListBucket must be limited to prefixes"
    writes = [
        r
        for st in policy["Statement"]
        if "s3:PutObject" in _as_list(st["Action"])
        for r in _as_list(st["Resource"])
    ]
    assert writes == ["arn:aws:s3:::my-datasets/nrm-ood-scores/*"], "writes only under the output prefix"
    deletes = [r for st in policy["Statement"] if "s3:DeleteObject" in _as_list(st["Action"])
               for r in _as_list(st["Resource"])]
    assert deletes == ["arn:aws:s3:::my-datasets/nrm-ood-scores/*"], "deletes only the job's own unused attempts"
    actions = {a for st in policy["Statement"] for a in _as_list(st["Action"])}
    assert not actions & {"s3:DeleteBucket", "s3:PutBucketPolicy", "s3:PutObjectAcl"}


def _allows(action: str, bucket: str, key: str) -> bool:
    """Whether the policy allows ``action`` on an object under s3://bucket/key (a prefix)."""
    for st in _policy()["Statement"]:
        if action not in _as_list(st["Action"]):
            continue
        for resource in _as_list(st["Resource"]):
            if action == "s3:ListBucket":
                prefixes = _as_list(st.get("Condition", {}).get("StringLike", {}).get("s3:prefix", []))
                if resource == f"arn:aws:s3:::{bucket}" and any(
                    fnmatch.fnmatchcase(key + "part-0.parquet", p) for p in prefixes
                ):
                    return True
            elif fnmatch.fnmatchcase(f"arn:aws:s3:::{bucket}/{key}part-0.parquet", resource):
                return True
    return False


def _s3_options() -> list[tuple[str, str, str]]:
    """(source, option, s3 uri) for every s3:// value of an `nrm-ood score` call in infra/."""
    out = []
    for source, args in cli_calls():
        if args[:1] != ["score"]:
            continue
        for opt, value in zip(args, args[1:], strict=False):
            if opt in {"--model", "--input", "--output"} and value.startswith("s3://"):
                out.append((source, opt, value))
    return out


def test_iam_policy_covers_every_s3_location_used() -> None:
    uses = _s3_options()
    assert {opt for _, opt, _ in uses} == {"--model", "--input", "--output"}
    for source, opt, uri in uses:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        key = key if key.endswith("/") or not key else key + "/"
        needed = ["s3:GetObject", "s3:ListBucket"] + (["s3:PutObject"] if opt == "--output" else [])
        for action in needed:
            assert _allows(action, bucket, key), f"{source}: {opt} {uri} needs {action} in iam-policy.json"
        if opt != "--output":
            assert not _allows("s3:PutObject", bucket, key), f"{source}: {opt} {uri} must stay read-only"


# --------------------------------------------------------------------------- image pins


def _pyproject_requirements() -> dict[str, Requirement]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in data["project"]["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


PIN = re.compile(r"""["']?\b([A-Za-z0-9][A-Za-z0-9._-]*)(\[[A-Za-z0-9_,-]+\])?==([0-9][^\s"'\\]*)""")


def _pins(dockerfile: Path) -> dict[str, tuple[set[str], Version]]:
    pins = {}
    for name, extras, version in PIN.findall(dockerfile.read_text()):
        pins[canonicalize_name(name)] = (set(filter(None, extras.strip("[]").split(","))), Version(version))
    return pins


DOCKERFILES = [INFRA / "docker" / "Dockerfile", INFRA / "docker" / "Dockerfile.cpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_every_dependency_inside_pyproject_ranges(dockerfile: Path) -> None:
    # The image installs the project with --no-deps, so every runtime dependency must be pinned.
    pins = _pins(dockerfile)
    for name, req in _pyproject_requirements().items():
        assert name in pins, f"{dockerfile.name}: {name} is a dependency in pyproject.toml but not pinned"
        extras, version = pins[name]
        assert req.specifier.contains(version, prereleases=True), (
            f"{dockerfile.name}: {name}=={version} is outside pyproject's {req.specifier}"
        )
        assert set(req.extras) <= extras, f"{dockerfile.name}: {name} needs extras {sorted(req.extras)}"
    assert "--no-deps ." in dockerfile.read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_ray_versions_agree(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    ray_spec = _pyproject_requirements()["ray"].specifier
    (arg,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", text, re.MULTILINE)
    (base,) = re.findall(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-(cpu|gpu)$", text, re.MULTILINE)
    assert base == ("cpu" if dockerfile.name.endswith(".cpu") else "gpu")
    pinned = _pins(dockerfile)["ray"][1]
    assert Version(arg) == pinned and ray_spec.contains(pinned), (arg, pinned, ray_spec)
    for _, doc in ray_docs():
        assert Version(cluster_spec(doc)["rayVersion"]) == pinned, "KubeRay rayVersion must match the image"
    assert re.search(r"^USER ray$", text, re.MULTILINE), "images run as the non-root user `ray`"


def test_cpu_image_takes_torch_from_the_cpu_index() -> None:
    text = (INFRA / "docker" / "Dockerfile.cpu").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert str(_pins(INFRA / "docker" / "Dockerfile.cpu")["torch"][1]).endswith("+cpu")


def test_cpu_image_has_the_cpp_compiler_torch_compile_needs_and_runs_as_ray() -> None:
    # Ray's CPU image removes g++; `score --compile` on a CPU builds inductor's C++ kernels with it
    text = (INFRA / "docker" / "Dockerfile.cpu").read_text()
    assert re.search(r"apt-get install -y --no-install-recommends g\+\+", text)
    assert re.findall(r"^USER (\S+)$", text, re.MULTILINE)[-1] == "ray"


# --------------------------------------------------------------------------- nrm-ood calls


# Tokens after which a shell word is in command position.
COMMAND_STARTERS = {";", "&&", "||", "|", "&", "(", "{", "!", "--", "then", "do", "exec", "time"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SHELL_PUNCTUATION = re.compile(r"^[();<>|&]+$")


def cli_invocations(text: str) -> list[list[str]]:
    """Arguments of every `nrm-ood ...` command in a shell-like ``text`` (one list per call).

    `nrm-ood` counts only in command position: at the start of a command, after `;`, `&&`,
    `|`, `--` (as in `ray job submit ... -- nrm-ood score`) or env assignments, so that names
    such as the namespace in `kubectl -n nrm-ood` or image tags are not taken for calls.
    Arguments stop at the next shell operator or redirection.
    """
    calls = []
    text = re.sub(r"\\\n", " ", text)  # join backslash-continued lines
    for line in text.splitlines():
        if CLI not in line:
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        at_start, current = True, None
        for tok in tokens:
            if current is not None:
                if tok in COMMAND_STARTERS - {"--"} or SHELL_PUNCTUATION.match(tok):
                    calls.append(current)
                    current, at_start = None, tok in COMMAND_STARTERS
                else:
                    current.append(tok)
                continue
            if tok in COMMAND_STARTERS:
                at_start = True
            elif at_start and ASSIGNMENT.match(tok):
                continue
            elif at_start and (tok == CLI or tok.endswith("/" + CLI)):
                current = []
            else:
                at_start = False
        if current is not None:
            calls.append(current)
    return calls


def _markdown_shell(text: str) -> str:
    """Fenced code blocks and inline code spans of a Markdown file, one per line."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    without_blocks = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    # Inline spans with arguments only: a bare `nrm-ood` in prose names the tool, not a call.
    spans = [s for s in re.findall(r"`([^`\n]+)`", without_blocks) if " " in s.strip()]
    return "\n".join(blocks + spans)


def _yaml_commands(value: Any, key: str = "") -> Iterator[str]:
    """Command strings in a YAML tree: `entrypoint`, `command`/`args` and `*_commands` values."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _yaml_commands(v, str(k))
    elif isinstance(value, list):
        if key in {"command", "args"} and all(isinstance(v, str) for v in value):
            yield shlex.join(value)
        else:
            for v in value:
                yield from _yaml_commands(v, key)
    elif isinstance(value, str) and (key == "entrypoint" or key.endswith("_commands")):
        yield value


def cli_calls() -> list[tuple[str, list[str]]]:
    """(source, args) for every `nrm-ood` call written in infra/ (manifests, README, Dockerfiles)."""
    out = []
    for path in yaml_files():
        for doc in load_docs(path):
            for command in _yaml_commands(doc):
                out += [(path.name, args) for args in cli_invocations(command)]
    readme = INFRA / "README.md"
    out += [(readme.name, args) for args in cli_invocations(_markdown_shell(readme.read_text()))]
    for dockerfile in DOCKERFILES:
        out += [(dockerfile.name, args) for args in cli_invocations(dockerfile.read_text())]
    return out


CliSpec = tuple[set[str], dict[str, set[str]]]


def cli_spec(app: Any) -> CliSpec:
    """(top-level options, {command: option strings}) of a Typer app, from its click command."""
    import typer

    # Duck-typed on purpose: recent Typer versions ship their own copy of click's classes.
    group = typer.main.get_command(app)
    assert hasattr(group, "commands"), "expected a Typer app with several commands"

    def options(cmd: Any) -> set[str]:
        opts = {"--help"}
        for p in cmd.params:
            if p.param_type_name == "option":
                opts |= set(p.opts) | set(p.secondary_opts)
        return opts

    return options(group), {name: options(cmd) for name, cmd in group.commands.items()}


def check_call(args: list[str], spec: CliSpec) -> list[str]:
    """Why ``nrm-ood <args>`` would be rejected by the CLI described by ``spec`` (empty: fine)."""
    top, commands = spec
    if not args:
        return ["no command given"]
    name = args[0]
    if name.startswith("-"):
        return [] if name in top else [f"unknown top-level option {name}"]
    if name not in commands:
        return [f"unknown command {name!r} (commands: {', '.join(sorted(commands))})"]
    problems = []
    for arg in args[1:]:
        option = arg.split("=", 1)[0]
        if re.match(r"^--[A-Za-z]|^-[A-Za-z]$", option) and option not in commands[name]:
            problems.append(f"{name}: unknown option {option} (options: {', '.join(sorted(commands[name]))})")
    return problems


def _stand_in_app() -> Any:
    """A tiny Typer app with the real CLI's shape, to test the checker without jobs.cli."""
    import typer

    app = typer.Typer()

    @app.command()
    def score(
        model: str = typer.Option(..., "--model"),
        actors: int = typer.Option(1, "--actors"),
        incremental: bool = typer.Option(False, "--incremental"),
    ) -> None:
        """Score."""

    @app.command()
    def runs(output: str) -> None:
        """List runs."""

    return app


def test_tokenizer_finds_calls_in_command_position_only() -> None:
    text = (
        "kubectl -n nrm-ood get pods\n"
        "docker build -t registry.example.com/nrm-ood:0.1.0 . && nrm-ood --help > /dev/null\n"
        "ray job submit --address http://h:8265 --working-dir . \\\n"
        "    -- nrm-ood score --model s3://m/ --actors 4 && echo done\n"
        "AWS_PROFILE=x /usr/local/bin/nrm-ood runs 's3://b/out put/'\n"
    )
    assert cli_invocations(text) == [
        ["--help"],
        ["score", "--model", "s3://m/", "--actors", "4"],
        ["runs", "s3://b/out put/"],
    ]


def test_checker_rejects_wrong_options_and_commands() -> None:
    spec = cli_spec(_stand_in_app())
    (ok,) = cli_invocations("nrm-ood score --model s3://m/ --actors 4 --incremental")
    assert check_call(ok, spec) == []
    (typo,) = cli_invocations("nrm-ood score --model s3://m/ --actorz 4")
    assert any("--actorz" in p for p in check_call(typo, spec))
    assert check_call(["scroe", "--model", "x"], spec)
    assert check_call(["runs", "--model", "x"], spec), "options are checked per command"


def test_infra_calls_exist_in_the_cli() -> None:
    # Fails with ImportError until jobs/cli.py exists; that is intended.
    from jobs.cli import app

    spec = cli_spec(app)
    assert {"score", "runs"} <= set(spec[1]), "the commands infra/ relies on"
    calls = cli_calls()
    assert calls, "no nrm-ood calls found in infra/"
    problems = [
        f"{source}: nrm-ood {shlex.join(args)}: {p}" for source, args in calls for p in check_call(args, spec)
    ]
    assert not problems, "\n".join(problems)
    assert check_call(["score", "--actorz", "4"], spec), "the real CLI must reject a misspelt option"


def test_calls_cover_the_documented_runs() -> None:
    calls = cli_calls()
    sources = {source for source, _ in calls}
    assert {"rayjob-score.yaml", "raycronjob-audit.yaml", "README.md"} <= sources
    cron = [args for source, args in calls if source == "raycronjob-audit.yaml"]
    (score,) = [args for args in cron if args[0] == "score"]
    (audit,) = [args for args in cron if args[0] == "audit"]
    assert "--incremental" in score, "the nightly run scores only new images"
    assert audit[1] == score[score.index("--output") + 1], "the audit reads the runs the nightly score commits"
    assert "--max-flagged" in audit and "--max-drift" in audit
    (job,) = [args for source, args in calls if source == "rayjob-score.yaml"]
    for option, value in {"--actors": None, "--gpus-per-actor": "1", "--batch-size": "512"}.items():
        assert option in job and (value is None or job[job.index(option) + 1] == value), option
    # The GPU group scales from zero: without --address the job's up-front resource check would
    # find no GPU and stop before the autoscaler could add one.
    assert min(g["minReplicas"] for g in docs_of_kind("RayCluster")[0]["spec"]["workerGroupSpecs"]) == 0
    for args in [job, score]:
        assert args[args.index("--address") + 1] == "auto"
