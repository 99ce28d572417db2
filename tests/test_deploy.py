"""Offline checks of the deployment files in deploy/: Kubernetes manifests and the BentoCloud config.

Every Kubernetes object is validated against the Kubernetes JSON schemas bundled with `kubernetes-validate` (no
network), strictly (unknown fields are errors), and the kustomization is rendered with `kubectl kustomize` when
kubectl is on PATH (a small Python rendering of the same layout otherwise). The BentoCloud file goes through
BentoML's own deployment schema (the cattrs structuring `bentoml deploy -f` does before sending it), and a round
trip proves that no key was silently dropped. Then the contract: probes, port, GPU, volumes, warm-up budget, HPA.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
BENTOCLOUD = ROOT / "deploy" / "bentocloud" / "deployment.yaml"
K8S_VERSION = "1.33"  # a recent release; kubernetes-validate picks its newest schemas not newer than this
PORT = 3000
READY, LIVE = "/v1/health/ready", "/v1/health/live"
MIN_STARTUP_BUDGET_S = 10 * 60
THIRD_PARTY_ENV = re.compile(r"^(JAX_|XLA_|HF_|BENTOML_|TF_|CUDA_|NVIDIA_)")
# Custom resources (no schema in kubernetes-validate): checked structurally below.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml")
                  if p.name not in ("kustomization.yaml", "prometheus-adapter-values.yaml"))


def rendered() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes` would apply."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    return render_kustomization_in_python()


def render_kustomization_in_python() -> list[dict[str, Any]]:
    """The subset of kustomize this layout uses: resources, labels (not in selectors) and images."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [doc for res in kust["resources"] for doc in load_all(K8S / res)]
    for doc in docs:
        for group in kust.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(group["pairs"])
            if group.get("includeTemplates") and doc["kind"] == "Deployment":
                doc["spec"]["template"]["metadata"].setdefault("labels", {}).update(group["pairs"])
        if kust.get("namespace"):
            doc["metadata"]["namespace"] = kust["namespace"]
        for container in containers(doc):
            for image in kust.get("images", []):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image.get('newTag', 'latest')}"
    return docs


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] in ("Deployment", "Job"):
        return doc["spec"]["template"]["spec"]["containers"]
    return []


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return rendered()


@pytest.fixture(scope="module")
def deployment(docs) -> dict[str, Any]:
    (dep,) = by_kind(docs, "Deployment")
    return dep


@pytest.fixture(scope="module")
def container(deployment) -> dict[str, Any]:
    (c,) = containers(deployment)
    return c


@pytest.fixture
def kubernetes_validate(monkeypatch):
    """The validator, with every network connection refused: its schemas ship inside the package."""
    import socket

    module = pytest.importorskip("kubernetes_validate")

    def refuse(self, address):
        raise OSError(f"offline test: connection to {address} refused")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return module


# ---- schemas ---------------------------------------------------------------------------------------------------------
def test_kubernetes_validate_works_offline_with_bundled_schemas(kubernetes_validate):
    from kubernetes_validate import utils

    assert tuple(map(int, utils.major_minor(utils.latest_version()).split("."))) >= (1, 33)
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "c", "imagePullPolicy": 3}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path, kubernetes_validate):
    objects = load_all(path)
    assert objects, f"{path} holds no object"
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            assert obj["metadata"]["name"] and obj["spec"]
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{path.name}: {obj['kind']}/{obj['metadata']['name']}: {where}: {e.message}")


def test_the_kustomization_renders_and_lists_every_resource(docs, kubernetes_validate):
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "PersistentVolumeClaim",
                     "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "nemotron-embed-vl"


def test_the_python_rendering_agrees_with_kubectl():
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed: the Python rendering is the only one")
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(rendered(), key=key) == sorted(render_kustomization_in_python(), key=key)


