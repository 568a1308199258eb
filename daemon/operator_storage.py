"""``--storage-from openshift``: the image registry operator's storage config -> a registry config.

The operator's ``configs.imageregistry.operator.openshift.io/cluster`` names the storage
(``status.storage``: what it applied) and its secret ``image-registry-private-configuration``,
mounted as a directory, holds the credentials. The result is a distribution-style
``{"storage": {<driver>: {...}}}`` dict that daemon/config.py parses like a registry config.
"""

from __future__ import annotations

import configparser
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon.config import ConfigError

CONFIG_PATH = "/apis/imageregistry.operator.openshift.io/v1/configs/cluster"
CONFIG_NAME = "configs.imageregistry.operator.openshift.io/cluster"
SECRET = "image-registry-private-configuration"
USER_SECRET = "image-registry-private-configuration-user"
DEFAULT_SECRET_DIR = Path("/var/run/secrets/registry-storage")
DEFAULT_PVC_MOUNT = "/registry"
# where the companion mounts key storage-ca-bundle.pem of the operator's ConfigMap
# image-registry-certificates: the operator copies the trustedCA bundle there
DEFAULT_CA_FILE = Path("/etc/registry-pruned/storage-ca/storage-ca-bundle.pem")

# secret keys, as the operator writes them
S3_CREDENTIALS = "credentials"  # an AWS shared-credentials file
S3_ACCESSKEY = "REGISTRY_STORAGE_S3_ACCESSKEY"  # from the -user secret, projected alongside
S3_SECRETKEY = "REGISTRY_STORAGE_S3_SECRETKEY"
AZURE_ACCOUNTKEY = "REGISTRY_STORAGE_AZURE_ACCOUNTKEY"
GCS_KEYFILE = "REGISTRY_STORAGE_GCS_KEYFILE"
# the one override of the mapped config: where the Blob service answers (Azure Stack Hub, a
# private endpoint, an emulator); distribution's serviceurl, named as the registry reads it
AZURE_SERVICEURL = "REGISTRY_STORAGE_AZURE_SERVICEURL"

# Azure cloudName -> the storage endpoint suffix distribution calls the realm
AZURE_REALMS = {
    "azurepubliccloud": "core.windows.net",
    "azureusgovernmentcloud": "core.usgovcloudapi.net",
    "azurechinacloud": "core.chinacloudapi.cn",
    "azuregermancloud": "core.cloudapi.de",
}
IBMCOS_ENDPOINT = "https://s3.{location}.cloud-object-storage.appdomain.cloud"
UNSERVED = {
    "swift": "OpenStack Swift",
    "emptyDir": "emptyDir (the registry pod's own scratch space; nothing outside it can see it)",
    "oss": "Alibaba OSS",
}


@dataclass(frozen=True, slots=True)
class Mounts:
    """Where the companion finds what the operator wrote: secret keys, the claim, the CA."""

    secret_dir: Path = DEFAULT_SECRET_DIR
    pvc_mount: str = DEFAULT_PVC_MOUNT
    pvc_claim: str | None = None  # the claim the pod mounts, when the manifest says
    ca_file: Path | None = None  # explicit --storage-ca-file; None: DEFAULT_CA_FILE if needed
    azure_federated_token: str | None = None  # AZURE_FEDERATED_TOKEN_FILE of the pod's env
    azure_service_url: str | None = None  # REGISTRY_STORAGE_AZURE_SERVICEURL of the pod's env


def _string(params: Mapping[str, Any], where: str, field: str, required: bool = True) -> str:
    value = params.get(field)
    if value is None or value == "":
        if required:
            raise ConfigError(f"{where}.{field} is missing: the operator has not set it")
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}.{field} is not a string")
    return value


def _secret_key(mounts: Mounts, key: str, why: str) -> Path:
    path = mounts.secret_dir / key
    if not path.is_file():
        raise ConfigError(
            f"secret key {key} not found in {mounts.secret_dir} ({why}): mount the secret "
            f"{SECRET} there (--storage-secret-dir)"
        )
    return path


