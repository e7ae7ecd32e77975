"""Hand-written field list of the KubeRay v1.6.0 custom resources used in infra/kuberay/.

Not the whole CRD: the object levels the manifests use, with every field of those levels that
KubeRay v1.6.0 accepts (so a misspelt key such as ``rayClusterSpce`` or ``workerGroupSpec`` is
caught, while a legitimate optional field is not rejected). Leaves that are plain Kubernetes
types (pod templates, env lists, resource requirements, object metadata) are tagged ``core/v1
...``; the test validates those with ``kubernetes_validate`` instead of repeating their schema.

Read via the search tool in ray-project/kuberay (API group ray.io, version v1):
  * ray-operator/config/crd/bases/ray.io_raycronjobs.yaml and
    helm-chart/kuberay-operator/crds/ray.io_raycronjobs.yaml: RayCronJob ``spec`` = {schedule,
    jobTemplate, suspend}, ``required: [jobTemplate, schedule]``; ``jobTemplate`` embeds the whole
    RayJobSpec and through it the RayClusterSpec (authOptions, autoscalerOptions,
    gcsFaultToleranceOptions, headGroupSpec, workerGroupSpecs ``required: [groupName,
    maxReplicas, minReplicas, template]``, RayClusterSpec ``required: [headGroupSpec]``);
  * ray-operator/apis/ray/v1/{raycluster,rayjob,raycronjob}_types.go for the Go field tags;
  * the v1.6.0 release notes (github.com/ray-project/kuberay/releases/tag/v1.6.0): RayCronJob
    (alpha, feature gate RayCronJob), authOptions.secretName, RayJob preRunningDeadlineSeconds,
    RayCluster upgradeStrategy, RayJob deletionStrategy.deletionRules.
Fields added after v1.6.0 are deliberately absent, e.g. RayCronJob ``spec.timeZone`` (kuberay
PR #4762, April 2026). RayJob has no ``schedule`` field: the 2025 attempt (PR #3836) was reverted
in favour of RayCronJob.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Obj:
    """An object level: its allowed keys and, among them, the required ones."""

    fields: Mapping[str, Node]
    required: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class ListOf:
    """An array whose items all follow ``item``."""

    item: Node


@dataclass(frozen=True)
class OneOf:
    """A string restricted to the CRD's ``enum``."""

    values: tuple[str, ...]


# Leaf tags. Scalars are type-checked; "map" is a string-to-string map with free keys (the
# CRD's additionalProperties: {type: string}); "opaque" is accepted as is; "core/v1 X" values are
# validated as the Kubernetes type X by the test.
STRING = "string"
INTEGER = "integer"
NUMBER = "number"
BOOLEAN = "boolean"
STRING_MAP = "map"
OPAQUE = "opaque"
POD_TEMPLATE = "core/v1 PodTemplateSpec"
OBJECT_META = "core/v1 ObjectMeta"
ENV_VARS = "core/v1 EnvVar[]"
ENV_FROM = "core/v1 EnvFromSource[]"
RESOURCES = "core/v1 ResourceRequirements"
SECURITY_CONTEXT = "core/v1 SecurityContext"
VOLUME_MOUNTS = "core/v1 VolumeMount[]"
SERVICE = "core/v1 Service"

Node = Obj | ListOf | OneOf | str

AUTH_OPTIONS = Obj(
    {
        "mode": OneOf(("disabled", "token")),
        "secretName": STRING,  # new in v1.6.0: a Secret with key auth_token
        "enableK8sTokenAuth": BOOLEAN,  # v1.6.0, RayCluster only
    }
)

AUTOSCALER_OPTIONS = Obj(
    {
        "resources": RESOURCES,
        "image": STRING,
        "imagePullPolicy": STRING,
        "securityContext": SECURITY_CONTEXT,
        "idleTimeoutSeconds": INTEGER,
        "upscalingMode": OneOf(("Default", "Aggressive", "Conservative")),
        "version": OneOf(("v1", "v2")),
        "env": ENV_VARS,
        "envFrom": ENV_FROM,
        "volumeMounts": VOLUME_MOUNTS,
    }
)

