"""manifests/ and the Containerfile: valid Kubernetes objects that agree with the daemon.

Overlays are rendered twice when ``kubectl`` (kustomize >= 4) is installed: by kubectl and
by ``render()`` below, a small strategic-merge renderer (resources, components, patches,
images) that needs nothing; without kubectl only the second runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import pytest_asyncio
import yaml

from daemon import cli, logs, operator_storage
from daemon.api import allowed_hosts, make_app
from daemon.auth import OPEN_PATHS, auth_enabled
from daemon.config import DEFAULT_LISTEN, DEFAULT_REGISTRY_CONFIG, Settings, load_settings
from daemon.origin import OriginGuard
from tests.harness.daemon import Daemon
from tests.harness.fake_openshift import (
    PRUNER_USER,
    FakeCluster,
    FakeOpenShift,
    make_image,
    make_image_stream,
)

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
OPENSHIFT = MANIFESTS / "openshift"
K8S_VERSION = "1.29.0"  # OpenShift 4.16
DEFAULT_PORT = int(DEFAULT_LISTEN.rpartition(":")[2])
STATE_DIR = "/var/lib/registry-pruned"
KUSTOMIZATION_KINDS = {"Kustomization", "Component"}
# what a patch list merges by (the strategic-merge keys of the fields used here)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# -- a small kustomize ---------------------------------------------------------------------


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k != "$patch"}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def smp(base: Any, patch: Any) -> Any:
    """Strategic merge of ``patch`` into ``base`` for the fields in MERGE_KEYS."""
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return _clean(patch)
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif key in MERGE_KEYS and isinstance(value, list):
            out[key] = _merge_list(out.get(key) or [], value, MERGE_KEYS[key])
        elif key in out:
            out[key] = smp(out[key], value)
        else:
            out[key] = _clean(value)
    return out


def _merge_list(base: list[Any], patch: list[Any], key: str) -> list[Any]:
    out = list(base)
    for item in patch:
        at = next((i for i, old in enumerate(out) if old.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if at is not None:
                out.pop(at)
        elif at is None:
            out.append(_clean(item))
        else:
            out[at] = smp(out[at], item)
    return out


def _identity(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return obj["kind"], meta.get("name", ""), meta.get("namespace", "")


def render(root: Path) -> list[dict[str, Any]]:
    """What ``kubectl kustomize root`` gives, for the features manifests/ uses."""
    spec = yaml.safe_load((root / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources") or []:
        path = root / entry
        objects += render(path) if path.is_dir() else _load_all(path)
    for entry in spec.get("components") or []:
        component = root / entry
        assert yaml.safe_load((component / "kustomization.yaml").read_text())["kind"] == (
            "Component"
        )
        objects = _transform(component, objects)
    return _transform(root, objects, own_resources=False)


def _transform(
    root: Path, objects: list[dict[str, Any]], own_resources: bool = True
) -> list[dict[str, Any]]:
    spec = yaml.safe_load((root / "kustomization.yaml").read_text())
    if own_resources and spec.get("kind") == "Component":
        for entry in spec.get("resources") or []:
            objects = objects + _load_all(root / entry)
    for entry in spec.get("patches") or []:
        (patch,) = _load_all(root / entry["path"])
        matches = [i for i, obj in enumerate(objects) if _identity(obj) == _identity(patch)]
        assert len(matches) == 1, f"{root / entry['path']}: no unique target"
        objects[matches[0]] = smp(objects[matches[0]], patch)
    for image in spec.get("images") or []:
        for obj in objects:
            for container in _containers(obj):
                if container["image"].partition(":")[0] == image["name"]:
                    name = image.get("newName", image["name"])
                    container["image"] = f"{name}:{image['newTag']}"
    return objects


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = (((obj.get("spec") or {}).get("template") or {}).get("spec")) or {}
    return pod.get("containers") or []


def kubectl_kustomize() -> str | None:
    """kubectl when its kustomize is new enough for ``patches`` and components (>= v4)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    done = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True)
    found = re.search(r"Kustomize Version: v(\d+)", done.stdout)
    return kubectl if found and int(found.group(1)) >= 4 else None


KUBECTL = kubectl_kustomize()
RENDERERS = ["structural", "kubectl"]


def require_kubectl() -> str:
    """The machine image ships kubectl; its absence is a broken install, not a reason to skip."""
    if KUBECTL is None:
        pytest.fail("kubectl with kustomize >= v4 is required to render the overlays")
    return KUBECTL


def combo(tmp: Path, base: Path, components: list[Path]) -> Path:
    """A kustomization in ``tmp`` using ``base`` and ``components`` (as a user enables them)."""
    rel = [os.path.relpath(p, tmp) for p in components]
    spec = {"resources": [os.path.relpath(base, tmp)], "components": rel}
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    return tmp


