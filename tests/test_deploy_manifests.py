"""deploy/ manifests: custom resources against the CRD schemas in ../shared/schemas, core
objects against Kubernetes' own schemas (kubernetes-validate)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from driver.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SCHEMAS = ROOT.parent / "shared" / "schemas"
CRDS = {
    ("ray.io", "RayCluster"): "kuberay/ray.io_rayclusters.yaml",
    ("ray.io", "RayJob"): "kuberay/ray.io_rayjobs.yaml",
    (
        "monitoring.coreos.com",
        "PodMonitor",
    ): "prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
    (
        "monitoring.coreos.com",
        "ServiceMonitor",
    ): "prometheus-operator/monitoring.coreos.com_servicemonitors.yaml",
}
K8S_VERSION = "1.30"


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                out.append((f"{path.name}#{i}", doc))
    return out


DOCS = _docs()
CUSTOM = [(n, d) for n, d in DOCS if (d["apiVersion"].split("/")[0], d["kind"]) in CRDS]
CORE = [(n, d) for n, d in DOCS if (n, d) not in CUSTOM]


def test_the_manifests_an_operator_needs_exist():
    kinds = {d["kind"] for _, d in DOCS}
    assert {"RayCluster", "RayJob", "PodMonitor", "Service"} <= kinds


def _crd_schema(doc: dict) -> dict:
    group, version = doc["apiVersion"].split("/")
    path = SCHEMAS / CRDS[(group, doc["kind"])]
    if not path.is_file():
        pytest.skip(
            f"CRD schemas not found at {path} (they live beside the project in "
            "../shared/schemas, absent on a user's clone)"
        )
    crd = yaml.safe_load(path.read_text())
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{doc['kind']} {version} is not served by the CRD ({list(served)})"
    return served[version]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("name, doc", CUSTOM, ids=[n for n, _ in CUSTOM])
def test_custom_resources_validate_against_their_crd(name, doc):
    schema = _crd_schema(doc)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
    assert not errors, f"{name}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
    )


def test_the_crd_validation_catches_a_broken_manifest():
    doc = next(d for _, d in CUSTOM if d["kind"] == "RayJob")
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["shutdownAfterJobFinishes"] = "yes please"  # must be a boolean
    assert list(jsonschema.Draft7Validator(_crd_schema(broken)).iter_errors(broken))


def _configmap() -> dict:
    """The ConfigMap deploy/kustomization.yaml's generator makes from deploy/configs."""
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    gen = kust["configMapGenerator"][0]
    data = {Path(f).name: (DEPLOY / f).read_text() for f in gen["files"]}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": gen["name"]},
        "data": data,
    }