# ---- the serving contract --------------------------------------------------------------------------------------------
def test_one_container_one_gpu_port_3000(deployment, container):
    spec = deployment["spec"]["template"]["spec"]
    assert len(spec["containers"]) == 1
    assert container["image"].startswith("nemotron-embed-vl")
    assert container["ports"][0]["containerPort"] == PORT  # the API; the probes' own port follows (test_probes)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert [p["containerPort"] for p in container["ports"][1:]] == [int(env["EMBED_HEALTH_PORT"])]
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 1 and resources["limits"]["nvidia.com/gpu"] == 1
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def probe_port(probe: dict[str, Any], container: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return port


def test_probes(container):
    ready, live, startup = container["readinessProbe"], container["livenessProbe"], container["startupProbe"]
    assert ready["httpGet"]["path"] == READY
    assert live["httpGet"]["path"] == LIVE
    assert startup["httpGet"]["path"] in (READY, LIVE)
    env = {e["name"]: e.get("value") for e in container["env"]}
    for probe in (ready, live, startup):
        # the probes' own port (serving/health_port.py), which the server opens when EMBED_HEALTH_PORT says so
        assert probe_port(probe, container) == int(env["EMBED_HEALTH_PORT"]) != PORT
        assert probe.get("timeoutSeconds", 1) >= 2  # a worker that is still importing answers late
    budget = startup["failureThreshold"] * startup["periodSeconds"] + startup.get("initialDelaySeconds", 0)
    assert budget >= MIN_STARTUP_BUDGET_S, f"the warm-up budget is {budget} s"
    # Liveness must not kill a busy server: at least a minute of failures before a restart.
    assert live["failureThreshold"] * live["periodSeconds"] >= 60


def test_environment(container):
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert env["EMBED_MODEL"].startswith(mounts["weights"]["mountPath"] + "/")
    assert env["EMBED_COMPILATION_CACHE"].startswith(mounts["xla-cache"]["mountPath"])
    assert 0.5 <= float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) <= 0.95


def test_volumes_are_mounted_from_the_claims(docs, deployment, container):
    claims = {d["metadata"]["name"]: d for d in by_kind(docs, "PersistentVolumeClaim")}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert set(mounts) == set(volumes) == {"weights", "xla-cache"}
    for name, volume in volumes.items():
        assert volume["persistentVolumeClaim"]["claimName"] in claims, name
    assert mounts["weights"]["readOnly"] is True  # the serving pods never write the weights
    assert not mounts["xla-cache"].get("readOnly", False)  # the first replica writes the compilation cache
    for claim in claims.values():
        assert claim["spec"]["resources"]["requests"]["storage"]