def _read_key(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"secret key {path.name} in {path.parent} cannot be read: {exc}"
        ) from None


def select_storage(config: Mapping[str, Any]) -> tuple[str, dict[str, Any], str]:
    """(kind, its parameters, "status" or "spec") from the operator's Config object."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for part in ("status", "spec"):
        section = config.get(part) or {}
        storage = section.get("storage") if isinstance(section, dict) else None
        if not isinstance(storage, dict):
            continue
        kinds = [k for k, v in storage.items() if k != "managementState" and v is not None]
        if len(kinds) > 1:
            raise ConfigError(
                f"{CONFIG_NAME} {part}.storage names {len(kinds)} storage kinds "
                f"({', '.join(sorted(kinds))}); the operator applies exactly one"
            )
        if kinds:
            params = storage[kinds[0]]
            if not isinstance(params, dict):
                raise ConfigError(f"{CONFIG_NAME} {part}.storage.{kinds[0]} is not an object")
            found[part] = (kinds[0], params)
    # status.storage is what the operator applied; spec.storage may not be applied yet
    for part in ("status", "spec"):
        if part in found:
            return found[part][0], found[part][1], part
    raise ConfigError(
        f"{CONFIG_NAME} has no status.storage and no spec.storage: the operator has not "
        "configured the registry's storage yet"
    )


def storage_config(config: Mapping[str, Any], mounts: Mounts) -> dict[str, Any]:
    """The operator's Config object -> ``{"storage": {driver: params}}`` for daemon/config.py."""
    kind, params, part = select_storage(config)
    where = f"{CONFIG_NAME} {part}.storage.{kind}"
    if kind in UNSERVED:
        raise ConfigError(
            f"{where}: the registry stores on {UNSERVED[kind]}, "
            "which registry-pruned cannot serve (it serves s3, ibmcos, azure, gcs and pvc)"
        )
    match kind:
        case "s3":
            driver = _s3(params, where, mounts)
        case "ibmcos":
            driver = _ibmcos(params, where, mounts)
        case "azure":
            driver = _azure(params, where, mounts)
        case "gcs":
            driver = _gcs(params, where, mounts)
        case "pvc":
            driver = _pvc(params, where, mounts)
        case _:
            raise ConfigError(
                f"{where}: unknown storage kind "
                "(registry-pruned serves s3, ibmcos, azure, gcs and pvc)"
            )
    return {"storage": driver}


def _s3_keys(mounts: Mounts) -> dict[str, str]:
    """accesskey/secretkey: the -user secret's keys first, as the operator does, then the file."""
    user = {key: mounts.secret_dir / key for key in (S3_ACCESSKEY, S3_SECRETKEY)}
    present = {key for key, path in user.items() if path.is_file()}
    if present:
        missing = set(user) - present
        if missing:
            raise ConfigError(
                f"secret key {missing.pop()} not found in {mounts.secret_dir}: the keys of "
                f"{USER_SECRET} come as a pair ({S3_ACCESSKEY}, {S3_SECRETKEY})"
            )
        return {
            "accesskey": _read_key(user[S3_ACCESSKEY]),
            "secretkey": _read_key(user[S3_SECRETKEY]),
        }
    path = _secret_key(mounts, S3_CREDENTIALS, "the AWS shared-credentials file of the operator")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text())
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ConfigError(
            f"secret key {S3_CREDENTIALS} in {mounts.secret_dir} is not an AWS shared-credentials "
            f"file: {str(exc).splitlines()[0]}"
        ) from None
    if not parser.has_section("default"):
        raise ConfigError(
            f"secret key {S3_CREDENTIALS} in {mounts.secret_dir} has no [default] profile"
        )
    profile = parser["default"]
    if "web_identity_token_file" in profile or "role_arn" in profile:
        raise ConfigError(
            f"secret key {S3_CREDENTIALS} in {mounts.secret_dir} assumes a role with a web "
            f"identity (STS) instead of holding keys: put {S3_ACCESSKEY} and {S3_SECRETKEY} "
            "of a Secret of your own in that directory (docs/cluster.md)"
        )
    keys = {}
    for field, name in (("accesskey", "aws_access_key_id"), ("secretkey", "aws_secret_access_key")):
        value = (profile.get(name) or "").strip()
        if not value:
            raise ConfigError(
                f"secret key {S3_CREDENTIALS} in {mounts.secret_dir}: [default] has no {name}"
            )
        keys[field] = value
    return keys