def rendered(renderer: str, root: Path) -> list[dict[str, Any]]:
    if renderer == "structural":
        return render(root)
    done = subprocess.run(
        [require_kubectl(), "kustomize", str(root)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


VARIANTS: dict[str, Callable[[Path], Path]] = {
    "openshift": lambda _tmp: OPENSHIFT,
    "openshift-expose": lambda _tmp: OPENSHIFT / "expose",
    "openshift-s3": lambda tmp: combo(tmp, OPENSHIFT / "base", [OPENSHIFT / "components/s3"]),
    "openshift-s3-expose": lambda tmp: combo(
        tmp,
        OPENSHIFT / "base",
        [OPENSHIFT / "components/s3", OPENSHIFT / "components/expose"],
    ),
    "kubernetes": lambda _tmp: MANIFESTS / "kubernetes",
}


COMPANION = OPENSHIFT / "companion"
COMPANIONS: dict[str, Callable[[Path], Path]] = {
    "companion": lambda _tmp: COMPANION,
    "companion-pvc": lambda _tmp: COMPANION / "pvc",
    "companion-expose": lambda tmp: combo(
        tmp, COMPANION / "base", [COMPANION / "components/expose"]
    ),
    "companion-pvc-expose": lambda tmp: combo(
        tmp, COMPANION / "pvc", [COMPANION / "components/expose"]
    ),
}
EVERY_VARIANT = {**VARIANTS, **COMPANIONS}


@pytest.fixture(params=RENDERERS)
def renderer(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _objects(renderer: str, variant: str, tmp: Path) -> list[dict[str, Any]]:
    return rendered(renderer, VARIANTS[variant](tmp))


def _pruner(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (pruner,) = [c for c in _containers(deployment) if c["name"] == "pruner"]
    return deployment, pruner


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts") or []}


def _probe_script(probe: dict[str, Any]) -> list[str]:
    command = probe["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    return command


# -- YAML and schemas ----------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(MANIFESTS.rglob("*.yaml")) + sorted(MANIFESTS.rglob("*.yml"))


def patch_files() -> set[Path]:
    """Files a kustomization names as a patch: partial objects, validated once rendered."""
    found = set()
    for kfile in MANIFESTS.rglob("kustomization.yaml"):
        for entry in yaml.safe_load(kfile.read_text()).get("patches") or []:
            found.add((kfile.parent / entry["path"]).resolve())
    return found


def test_every_yaml_parses_and_objects_validate() -> None:
    files = yaml_files()
    assert len(files) >= 10
    patches = patch_files()
    checked = 0
    for path in files:
        docs = _load_all(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict) and "kind" in doc, path
            if doc["kind"] in KUSTOMIZATION_KINDS or path.resolve() in patches:
                continue  # not a Kubernetes object / partial until rendered
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # a CRD kubernetes-validate lacks: promtool checks it (test_monitoring)
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_overlays_render_to_valid_objects(renderer: str, variant: str, tmp_path: Path) -> None:
    objects = _objects(renderer, variant, tmp_path)
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    kinds = sorted(o["kind"] for o in objects)
    rbac = ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding"]
    expected = {
        "openshift": rbac,
        "openshift-s3": rbac,
        "openshift-expose": sorted([*rbac, "NetworkPolicy", "Service"]),
        "kubernetes": ["Deployment"],
    }
    expected["openshift-s3-expose"] = expected["openshift-expose"]
    assert kinds == expected[variant]


@pytest.mark.parametrize("variant", sorted(EVERY_VARIANT))
def test_structural_renderer_agrees_with_kubectl(variant: str, tmp_path: Path) -> None:
    def normal(objs: list[dict[str, Any]]) -> list[str]:
        def sort(value: Any, key: str = "") -> Any:
            if isinstance(value, dict):
                return {k: sort(v, k) for k, v in sorted(value.items())}
            if isinstance(value, list):
                items = [sort(v) for v in value]
                merge = MERGE_KEYS.get(key)
                return sorted(items, key=lambda i: str(i.get(merge))) if merge else items
            return value

        return sorted(json.dumps(sort(o), sort_keys=True) for o in objs)

    assert normal(rendered("kubectl", EVERY_VARIANT[variant](tmp_path))) == normal(
        render(EVERY_VARIANT[variant](tmp_path))
    )


# -- agreement with the daemon ---------------------------------------------------------------


def cli_env_names() -> set[str]:
    return set(re.findall(r'_env\("([A-Z_]+)"', (ROOT / "daemon" / "cli.py").read_text()))


# not on the machine: this one's /etc/docker/registry/config.yml (Debian's) must not count
NO_FILE = {"REGISTRY_CONFIGURATION_PATH": "/nonexistent/config.yml"}


def _settings(env: dict[str, str], tmp: Path) -> Settings:
    """Settings as the sidecar builds them from its env (no flags beyond PRUNER_*)."""
    config = env.get("PRUNER_REGISTRY_CONFIG")
    if config:
        # the registry's ConfigMap is the user's: a minimal one, storage as distribution's default
        mounted = tmp / "mounted-config.yml"
        mounted.write_text("version: 0.1\nstorage:\n  filesystem: {}\n")
        config = str(mounted)
    env = {**NO_FILE, **env}
    overrides: dict[str, Any] = {}
    if "PRUNER_LISTEN" in env:
        overrides["listen"] = env["PRUNER_LISTEN"]
    if "PRUNER_AUTH" in env:
        overrides["auth"] = env["PRUNER_AUTH"]
    if "PRUNER_ALLOWED_HOSTS" in env:
        overrides["allowed_hosts"] = tuple(env["PRUNER_ALLOWED_HOSTS"].split(","))
    return load_settings(Path(config) if config else None, env=env, **overrides)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sidecar_agrees_with_the_daemon(renderer: str, variant: str, tmp_path: Path) -> None:
    objects = _objects(renderer, variant, tmp_path)
    deployment, pruner = _pruner(objects)
    env, mounts = _env(pruner), _mounts(pruner)
    pod = deployment["spec"]["template"]["spec"]

    # the image is the package's, at its version
    assert pruner["image"].rpartition(":")[2] == PROJECT["version"]
    # args parse with the real CLI (the image's entry point is registry-pruned)
    args = cli._parser().parse_args(pruner["args"])
    assert args.command == "serve"
    assert args.source == ("storage" if variant == "kubernetes" else "openshift")
    # every PRUNER_* variable is one the CLI reads
    pruner_vars = {name.removeprefix("PRUNER_") for name in env if name.startswith("PRUNER_")}
    assert pruner_vars <= cli_env_names(), pruner_vars - cli_env_names()

    # listen address and auth
    host, _, port = env["PRUNER_LISTEN"].rpartition(":")
    assert int(port) == DEFAULT_PORT
    exposed = "expose" in variant
    assert env["PRUNER_LISTEN"] == ("0.0.0.0:8099" if exposed else DEFAULT_LISTEN)
    assert auth_enabled(_settings(env, tmp_path), host) is exposed
    if exposed:
        assert env["PRUNER_AUTH"] == "on"
        (container_port,) = pruner["ports"]
        assert container_port["containerPort"] == DEFAULT_PORT
        (service,) = [o for o in objects if o["kind"] == "Service"]
        (svc_port,) = service["spec"]["ports"]
        assert svc_port["port"] == DEFAULT_PORT
        assert svc_port["targetPort"] == container_port["name"]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
        assert policy["spec"]["podSelector"] == deployment["spec"]["selector"]
        ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
        assert DEFAULT_PORT in ports and 5000 in ports  # the registry stays reachable
        # the CI Job's Host (the Service's name) passes the browser guard
        guard = OriginGuard(allowed_hosts(_settings(env, tmp_path)))
        (job_container,) = ci_job()["spec"]["template"]["spec"]["containers"]
        url = next(e["value"] for e in job_container["env"] if e["name"] == "PRUNER_URL")
        ci_host = urlsplit(url).hostname or ""
        assert guard.host_ok(ci_host, False), ci_host
        assert not guard.host_ok("attacker.example", False)
    else:
        assert "ports" not in pruner

    # probes: no readiness (the registry's pod is Ready only when the pruner is: a slow
    # or failing pruner must not take the registry out of its Service); liveness on the
    # open path /healthz, which touches no storage, on the port the daemon listens on
    assert "readinessProbe" not in pruner and "startupProbe" not in pruner
    live = _probe_script(pruner["livenessProbe"])
    assert "/healthz" in live[2] and "/readyz" not in live[2]
    assert "PRUNER_LISTEN" in live[2] and f"'{DEFAULT_LISTEN}'" in live[2]
    assert "/healthz" in OPEN_PATHS <= app_paths()

    # state dir: a volume of the pod, the path the image declares
    assert env["PRUNER_STATE_DIR"] == STATE_DIR == containerfile()["ENV"]["PRUNER_STATE_DIR"]
    assert mounts[STATE_DIR] == "pruner-state"
    volumes = {v["name"] for v in pod.get("volumes") or []}
    assert "pruner-state" in volumes

    # storage: what the daemon makes of the env is the registry's storage, mounted alike
    settings = _settings(env, tmp_path)
    if variant == "kubernetes":
        assert env["PRUNER_REGISTRY_CONFIG"] == str(DEFAULT_REGISTRY_CONFIG)
        assert mounts[str(DEFAULT_REGISTRY_CONFIG)] == "registry-config"
        config_mount = next(m for m in pruner["volumeMounts"] if m["name"] == "registry-config")
        assert config_mount["subPath"] == "config.yml"
        assert "registry-config" in volumes
        # distribution's default root directory is where the storage volume goes
        assert settings.storage.driver == "filesystem"
        assert mounts[settings.storage.rootdirectory] == "registry-storage"
    elif "s3" in variant:
        assert settings.storage.driver == "s3"
        assert settings.storage.s3 is not None and settings.storage.s3.bucket
        assert not any(name == "registry-storage" for name in mounts.values())
        assert mounts["/var/run/secrets/cloud"] == "image-registry-private-configuration"
        assert (
            env["AWS_SHARED_CREDENTIALS_FILE"] == env["REGISTRY_STORAGE_S3_CREDENTIALSCONFIGPATH"]
        )
        assert env["AWS_SHARED_CREDENTIALS_FILE"].startswith("/var/run/secrets/cloud/")
        assert "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY" not in env
    else:
        assert settings.storage.driver == "filesystem"
        assert settings.storage.rootdirectory == "/registry"
        # the volume the operator defines for a PVC, at the registry's own path
        assert mounts["/registry"] == "registry-storage"
    # operator-defined volumes are referenced, our own are defined
    assert set(mounts.values()) - volumes <= {
        "registry-storage",
        "image-registry-private-configuration",
    }

    # a sidecar must not be able to starve the registry
    resources = pruner["resources"]
    assert resources["limits"]["memory"] and resources["requests"]["memory"]
    assert pruner["securityContext"]["runAsNonRoot"] is True


# -- the companion -----------------------------------------------------------------------------

# What the image registry operator owns in and around openshift-image-registry: the
# companion must not name any of it, or `oc apply` would change it and `oc delete -k` remove it.
OPERATOR_OWNED = {
    "image-registry",
    "image-registry-private-configuration",
    "image-registry-private-configuration-user",
    "image-registry-certificates",
    "image-registry-storage",
    "image-registry-operator",
    "cluster-image-registry-operator",
    "registry",
    "trusted-ca",
    "node-ca",
    "cluster",
}


@pytest.mark.parametrize("variant", sorted(COMPANIONS))
def test_companion_renders_to_valid_objects_the_operator_does_not_own(
    renderer: str, variant: str, tmp_path: Path
) -> None:
    objects = rendered(renderer, COMPANIONS[variant](tmp_path))
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    kinds = sorted(o["kind"] for o in objects)
    expected = [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ]
    if "expose" in variant:
        expected = sorted([*expected, "NetworkPolicy", "Service"])
    assert kinds == expected
    # nothing of the operator's: no Config, no Secret/ConfigMap/claim, none of its names
    assert not [o for o in objects if o["kind"] == "Config"]
    assert not [o for o in objects if o["metadata"]["name"] in OPERATOR_OWNED]
    assert not [o for o in objects if o["apiVersion"].startswith("imageregistry.")]
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "registry-pruned"
    # nor the sidecar's cluster-scoped objects (both installs may coexist while moving)
    sidecar = {(o["kind"], o["metadata"]["name"]) for o in _load_all(OPENSHIFT / "base/rbac.yaml")}
    assert not sidecar & {(o["kind"], o["metadata"]["name"]) for o in objects}
    # the registry's pods are not selected by anything here (a NetworkPolicy would fence them)
    for obj in objects:
        spec = obj.get("spec") or {}
        for selector in (spec.get("podSelector"), spec.get("selector")):
            if isinstance(selector, dict):
                labels = selector.get("matchLabels", selector)
                assert "docker-registry" not in labels


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (volume,) = [v for v in pod["volumes"] if v["name"] == name]
    return volume


@pytest.mark.parametrize("variant", sorted(COMPANIONS))
def test_companion_agrees_with_the_daemon(renderer: str, variant: str, tmp_path: Path) -> None:
    objects = rendered(renderer, COMPANIONS[variant](tmp_path))
    deployment, pruner = _pruner(objects)
    env, mounts = _env(pruner), _mounts(pruner)
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["metadata"] == {
        "name": "registry-pruned",
        "namespace": "openshift-image-registry",
        "labels": {"app.kubernetes.io/name": "registry-pruned"},
    }
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["namespace"] == deployment["metadata"]["namespace"]

    assert pruner["image"].rpartition(":")[2] == PROJECT["version"]
    args = cli._parser().parse_args(pruner["args"])
    assert (args.command, args.source, args.storage_from) == ("serve", "openshift", "openshift")
    assert "PRUNER_REGISTRY_CONFIG" not in env and not any(
        name.startswith("REGISTRY_STORAGE") for name in env
    )
    pruner_vars = {name.removeprefix("PRUNER_") for name in env if name.startswith("PRUNER_")}
    assert pruner_vars <= cli_env_names(), pruner_vars - cli_env_names()

    # the operator's secret, where the daemon reads it; of the -user secret the S3 keys only
    secret_dir = env["PRUNER_STORAGE_SECRET_DIR"]
    assert secret_dir == str(operator_storage.DEFAULT_SECRET_DIR)
    assert mounts[secret_dir] == "registry-storage-secret"
    operator_secret, user_secret = _volume(pod, "registry-storage-secret")["projected"]["sources"]
    assert operator_secret["secret"] == {"name": operator_storage.SECRET, "optional": True}
    assert user_secret["secret"]["name"] == operator_storage.USER_SECRET
    assert user_secret["secret"]["optional"] is True
    assert [(i["key"], i["path"]) for i in user_secret["secret"]["items"]] == [
        (operator_storage.S3_ACCESSKEY, operator_storage.S3_ACCESSKEY),
        (operator_storage.S3_SECRETKEY, operator_storage.S3_SECRETKEY),
    ]
    # the operator's copy of the trustedCA bundle, at the daemon's default CA file
    ca = operator_storage.DEFAULT_CA_FILE
    assert mounts[str(ca.parent)] == "storage-ca"
    assert _volume(pod, "storage-ca")["configMap"] == {
        "name": "image-registry-certificates",
        "optional": True,
        "items": [{"key": "storage-ca-bundle.pem", "path": ca.name}],
    }
    assert all(
        m.get("readOnly")
        for m in pruner["volumeMounts"]
        if m["name"] != "pruner-state" and m["name"] != "registry-storage"
    )

    if "pvc" in variant:
        # the registry's claim, where the daemon looks, next to a registry pod
        assert env["PRUNER_PVC_MOUNT"] == operator_storage.DEFAULT_PVC_MOUNT
        assert mounts[env["PRUNER_PVC_MOUNT"]] == "registry-storage"
        claim = _volume(pod, "registry-storage")["persistentVolumeClaim"]["claimName"]
        assert claim == env["PRUNER_PVC_CLAIM"] == "image-registry-storage"
        (term,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term == {
            "labelSelector": {"matchLabels": {"docker-registry": "default"}},
            "topologyKey": "kubernetes.io/hostname",
        }
    else:
        assert "affinity" not in pod and "registry-storage" not in mounts.values()
        assert "PRUNER_PVC_CLAIM" not in env

    # readiness may probe the storage here: this pod serves no one else
    ready, live = _probe_script(pruner["readinessProbe"]), _probe_script(pruner["livenessProbe"])
    assert "/readyz" in ready[2] and "/healthz" in live[2]
    assert pruner["readinessProbe"]["timeoutSeconds"] > 12 > 10  # after readyz's own 10 s

    exposed = "expose" in variant
    assert env["PRUNER_LISTEN"] == ("0.0.0.0:8099" if exposed else DEFAULT_LISTEN)
    host = env["PRUNER_LISTEN"].rpartition(":")[0]
    assert auth_enabled(_settings({**env, "REGISTRY_STORAGE": "filesystem"}, tmp_path), host) is (
        exposed
    )
    if exposed:
        (service,) = [o for o in objects if o["kind"] == "Service"]
        # the host the CI Job calls
        job_host = _env(ci_job()["spec"]["template"]["spec"]["containers"][0])["PRUNER_URL"]
        assert job_host.startswith(f"http://{service['metadata']['name']}.")
        # ... which the browser guard lets through
        settings = _settings({**env, "REGISTRY_STORAGE": "filesystem"}, tmp_path)
        guard = OriginGuard(allowed_hosts(settings))
        assert guard.host_ok(urlsplit(job_host).hostname or "", False), job_host
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        (container_port,) = pruner["ports"]
        assert service["spec"]["ports"][0]["targetPort"] == container_port["name"]
        (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
        assert policy["spec"]["podSelector"] == deployment["spec"]["selector"]
    assert env["PRUNER_STATE_DIR"] == STATE_DIR and mounts[STATE_DIR] == "pruner-state"
    assert pruner["securityContext"]["runAsNonRoot"] is True
    assert pruner["resources"]["limits"]["memory"]


@pytest.mark.parametrize("variant", ["companion", "companion-pvc-expose"])
def test_companion_roles_are_exactly_what_the_daemon_calls(
    renderer: str, variant: str, tmp_path: Path
) -> None:
    objects = rendered(renderer, COMPANIONS[variant](tmp_path))
    sidecar = _load_all(OPENSHIFT / "base" / "rbac.yaml")

    def role_grants(objs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        return {
            (o["kind"], verb, resource)
            for o in objs
            if o["kind"] in ("ClusterRole", "Role")
            for verb, resource in grants(o)
        }

    # the sidecar's verbs (tested against the daemon's calls), for the companion's account;
    # get on the operator's config among them (the storage at start-up, spec.readOnly)
    assert role_grants(objects) == role_grants(sidecar)
    assert ("ClusterRole", "get", "configs.imageregistry.operator.openshift.io") in role_grants(
        objects
    )
    roles = {o["metadata"]["name"] for o in objects if o["kind"] in ("ClusterRole", "Role")}
    bindings = [o for o in objects if o["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    assert {b["roleRef"]["name"] for b in bindings} == roles
    for binding in bindings:
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": "registry-pruned",
                "namespace": "openshift-image-registry",
            }
        ]


def app_paths() -> set[str]:
    settings = load_settings(None, env={**NO_FILE, "REGISTRY_STORAGE": "filesystem"})
    app = make_app(settings, None, None, None, logs.make_logger())  # type: ignore[arg-type]
    return {r.resource.canonical for r in app.router.routes() if r.resource is not None}


@pytest.mark.parametrize("variant", ["openshift", "openshift-expose"])
def test_cluster_role_is_exactly_what_the_daemon_calls(
    renderer: str, variant: str, tmp_path: Path
) -> None:
    objects = _objects(renderer, variant, tmp_path)
    (role,) = [o for o in objects if o["kind"] == "ClusterRole"]
    assert grants(role) == {
        ("get", "images.image.openshift.io"),
        ("list", "images.image.openshift.io"),
        ("watch", "images.image.openshift.io"),
        ("get", "imagestreams.image.openshift.io"),
        ("list", "imagestreams.image.openshift.io"),
        ("watch", "imagestreams.image.openshift.io"),
        ("get", "configs.imageregistry.operator.openshift.io"),
        ("create", "tokenreviews.authentication.k8s.io"),
        ("create", "subjectaccessreviews.authorization.k8s.io"),
    }
    (binding,) = [o for o in objects if o["kind"] == "ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    account = {
        "kind": "ServiceAccount",
        "name": "registry",
        "namespace": "openshift-image-registry",
    }
    assert binding["subjects"] == [account]
    # the rollout check of the read-only guard: the registry's own Deployment, nothing more
    (local,) = [o for o in objects if o["kind"] == "Role"]
    assert local["metadata"]["namespace"] == "openshift-image-registry"
    assert grants(local) == {("get", "deployments.apps")}
    assert [r.get("resourceNames") for r in local["rules"]] == [["image-registry"]]
    (local_binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    assert local_binding["metadata"]["namespace"] == "openshift-image-registry"
    assert local_binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": local["metadata"]["name"],
    }
    assert local_binding["subjects"] == [account]
    deployment, _ = _pruner(objects)
    assert deployment["metadata"] == {
        "name": "image-registry",
        "namespace": "openshift-image-registry",
    }


def grants(role: dict[str, Any]) -> set[tuple[str, str]]:
    """(verb, resource.group) pairs of a ClusterRole."""
    return {
        (verb, f"{resource}.{group}" if group else resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


# -- the Containerfile ------------------------------------------------------------------------


def containerfile() -> dict[str, Any]:
    """The final stage's instructions: ENTRYPOINT/CMD as lists, ENV as a dict, the rest raw."""
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word.upper(), rest.strip()))
    final = stages[-1]
    result: dict[str, Any] = {"ENV": {}, "RUN": [], "STAGES": len(stages)}
    for word, rest in final:
        if word == "ENV":
            result["ENV"].update(dict(re.findall(r"(\w+)=(\S+)", rest)))
        elif word == "RUN":
            result["RUN"].append(rest)
        elif word in ("ENTRYPOINT", "CMD", "VOLUME"):
            result[word] = json.loads(rest)
        else:
            result[word] = rest
    result["ALL_RUN"] = [rest for stage in stages for word, rest in stage if word == "RUN"]
    return result


def test_containerfile_agrees_with_the_package() -> None:
    spec = containerfile()
    assert spec["STAGES"] == 2  # the wheel is built in a builder stage
    (script,) = spec["ENTRYPOINT"]
    assert PROJECT["scripts"][script] == "daemon.__main__:run"
    assert spec["CMD"] == ["serve"]
    user = spec["USER"]
    assert user not in ("root", "0") and int(user) > 0
    assert int(spec["EXPOSE"]) == DEFAULT_PORT
    assert spec["ENV"]["PRUNER_LISTEN"] == DEFAULT_LISTEN
    assert spec["VOLUME"] == [spec["ENV"]["PRUNER_STATE_DIR"]]
    assert "/healthz" in spec["HEALTHCHECK"]
    # the package goes into a venv in the builder stage (Debian's python3 refuses system
    # installs, PEP 668), which the final stage copies as it is and puts first on PATH
    venv = "/opt/registry-pruned"
    assert any(
        re.search(rf"--python {venv}/bin/python install .*--no-deps \.$", run)
        for run in spec["ALL_RUN"]
    )
    assert spec["COPY"] == f"--from=builder {venv} {venv}"
    assert spec["ENV"]["PATH"].startswith(f"{venv}/bin:")
    # no downloads beyond the package registries (pip, apt)
    for run in spec["ALL_RUN"]:
        assert not re.search(r"https?://|\bcurl\s+-|\bwget\b", run), run
    # the Python of the base image is one the package supports
    base = re.search(r"python:(\d+)\.(\d+)", (ROOT / "Containerfile").read_text())
    assert base is not None
    assert PROJECT["requires-python"] == ">=3.11" and (
        int(base.group(1)),
        int(base.group(2)),
    ) >= (3, 11)


# -- the probes and the CI Job, run for real ---------------------------------------------------


def store_config(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"storage": {"filesystem": {"rootdirectory": str(root)}}}))
    return config


def _probe_commands(tmp_path: Path) -> Iterator[list[str]]:
    for variant in sorted(COMPANIONS):
        sub = tmp_path / variant
        sub.mkdir()
        _, pruner = _pruner(render(COMPANIONS[variant](sub)))
        yield _probe_script(pruner["readinessProbe"])
        yield _probe_script(pruner["livenessProbe"])
    for variant in VARIANTS:
        sub = tmp_path / variant
        sub.mkdir()
        _, pruner = _pruner(render(VARIANTS[variant](sub)))
        yield _probe_script(pruner["livenessProbe"])
    healthcheck = containerfile()["HEALTHCHECK"]
    yield json.loads(healthcheck[healthcheck.index("CMD ") + 4 :])


def test_probe_commands_work_against_a_daemon(tmp_path: Path) -> None:
    commands = list(_probe_commands(tmp_path))
    daemon = Daemon(store_config(tmp_path), tmp_path / "state").start()
    env = {**os.environ, "PRUNER_LISTEN": f"127.0.0.1:{daemon.port}"}
    try:
        for command in commands:
            done = subprocess.run([sys.executable, *command[1:]], env=env, timeout=30)
            assert done.returncode == 0, command
    finally:
        daemon.stop()
    for command in commands[:2]:
        done = subprocess.run(
            [sys.executable, *command[1:]], env=env, timeout=30, capture_output=True
        )
        assert done.returncode != 0


CI_READER, CI_TOKEN = "system:serviceaccount:registry-pruned-ci:registry-pruned-ci", "ci-tok-1"


def ci_job() -> dict[str, Any]:
    (job,) = [d for d in _load_all(OPENSHIFT / "ci-job.yaml") if d["kind"] == "Job"]
    return job


@pytest_asyncio.fixture(loop_scope="function")
async def api() -> AsyncIterator[FakeOpenShift]:
    async with FakeOpenShift(FakeCluster(rbac=True)) as server:
        yield server


def _allow_cluster_role(cluster: FakeCluster) -> None:
    """The daemon's account gets exactly the ClusterRole of manifests/openshift/base."""
    roles = [d for d in _load_all(OPENSHIFT / "base" / "rbac.yaml") if d["kind"].endswith("Role")]
    for role in roles:
        for verb, resource in grants(role):
            cluster.allow(PRUNER_USER, verb, resource)


async def _run_job(daemon: Daemon, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    job = ci_job()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-c"]
    token_file = tmp_path / "token"
    token_file.write_text(env.pop("TOKEN", CI_TOKEN) + "\n")
    job_env = {e["name"]: e["value"] for e in container["env"]}
    assert job_env["PRUNER_URL"].endswith(f".svc:{DEFAULT_PORT}")
    assert job_env["PRUNE_QUERY"] == "mode=check"
    job_env.update(PRUNER_URL=daemon.url, TOKEN_FILE=str(token_file), POLL_SECONDS="0.1", **env)
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", container["args"][0]],
        env={**os.environ, **job_env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _small_store(tmp_path: Path) -> tuple[Path, str, str, str]:
    """A store with ns/app holding one image (manifest, config, layer) and one orphan blob."""
    root = tmp_path / "store"
    v2 = root / "docker" / "registry" / "v2"
    contents = {name: f"{name} bytes".encode() for name in ("layer", "image config", "orphan")}
    digests = {
        name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in contents.items()
    }
    # a real manifest: every delete verifies what it kept, and reads it
    contents["manifest"] = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digests["image config"],
                "size": len(contents["image config"]),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digests["layer"],
                    "size": len(contents["layer"]),
                }
            ],
        }
    ).encode()
    digests["manifest"] = "sha256:" + hashlib.sha256(contents["manifest"]).hexdigest()
    for name, data in contents.items():
        hexdigest = digests[name][7:]
        blob = v2 / "blobs" / "sha256" / hexdigest[:2] / hexdigest / "data"
        blob.parent.mkdir(parents=True)
        blob.write_bytes(data)
    repo = v2 / "repositories" / "ns" / "app"
    for kind, name in (("_manifests/revisions", "manifest"), ("_layers", "layer")):
        link = repo / kind / "sha256" / digests[name][7:] / "link"
        link.parent.mkdir(parents=True)
        link.write_text(digests[name])
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"storage": {"filesystem": {"rootdirectory": str(root)}}}))
    return config, digests["manifest"], digests["layer"], digests["image config"]


async def test_ci_job_runs_a_check_against_the_sidecar_with_its_cluster_role(
    api: FakeOpenShift, tmp_path: Path
) -> None:
    cluster = api.cluster
    _allow_cluster_role(cluster)
    (check_role,) = [d for d in _load_all(OPENSHIFT / "ci-job.yaml") if d["kind"] == "ClusterRole"]
    cluster.add_token(CI_TOKEN, CI_READER)
    for verb, resource in grants(check_role):
        cluster.allow(CI_READER, verb, resource)
    config, manifest, layer, image_config = _small_store(tmp_path)
    cluster.add_image(make_image(manifest, layers=[layer], config=image_config))
    cluster.add_stream(make_image_stream("ns", "app", {"latest": [manifest]}))
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    daemon = Daemon(
        config,
        tmp_path / "state",
        "--kubeconfig",
        str(kubeconfig),
        "--auth",
        "on",
        "--source",
        "openshift",
        "--grace",
        "0",
    )
    await asyncio.to_thread(daemon.start)
    try:
        done = await _run_job(daemon, tmp_path)
        assert done.returncode == 0, done.stderr
        assert "Would delete 1 blobs" in done.stdout  # the orphan
        assert "Use mode=delete to actually delete the data" in done.stdout
        # a run that fails fails the Job
        cluster.fail("images", status=500, times=None)
        done = await _run_job(daemon, tmp_path)
        assert done.returncode == 1
        assert "failed" in done.stderr and "fake fault on images" in done.stderr
        # so does a caller without the right, with the daemon's answer
        cluster.faults.clear()
        cluster.add_token("nobody-tok", "system:serviceaccount:x:nobody")
        done = await _run_job(daemon, tmp_path, TOKEN="nobody-tok")
        assert done.returncode == 1 and "HTTP 403" in done.stderr
        assert "get images.image.openshift.io" in done.stderr
        # a delete needs the registry read-only; the ClusterRole lets the daemon read that
        cluster.read_only = True
        deleter = "system:serviceaccount:x:deleter"
        cluster.add_token("deleter-tok", deleter)
        cluster.allow(deleter, "get", "images.image.openshift.io")
        cluster.allow(deleter, "delete", "images.image.openshift.io")
        done = await _run_job(daemon, tmp_path, TOKEN="deleter-tok", PRUNE_QUERY="mode=delete")
        assert done.returncode == 0, done.stderr
        assert "Deleted 1 blobs" in done.stdout
    finally:
        daemon.stop()
    log = daemon.log.read_text()
    for token in (CI_TOKEN, "nobody-tok", "deleter-tok"):
        assert token not in log


async def test_ci_job_runs_against_the_companion_with_its_cluster_role(
    api: FakeOpenShift, tmp_path: Path
) -> None:
    """The Job of ci-job.yaml against a companion-mode daemon: storage from the operator."""
    cluster = api.cluster
    roles = [o for o in render(COMPANION) if o["kind"] in ("ClusterRole", "Role")]
    for verb, resource in (grant for role in roles for grant in grants(role)):
        cluster.allow(PRUNER_USER, verb, resource)
    (check_role,) = [d for d in _load_all(OPENSHIFT / "ci-job.yaml") if d["kind"] == "ClusterRole"]
    cluster.add_token(CI_TOKEN, CI_READER)
    for verb, resource in grants(check_role):
        cluster.allow(CI_READER, verb, resource)
    _config, manifest, layer, image_config = _small_store(tmp_path)
    cluster.add_image(make_image(manifest, layers=[layer], config=image_config))
    cluster.add_stream(make_image_stream("ns", "app", {"latest": [manifest]}))
    cluster.storage = {"pvc": {"claim": "image-registry-storage"}, "managementState": "Managed"}
    (pvc_pruner,) = _containers(_pruner(render(COMPANION / "pvc"))[0])
    claim = _env(pvc_pruner)["PRUNER_PVC_CLAIM"]
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    daemon = Daemon(
        None,
        tmp_path / "state",
        *pvc_pruner["args"][1:],  # serve's own args, as the manifest gives them
        "--kubeconfig",
        str(kubeconfig),
        "--auth",
        "on",
        "--pvc-mount",
        str(tmp_path / "store"),
        "--pvc-claim",
        claim,
        "--storage-secret-dir",
        str(tmp_path / "no-secret"),  # a claim needs none
        "--grace",
        "0",
    )
    await asyncio.to_thread(daemon.start)
    try:
        done = await _run_job(daemon, tmp_path)
        assert done.returncode == 0, done.stderr
        assert "Would delete 1 blobs" in done.stdout  # the orphan
        # the guard reads spec.readOnly, which the Managed operator rolls out
        cluster.read_only = False
        deleter = "system:serviceaccount:x:deleter"
        cluster.add_token("deleter-tok", deleter)
        cluster.allow(deleter, "get", "images.image.openshift.io")
        cluster.allow(deleter, "delete", "images.image.openshift.io")
        done = await _run_job(daemon, tmp_path, TOKEN="deleter-tok", PRUNE_QUERY="mode=delete")
        assert done.returncode == 1 and "read-only" in done.stderr
        cluster.read_only = True
        done = await _run_job(daemon, tmp_path, TOKEN="deleter-tok", PRUNE_QUERY="mode=delete")
        assert done.returncode == 0, done.stderr
        assert "Deleted 1 blobs" in done.stdout
    finally:
        daemon.stop()
    # the storage came from the operator's config: the daemon asked for it
    assert ("GET", "/apis/imageregistry.operator.openshift.io/v1/configs/cluster") in {
        (method, path) for method, path, _query in cluster.requests
    }
    left = {p.parent.name for p in (tmp_path / "store").glob("docker/registry/v2/blobs/*/*/*/data")}
    assert left == {manifest[7:], layer[7:], image_config[7:]}  # the orphan went
