"""The files in deploy/ are checked by the tools that will consume them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import ProxyFactory
from tests.flows.test_tls import tls_config
from tests.helpers.pki import make_pki
from tests.helpers.tools import require_tool
from wsproxy.ca.authority import CertificateAuthority
from wsproxy.config import parse_config
from wsproxy.demo import EchoTarget

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def run(*command: str, cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    promtool = require_tool("promtool", "prometheus")
    prometheus_dir = DEPLOY / "prometheus"
    assert "SUCCESS: 10 rules found" in run(
        promtool, "check", "rules", "alerts.yml", cwd=prometheus_dir
    )
    assert "SUCCESS" in run(promtool, "test", "rules", "alerts_test.yml", cwd=prometheus_dir)


def test_prometheus_config_is_valid() -> None:
    promtool = require_tool("promtool", "prometheus")
    run(promtool, "check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")


# --- the dashboard and the alerts reference only metrics that exist ---------------------------

METRIC_NAME = re.compile(r"\b((?:wsproxy|process)_[a-z_]+)\b")


def referenced_metrics() -> dict[str, set[str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "wsproxy.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += [
        variable["query"]["query"]
        for variable in dashboard["templating"]["list"]
        if isinstance(variable.get("query"), dict)
    ]
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    rules = [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    return {
        "grafana/wsproxy.json": {n for e in expressions for n in METRIC_NAME.findall(e)},
        "prometheus/alerts.yml": {n for e in rules for n in METRIC_NAME.findall(e)},
    }


# Only a supervisor (workers > 1) has these; tests/process/test_workers.py scrapes them.
WORKERS_ONLY = {"wsproxy_workers", "wsproxy_worker_restarts_total"}


def exposed_names(text: str) -> set[str]:
    """Sample names a scrape can produce: counters with _total, histograms' three series."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


async def test_dashboard_and_alerts_use_only_metrics_a_real_scrape_has(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    config = tls_config(pki, echo_targets[0].address, client_auth="optional", crl=True)
    config += "[target_groups.echo.health_check]\ninterval_seconds = 1\ntimeout_seconds = 0.5\n"
    proxy = await make_proxy(config)
    assert proxy.admin is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{proxy.admin.address}/metrics") as response,
    ):
        exposed = exposed_names(await response.text())
    for source, names in referenced_metrics().items():
        assert len(names) >= 8, (source, names)
        missing = sorted(names - exposed - WORKERS_ONLY)
        assert not missing, f"{source} uses metrics /metrics does not have: {missing}"


# --- Kubernetes --------------------------------------------------------------------------------

KUBERNETES = DEPLOY / "kubernetes"


def manifests(directory: Path) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path in sorted(directory.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and "kind" in document and document["kind"] != "Kustomization":
                found[(document["kind"], document["metadata"]["name"])] = document
    return found


def minted_certs(directory: Path) -> None:
    """The three files the secretGenerator wants, minted by wsproxy's CA module."""
    ca = CertificateAuthority(str(directory / "ca"))
    ca.init("Kubernetes test CA")
    issued = ca.issue_server("server", ["wsproxy.example.com"])
    shutil.copy(issued.cert_path, directory / "server.pem")
    shutil.copy(issued.key_path, directory / "server.key")
    shutil.copy(ca.store.ca_cert, directory / "ca.pem")


def test_kubernetes_manifests_match_the_config_they_ship(tmp_path: Path) -> None:
    shipped = (KUBERNETES / "wsproxy.toml").read_text()
    found = manifests(KUBERNETES)
    deployment = found[("Deployment", "wsproxy")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}

    # The config is valid once its certificate paths point at real files.
    mounts = {volume["name"]: volume["mountPath"] for volume in container["volumeMounts"]}
    certs = tmp_path / "certs"
    certs.mkdir()
    minted_certs(certs)
    config = parse_config(shipped.replace(mounts["certs"], str(certs)), "wsproxy.toml")
    assert container["args"] == ["run", "-c", f"{mounts['config']}/wsproxy.toml"]
    assert config.proxy.watch_config, "ConfigMap updates are picked up only when watched"

    # Ports: every listener is a container port, and the probes use the admin listener.
    assert ports["admin"] == config.admin.address.port
    assert {config.listeners[name].address.port for name in config.listeners} == {
        ports["ws"],
        ports["wss"],
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    pre_stop = "\n".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert f"127.0.0.1:{ports['admin']}" in pre_stop and "/v1/drain" in pre_stop
    assert pod["terminationGracePeriodSeconds"] > config.proxy.shutdown_grace_seconds
    assert "subPath" not in str(container["volumeMounts"])  # subPath mounts miss updates

    # Services point at named container ports; the ServiceMonitor at the admin Service.
    for service in (found[("Service", "wsproxy")], found[("Service", "wsproxy-admin")]):
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    monitor = found[("ServiceMonitor", "wsproxy")]
    admin_service = found[("Service", "wsproxy-admin")]
    assert monitor["spec"]["endpoints"][0]["port"] == admin_service["spec"]["ports"][0]["name"]
    labels = admin_service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert found[("PodDisruptionBudget", "wsproxy")]["spec"]["maxUnavailable"] == 1

    # kustomize renders it (when kubectl is here): selectors added, ConfigMap and Secret made.
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    shutil.copytree(certs, copy / "certs", dirs_exist_ok=True)
    rendered = run(kubectl, "kustomize", str(copy), cwd=tmp_path)
    documents = {d["kind"]: d for d in yaml.safe_load_all(rendered)}
    # The ConfigMap keeps its name (updated in place, reloaded by the watcher); the Secret's
    # name carries a content hash, so new certificates roll the pods.
    assert documents["ConfigMap"]["metadata"]["name"] == "wsproxy-config"
    assert documents["Secret"]["metadata"]["name"].startswith("wsproxy-certs-")
    selector = documents["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "wsproxy"}
    assert documents["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector


# --- the container image -----------------------------------------------------------------------


def test_dockerfile_runs_unprivileged_with_a_health_check() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "container" / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert all("slim" in base for base in bases)
    user = [line for line in lines if line.startswith("USER ")][-1]
    assert user.split()[1].split(":")[0] not in ("0", "root")
    healthcheck = next(i for i, line in enumerate(lines) if line.startswith("HEALTHCHECK"))
    assert "/healthz" in lines[healthcheck + 1]
    assert "9900" in next(line for line in lines if line.startswith("EXPOSE"))