def _endpoint(endpoint: str) -> tuple[str, bool]:
    """(endpoint URL, secure); a bare host means https, as for the registry."""
    if "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    return endpoint, not endpoint.lower().startswith("http://")


def _ca_bundle(params: Mapping[str, Any], where: str, mounts: Mounts) -> str | None:
    trusted = params.get("trustedCA") or {}
    name = trusted.get("name") if isinstance(trusted, dict) else None
    if name:
        path = mounts.ca_file or DEFAULT_CA_FILE
        if not path.is_file():
            raise ConfigError(
                f"{where}.trustedCA names the ConfigMap {name!r}, but its bundle is "
                f"not at {path}: mount key storage-ca-bundle.pem of the ConfigMap "
                "image-registry-certificates (the operator's copy) there, or give --storage-ca-file"
            )
        return str(path)
    if mounts.ca_file is not None:
        if not mounts.ca_file.is_file():
            raise ConfigError(f"--storage-ca-file {mounts.ca_file} does not exist")
        return str(mounts.ca_file)
    return None


def _s3(params: Mapping[str, Any], where: str, mounts: Mounts) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bucket": _string(params, where, "bucket"),
        "region": _string(params, where, "region"),
    }
    endpoint = _string(params, where, "regionEndpoint", required=False)
    virtual = params.get("virtualHostedStyle", False)
    if not isinstance(virtual, bool):
        raise ConfigError(f"{where}.virtualHostedStyle is not a boolean")
    if endpoint:
        out["regionendpoint"], out["secure"] = _endpoint(endpoint)
        # as the operator configures its own client: path style unless virtual-hosted is asked
        out["forcepathstyle"] = not virtual
    out["virtualhostedstyle"] = virtual
    encrypt = params.get("encrypt", False)
    if not isinstance(encrypt, bool):
        raise ConfigError(f"{where}.encrypt is not a boolean")
    out["encrypt"] = encrypt  # server-side: reading and deleting need nothing of it
    out.update(_s3_keys(mounts))
    ca = _ca_bundle(params, where, mounts)
    if ca:
        out["cabundle"] = ca
    return {"s3": out}


def _ibmcos(params: Mapping[str, Any], where: str, mounts: Mounts) -> dict[str, Any]:
    location = _string(params, where, "location")
    out: dict[str, Any] = {
        "bucket": _string(params, where, "bucket"),
        "region": location,
        # the operator points the registry's s3 driver at the regional COS endpoint
        "regionendpoint": IBMCOS_ENDPOINT.format(location=location),
        "secure": True,
        "forcepathstyle": True,
    }
    out.update(_s3_keys(mounts))  # HMAC keys, in the same shared-credentials file
    if mounts.ca_file is not None:
        out["cabundle"] = _ca_bundle({}, where, mounts)
    return {"s3": out}


def _azure(params: Mapping[str, Any], where: str, mounts: Mounts) -> dict[str, Any]:
    out: dict[str, Any] = {
        "accountname": _string(params, where, "accountName"),
        "container": _string(params, where, "container"),
    }
    cloud = _string(params, where, "cloudName", required=False)
    if mounts.azure_service_url:
        # the endpoint is given: the realm would only have named it
        out["serviceurl"] = mounts.azure_service_url
    elif cloud:
        realm = AZURE_REALMS.get(cloud.lower())
        if realm is None:
            raise ConfigError(
                f"{where}.cloudName {cloud!r} is not a cloud registry-pruned knows "
                f"({', '.join(sorted(AZURE_REALMS))}): give the Blob service's URL in "
                f"{AZURE_SERVICEURL}"
            )
        out["realm"] = realm
    key = mounts.secret_dir / AZURE_ACCOUNTKEY
    if key.is_file():
        out["accountkey"] = _read_key(key)
    elif mounts.azure_federated_token:
        # workload identity: no key; AZURE_CLIENT_ID/TENANT_ID/FEDERATED_TOKEN_FILE in the env
        if not Path(mounts.azure_federated_token).is_file():
            raise ConfigError(
                f"AZURE_FEDERATED_TOKEN_FILE {mounts.azure_federated_token} does not exist"
            )
        out["credentials"] = {"type": "default"}
    else:
        _secret_key(
            mounts,
            AZURE_ACCOUNTKEY,
            "the storage account key; without it, a federated "
            "token through AZURE_FEDERATED_TOKEN_FILE",
        )
    return {"azure": out}