HEAD_GROUP_SPEC = Obj(
    {
        "template": POD_TEMPLATE,
        "headService": SERVICE,
        "enableIngress": BOOLEAN,
        "rayStartParams": STRING_MAP,  # values must be strings: num-cpus: "0", not 0
        "serviceType": STRING,
        "labels": STRING_MAP,  # top-level Ray labels/resources, since v1.5
        "resources": STRING_MAP,
    },
    required=frozenset({"template"}),
)

WORKER_GROUP_SPEC = Obj(
    {
        "suspend": BOOLEAN,
        "groupName": STRING,
        "replicas": INTEGER,
        "minReplicas": INTEGER,
        "maxReplicas": INTEGER,
        "idleTimeoutSeconds": INTEGER,
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
        "scaleStrategy": Obj({"workersToDelete": ListOf(STRING)}),
        "numOfHosts": INTEGER,
        "labels": STRING_MAP,
        "resources": STRING_MAP,
    },
    required=frozenset({"groupName", "minReplicas", "maxReplicas", "template"}),
)

RAY_CLUSTER_SPEC = Obj(
    {
        "suspend": BOOLEAN,
        "managedBy": OneOf(("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")),
        "authOptions": AUTH_OPTIONS,
        "autoscalerOptions": AUTOSCALER_OPTIONS,
        "headServiceAnnotations": STRING_MAP,
        "enableInTreeAutoscaling": BOOLEAN,
        "gcsFaultToleranceOptions": OPAQUE,
        "headGroupSpec": HEAD_GROUP_SPEC,
        "rayVersion": STRING,
        "upgradeStrategy": Obj({"type": OneOf(("Recreate", "None"))}),
        "workerGroupSpecs": ListOf(WORKER_GROUP_SPEC),
    },
    required=frozenset({"headGroupSpec"}),
)

RAY_JOB_SPEC = Obj(
    {
        "activeDeadlineSeconds": INTEGER,
        "backoffLimit": INTEGER,
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "submitterPodTemplate": POD_TEMPLATE,
        "metadata": STRING_MAP,  # job metadata passed to Ray, not ObjectMeta
        "clusterSelector": STRING_MAP,
        "submitterConfig": Obj({"backoffLimit": INTEGER}),
        "managedBy": OneOf(("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")),
        "deletionStrategy": OPAQUE,
        "entrypoint": STRING,
        "runtimeEnvYAML": STRING,
        "jobId": STRING,
        "submissionMode": OneOf(("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")),
        "entrypointResources": STRING,
        "entrypointNumCpus": NUMBER,
        "entrypointNumGpus": NUMBER,
        "ttlSecondsAfterFinished": INTEGER,
        "preRunningDeadlineSeconds": INTEGER,  # new in v1.6.0
        "shutdownAfterJobFinishes": BOOLEAN,
        "suspend": BOOLEAN,
    }
)

RAY_CRON_JOB_SPEC = Obj(
    {
        "schedule": STRING,
        "jobTemplate": RAY_JOB_SPEC,  # a RayJobSpec directly, no nested `spec:`
        "suspend": BOOLEAN,
    },
    required=frozenset({"schedule", "jobTemplate"}),
)


def _resource(spec: Obj) -> Obj:
    return Obj(
        {"apiVersion": STRING, "kind": STRING, "metadata": OBJECT_META, "spec": spec},
        required=frozenset({"apiVersion", "kind", "metadata", "spec"}),
    )


API_VERSION = "ray.io/v1"

# kind -> schema of the whole document.
KINDS: Mapping[str, Obj] = {
    "RayCluster": _resource(RAY_CLUSTER_SPEC),
    "RayJob": _resource(RAY_JOB_SPEC),
    "RayCronJob": _resource(RAY_CRON_JOB_SPEC),
}