@pytest.mark.parametrize(
    "name, doc",
    [*CORE, ("kustomize ConfigMap", _configmap())],
    ids=[n for n, _ in CORE] + ["configmap"],
)
def test_core_objects_validate_against_kubernetes(name, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_real_files_and_the_rayjob_uses_a_listed_config():
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (DEPLOY / res).is_file(), res
    files = {Path(f).name for f in kust["configMapGenerator"][0]["files"]}
    job = next(d for _, d in DOCS if d["kind"] == "RayJob")
    used = job["spec"]["entrypoint"].split("--config ")[1].split()[0]
    assert Path(used).name in files and used.startswith("/config/")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_the_served_api_speaks_tls_with_the_secrets_the_head_mounts():
    """service.toml's certificate, key and token file are the files of Secrets the `reclra
    serve` container mounts whole (a subPath mount would never see a rotated token)."""
    cluster = next(d for _, d in DOCS if d["kind"] == "RayCluster")
    pod = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    serve = next(c for c in pod["containers"] if c.get("command", [])[:2] == ["reclra", "serve"])
    config = serve["command"][serve["command"].index("--config") + 1]
    assert not any(e["name"] == "RECLRA_TOKEN" for e in serve.get("env", []))
    cfg = load_config(DEPLOY / "configs" / Path(config).name).service
    assert cfg.addr == "0.0.0.0" and cfg.tls and not cfg.allow_insecure and not cfg.token
    volumes = {v["name"]: v for v in pod["volumes"]}

    def secret_file(path: str) -> tuple[str, str]:
        mount = next(m for m in serve["volumeMounts"] if Path(path).parent == Path(m["mountPath"]))
        assert "subPath" not in mount and mount.get("readOnly") is True, mount
        return volumes[mount["name"]]["secret"]["secretName"], Path(path).name

    assert secret_file(cfg.tls_cert) == ("reclra-tls", "tls.crt")  # a kubernetes.io/tls Secret
    assert secret_file(cfg.tls_key) == ("reclra-tls", "tls.key")
    assert secret_file(cfg.token_file) == ("reclra-service-token", "token")
    assert "grpc" not in serve["readinessProbe"]  # the kubelet's gRPC probe cannot speak TLS


def _kustomized() -> list[dict]:
    """The objects `kubectl apply -k deploy/` creates from files (the generators aside)."""
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    return [d for res in kust["resources"] for d in yaml.safe_load_all((DEPLOY / res).read_text())]


def _claims(node: object) -> set[str]:
    """Every persistentVolumeClaim.claimName under a manifest."""
    if isinstance(node, dict):
        found = {node["claimName"]} if "claimName" in node else set()
        return found.union(*(_claims(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_claims(v) for v in node))
    return set()


def test_every_volume_claim_a_manifest_mounts_is_defined_by_the_kustomization():
    defined = {d["metadata"]["name"] for d in _kustomized() if d["kind"] == "PersistentVolumeClaim"}
    used = set().union(*(_claims(d) for _, d in DOCS))
    assert {"reclra-runs", "reclra-data"} <= used
    assert used <= defined, f"claims no manifest defines: {sorted(used - defined)}"


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def _bytes(quantity: str) -> int:
    for unit, factor in _UNITS.items():
        if quantity.endswith(unit):
            return int(float(quantity[: -len(unit)]) * factor)
    return int(quantity)


def _ray_groups() -> list[tuple[str, dict]]:
    """(name, group spec) of every Ray head and worker group, in RayClusters and RayJobs."""
    out = []
    for name, doc in CUSTOM:
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec")
        if spec is None:
            continue
        out.append((f"{name} head", spec["headGroupSpec"]))
        out += [(f"{name} {g['groupName']}", g) for g in spec.get("workerGroupSpecs", [])]
    return out


@pytest.mark.parametrize("name, group", _ray_groups(), ids=[n for n, _ in _ray_groups()])
def test_ray_pods_hold_their_object_store_in_a_memory_backed_dev_shm(name, group):
    """A container's /dev/shm is 64 MiB unless a volume replaces it: Ray's object store would
    fall back to disk. Each Ray container mounts a medium: Memory emptyDir there, sized for the
    object store it is given (with room to spare) and within the container's memory limit."""
    pod = group["template"]["spec"]
    store = _bytes(group["rayStartParams"]["object-store-memory"])
    assert store >= 2**30, "an explicit object store of at least 1 GiB"
    ray = pod["containers"][0]  # KubeRay runs `ray start` in the first container
    mount = next(m for m in ray.get("volumeMounts", []) if m["mountPath"] == "/dev/shm")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    shm = volume["emptyDir"]
    assert shm["medium"] == "Memory"
    size = _bytes(shm["sizeLimit"])
    assert store < size <= 1.5 * store
    # the shared memory counts against the pod's memory: the processes keep at least half
    assert size <= 0.5 * _bytes(ray["resources"]["limits"]["memory"])


def _max_stages() -> int:
    return max(load_config(p).pipeline.stages for p in (DEPLOY / "configs").glob("*.toml"))


def test_the_long_lived_cluster_autoscales_its_gpu_workers():
    cluster = next(d for _, d in DOCS if d["kind"] == "RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    opts = spec["autoscalerOptions"]
    assert opts["version"] == "v2"  # what cluster/placement.py's cluster_can_grow reads
    assert opts["upscalingMode"] == "Default" and 60 <= opts["idleTimeoutSeconds"] <= 3600
    head_env = {
        e["name"]: e for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    }
    env = {e["name"]: e for e in opts["env"]}
    assert env["RAY_AUTH_TOKEN"] == head_env["RAY_AUTH_TOKEN"]  # same Secret: it can reach GCS
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    for group in spec["workerGroupSpecs"]:
        low, start, high = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert 0 <= low <= start <= high and low < high, group["groupName"]
        gpus = int(
            group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        )
        assert high * gpus >= _max_stages()  # the largest example config fits, one GPU a stage


def test_the_rayjob_cluster_is_fixed_at_its_configs_stage_count():
    job = next(d for _, d in DOCS if d["kind"] == "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    assert not spec.get("enableInTreeAutoscaling", False)
    config = job["spec"]["entrypoint"].split("--config ")[1].split()[0]
    cfg = load_config(DEPLOY / "configs" / Path(config).name)
    assert not cfg.pipeline.elastic  # a run that never grows: nothing for an autoscaler to do
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == group["replicas"] == group["maxReplicas"] == cfg.pipeline.stages