def test_service_targets_the_pods(docs, deployment):
    (svc,) = by_kind(docs, "Service")
    assert svc["metadata"]["name"] == "nemotron-embed-vl"
    assert svc["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == PORT and port["targetPort"] in (PORT, "http")


def test_hpa_scales_the_deployment_on_the_queue_metric(docs, deployment):
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    spec = hpa["spec"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": deployment["metadata"]["name"]}
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "nim_queue_depth"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300  # GPUs take minutes to come back


def test_the_queue_metric_is_the_one_the_service_exposes():
    """The HPA, the adapter rule and serving/metrics.py name the same gauge."""
    source = (ROOT / "serving" / "metrics.py").read_text()
    assert re.search(r'Gauge\(\s*"nim_queue_depth"', source), "serving/metrics.py no longer defines nim_queue_depth"
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith("nim_queue_depth{")
    assert rule["name"]["as"] == "nim_queue_depth"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # a Pods metric needs both


def test_servicemonitor_scrapes_v1_metrics(docs):
    (sm,) = load_all(K8S / "monitoring" / "servicemonitor.yaml")
    (svc,) = by_kind(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/v1/metrics" and endpoint["port"] == svc["spec"]["ports"][0]["name"]


def test_the_conversion_job_writes_where_the_deployment_reads(deployment, container):
    (job,) = load_all(K8S / "jobs" / "convert-weights.yaml")
    (convert,) = containers(job)
    claim = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]}
    served = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert claim["weights"] == served["weights"]
    mount = {m["name"]: m["mountPath"] for m in convert["volumeMounts"]}["weights"]
    served_mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["weights"]
    out = convert["args"][convert["args"].index("conversion") + 2]
    model = {e["name"]: e["value"] for e in container["env"]}["EMBED_MODEL"]
    assert out.replace(mount, served_mount, 1) == model
    assert (ROOT / "conversion" / "__main__.py").is_file()


# ---- environment variables are ones the code reads -------------------------------------------------------------------
def names_read_by_the_code() -> set[str]:
    from serving.settings import Settings

    names = {f.alias for f in Settings.model_fields.values()}
    for path in [ROOT / "service.py", *ROOT.glob("serving/*.py"), *ROOT.glob("engine/*.py"),
                 *ROOT.glob("model/*.py"), *ROOT.glob("conversion/*.py")]:
        names |= set(re.findall(r'"((?:EMBED|NIM)_[A-Z0-9_]+)"', path.read_text()))
    return names


def all_envs() -> list[tuple[str, str]]:
    k8s = [(p.name, e["name"]) for p in manifest_files() for doc in load_all(p) for c in containers(doc)
           for e in c.get("env", [])]
    cloud = yaml.safe_load(BENTOCLOUD.read_text())
    return k8s + [("bentocloud", e["name"]) for e in cloud.get("envs", [])]


def commented_settings(path: Path) -> set[str]:
    """Settings named in comments (optional knobs shown to the reader): they must exist too."""
    return set(re.findall(r"#.*?\b((?:EMBED|NIM)_[A-Z0-9_]+)", path.read_text()))


def test_every_service_setting_in_the_manifests_exists():
    known = names_read_by_the_code()
    assert "EMBED_COMPILATION_CACHE" in known and "EMBED_MODEL" in known
    unknown = [(f, n) for f, n in all_envs() if not THIRD_PARTY_ENV.match(n) and n not in known]
    for path in [*manifest_files(), BENTOCLOUD]:
        unknown += [(path.name, n) for n in commented_settings(path) - known]
    assert not unknown, f"variables that no code reads: {unknown}"


# ---- BentoCloud ------------------------------------------------------------------------------------------------------
def service_decorator_kwargs() -> dict[str, Any]:
    """The literal keyword arguments of @bentoml.service in service.py (read with ast: no import, no JAX)."""
    tree = ast.parse((ROOT / "service.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and ast.unparse(deco.func) == "bentoml.service":
                    out = {}
                    for kw in deco.keywords:
                        try:
                            out[kw.arg] = ast.literal_eval(kw.value)
                        except ValueError:
                            out[kw.arg] = None  # computed from settings
                    return out
    raise AssertionError("no @bentoml.service class in service.py")


def test_bentocloud_config_is_accepted_by_bentoml_without_dropping_a_key():
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    config = yaml.safe_load(BENTOCLOUD.read_text())
    # `bentoml deploy . -f FILE` builds the bento at `bento` and replaces it by the built tag before structuring.
    config = {**config, "bento": "nemotron-embed-vl:0123456789abcdef"}
    structured = bentoml_cattr.structure(config, CreateDeploymentSchema)  # raises on a wrong type
    back = bentoml_cattr.unstructure(structured)
    assert strip_defaults(back) == strip_defaults(config), "BentoML ignored some keys (unknown or misplaced)"


def strip_defaults(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: strip_defaults(v) for k, v in d.items() if v not in (None, {}, False)}
    if isinstance(d, list):
        return [strip_defaults(v) for v in d]
    return d


def test_bentocloud_config_contract():
    config = yaml.safe_load(BENTOCLOUD.read_text())
    kwargs = service_decorator_kwargs()
    (name, svc), = config["services"].items()
    assert name == kwargs["name"], "services: must be keyed by the service's name"
    assert svc["instance_type"].startswith("gpu.")
    scaling = svc["scaling"]
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]  # no scale-to-zero: warm-up takes minutes
    assert svc["cold_start_timeout"] >= MIN_STARTUP_BUDGET_S
    envs = {e["name"]: e["value"] for e in config["envs"]}
    assert envs["EMBED_MODEL"] and envs["EMBED_COMPILATION_CACHE"]
    assert 0.5 <= float(envs["XLA_PYTHON_CLIENT_MEM_FRACTION"]) <= 0.95
    # BentoCloud derives its probes from the service's `endpoints`: they must be the NIM health routes.
    assert kwargs["endpoints"] == {"livez": LIVE, "readyz": READY}
