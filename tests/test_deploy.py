"""deploy/ and the Containerfile cannot drift from the gateway: the Kubernetes manifests pass
Kubernetes' own schemas (kubernetes-validate, offline), and what the manifests, the compose file
and the image say of the gateway agrees with it: the settings registry (gateway.settings), the
variables deploy/pipelines.yaml reads, the route the probes ask, the port it binds, the drain
timeout and the fleet's stop. The image itself is run in tests/integration/container."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway import settings
from gateway.config import load_config
from gateway.fleet.master import STOP_WAIT

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY  # the kustomize base: `kubectl apply -k deploy/`
AUTOSCALED = DEPLOY / "kubernetes" / "autoscaling"
PIPELINES = DEPLOY / "pipelines.yaml"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are written for
SETTING_NAMES = {spec.env for spec in settings.SETTINGS}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")  # config.md: ${VAR}, ${VAR:-default}


def kustomization(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def manifest_files(folder: Path) -> list[Path]:
    """The manifest files a kustomization builds from, its bases' included."""
    files = []
    for entry in kustomization(folder)["resources"]:
        path = (folder / entry).resolve()
        files += manifest_files(path) if path.is_dir() else [path]
    return files


def manifests(folder: Path) -> dict[str, dict[str, Any]]:
    """Its manifests by kind (one of each here)."""
    found = {}
    for path in manifest_files(folder):
        doc = yaml.safe_load(path.read_text())
        assert doc["kind"] not in found, f"two {doc['kind']}s"
        found[doc["kind"]] = doc
    return found


ALL = manifests(AUTOSCALED)  # the base and the autoscaler
POD = ALL["Deployment"]["spec"]["template"]
GATEWAY = next(c for c in POD["spec"]["containers"] if c["name"] == "gateway")
ENV = {item["name"]: item["value"] for item in GATEWAY["env"]}
SECRET = ALL["Secret"]["stringData"]
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
COMPOSE_GATEWAYS = {name: service for name, service in COMPOSE["services"].items() if name.startswith("gateway")}
CONTAINERFILE = (ROOT / "Containerfile").read_text()


def image_env() -> dict[str, str]:
    """The settings the image's ENV sets (Containerfile)."""
    block = re.search(r"^ENV (.*?)(?:\n(?!\s)|\Z)", CONTAINERFILE, re.M | re.S).group(1)
    return dict(re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " ")))


def strings(value: Any) -> list[str]:
    """Every string in a YAML document (its comments are not)."""
    if isinstance(value, dict):
        return [text for item in value.items() for part in item for text in strings(part)]
    if isinstance(value, list):
        return [text for item in value for text in strings(item)]
    return [value] if isinstance(value, str) else []


def bound_port(environ: dict[str, str]) -> int:
    """The port the gateway binds with this environment (the image's defaults under it)."""
    return int(settings.Settings.from_environ({**image_env(), **environ}).bind.rpartition(":")[2])


# Kubernetes' schemas ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", manifest_files(AUTOSCALED), ids=lambda path: str(path.relative_to(DEPLOY)))
def test_every_manifest_passes_kubernetes_schemas(path):
    kubernetes_validate.validate(yaml.safe_load(path.read_text()), KUBERNETES_VERSION, strict=True)