def _gcs(params: Mapping[str, Any], where: str, mounts: Mounts) -> dict[str, Any]:
    keyfile = _secret_key(mounts, GCS_KEYFILE, "the service account's JSON key file")
    return {"gcs": {"bucket": _string(params, where, "bucket"), "keyfile": str(keyfile)}}


def _pvc(params: Mapping[str, Any], where: str, mounts: Mounts) -> dict[str, Any]:
    claim = _string(params, where, "claim")
    if mounts.pvc_claim is not None and mounts.pvc_claim != claim:
        raise ConfigError(
            f"{where}.claim is {claim!r}, but this pod mounts the claim "
            f"{mounts.pvc_claim!r} (--pvc-claim): mount the registry's claim"
        )
    root = Path(mounts.pvc_mount)
    if not root.is_dir():
        raise ConfigError(
            f"{where}.claim is {claim!r}, but nothing is mounted at {root}: mount "
            "that claim there (--pvc-mount)"
        )
    return {"filesystem": {"rootdirectory": str(root)}}


# -- reading the Config object ----------------------------------------------------------------


async def fetch_config(kubeconfig: str | None, request_timeout: float) -> dict[str, Any]:
    """GET the operator's Config object; ConfigError with the cause on anything but 200."""
    # here, not at the top: the CLI imports this module for its defaults, and aiohttp with
    # the kube client cost every one-shot run ~0.1 s of CPU before it started
    import aiohttp

    from daemon.kube import KubeConfigError, api_client, request

    what = f"reading {CONFIG_NAME}"
    timeout = request_timeout
    try:
        client = await api_client(kubeconfig)
    except KubeConfigError as exc:
        raise ConfigError(f"--storage-from openshift: {exc}") from None
    try:
        status, body = await request(client, "GET", CONFIG_PATH, timeout)
    except TimeoutError:
        raise ConfigError(f"{what}: no answer within {timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise ConfigError(f"{what}: {type(exc).__name__}: {exc}") from None
    finally:
        await client.close()
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if status != 200:
        message = data.get("message") if isinstance(data, dict) else None
        message = message or body[:200].decode("utf-8", "replace").strip() or "(empty body)"
        hint = {
            401: " (expired or missing service account token?)",
            403: " (the service account needs 'get configs.imageregistry.operator.openshift.io')",
            404: " (is this an OpenShift cluster with the image registry operator?)",
        }.get(status, "")
        raise ConfigError(f"{what}: HTTP {status}{hint}: {message}")
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: the answer is not a JSON object")
    return data


def log_choice(config: Mapping[str, Any], log: structlog.typing.FilteringBoundLogger) -> None:
    """Say which part of the Config the storage came from, and when spec names another kind."""
    kind, _params, part = select_storage(config)
    log.info("storage from the image registry operator", kind=kind, field=f"{part}.storage")
    if part == "spec":
        log.warning("storage from spec.storage: the operator has not reported status.storage")
        return
    spec = (config.get("spec") or {}).get("storage")
    if isinstance(spec, dict):
        kinds = [k for k, v in spec.items() if k != "managementState" and v is not None]
        if kinds and kinds != [kind]:
            log.warning(
                "spec.storage names another kind than status.storage; using status.storage, "
                "what the operator applied (restart registry-pruned once it has rolled out)",
                status=kind,
                spec=kinds,
            )