def test_the_schema_check_refuses_a_misspelled_field():
    broken = copy.deepcopy(ALL["Deployment"])
    probe = broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    probe["failureTreshold"] = probe.pop("failureThreshold")
    with pytest.raises(kubernetes_validate.ValidationError, match="failureTreshold"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_base_holds_every_piece_and_the_overlay_adds_the_autoscaler():
    assert sorted(manifests(BASE)) == ["Deployment", "PersistentVolumeClaim", "PodDisruptionBudget", "Secret", "Service"]
    assert sorted(ALL) == sorted([*manifests(BASE), "HorizontalPodAutoscaler"])


# What the manifests say of the gateway -------------------------------------------------------------

def test_the_configmap_is_deploy_pipelines_yaml_and_sits_where_the_gateway_reads_it():
    generator = kustomization(BASE)["configMapGenerator"][0]
    assert [BASE / name for name in generator["files"]] == [PIPELINES]
    volume = next(v for v in POD["spec"]["volumes"] if v.get("configMap"))
    assert volume["configMap"]["name"] == generator["name"]
    mount = next(m for m in GATEWAY["volumeMounts"] if m["name"] == volume["name"])
    # mounted as a folder (not subPath): an edited ConfigMap reaches the pod, and the gateway reloads it
    assert "subPath" not in mount and generator["options"]["disableNameSuffixHash"] is True
    config = settings.Settings.from_environ({**image_env(), **ENV}).config
    assert config == mount["mountPath"] + "/" + PIPELINES.name
    assert image_env()["GATEWAY_CONFIG"] == config
    for service in COMPOSE_GATEWAYS.values():
        assert f"./{PIPELINES.name}:{config}:ro" in service["volumes"]


def test_every_variable_is_a_setting_or_one_the_pipelines_file_reads_and_each_it_needs_is_given():
    references = [found for text in strings(yaml.safe_load(PIPELINES.read_text())) for found in VARIABLE.findall(text)]
    read = {name for name, _ in references}
    needed = {name for name, default in references if not default}
    given = {"Deployment": {**ENV, **SECRET}, **{name: service["environment"] for name, service in COMPOSE_GATEWAYS.items()}}
    for where, environ in given.items():
        assert set(environ) <= SETTING_NAMES | read, f"{where}: not a setting, not read by the file: " \
            f"{set(environ) - SETTING_NAMES - read}"
        assert needed <= set(environ), f"{where} does not give {needed - set(environ)}"
        settings.Settings.from_environ(environ)  # and every setting's value is one the gateway takes
    # the file loads with what the Deployment gives it, and with nothing less
    load_config(PIPELINES, environ={**ENV, **SECRET})
    with pytest.raises(Exception, match="REDIS_URL"):
        load_config(PIPELINES, environ={k: v for k, v in {**ENV, **SECRET}.items() if k != "REDIS_URL"})


def test_ports_agree_with_the_address_the_gateway_binds():
    port = bound_port(ENV)
    assert GATEWAY["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert re.search(r"^EXPOSE (\d+)$", CONTAINERFILE, re.M).group(1) == str(bound_port({}))
    assert ALL["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert GATEWAY[kind]["httpGet"]["port"] == "http"
    for service in COMPOSE_GATEWAYS.values():
        assert all(mapping.endswith(f":{bound_port(service['environment'])}") for mapping in service["ports"])


def test_the_probes_and_the_healthcheck_ask_the_route_that_says_the_gateway_is_ready(make_client):
    paths = {GATEWAY[kind]["httpGet"]["path"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    paths |= set(re.findall(r"http://127\.0\.0\.1:\{port\}(/\S*?)'", CONTAINERFILE))
    assert len(paths) == 1
    path = paths.pop()
    client = make_client()
    assert client.simulate_get(path).status_code == 503  # its backend not checked yet: not ready
    client.gateway.upstreams.check_all()
    answer = client.simulate_get(path)  # no key: a probe has none
    assert answer.status_code == 200 and answer.json["status"] == "ok"


def test_the_grace_periods_cover_the_drain_and_the_fleets_stop():
    graceful = settings.Settings.from_environ(ENV).graceful_timeout
    pre_stop = GATEWAY["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert POD["spec"]["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + graceful + STOP_WAIT
    for service in COMPOSE_GATEWAYS.values():
        graceful = settings.Settings.from_environ(service["environment"]).graceful_timeout
        assert int(service["stop_grace_period"].removesuffix("s")) >= graceful + STOP_WAIT


def test_the_pods_run_as_the_images_user_and_every_selector_finds_them():
    user = re.search(r"^USER (\d+):(\d+)$", CONTAINERFILE, re.M)
    context = POD["spec"]["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user.groups()
    labels = POD["metadata"]["labels"]
    assert ALL["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert ALL["Service"]["spec"]["selector"].items() <= labels.items()
    assert ALL["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = ALL["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", ALL["Deployment"]["metadata"]["name"])
    claim = next(v for v in POD["spec"]["volumes"] if v.get("persistentVolumeClaim"))
    assert claim["persistentVolumeClaim"]["claimName"] == ALL["PersistentVolumeClaim"]["metadata"]["name"]
