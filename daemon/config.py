"""Registry config file + REGISTRY_STORAGE_* env + the daemon's own flags -> one Settings."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_REGISTRY_CONFIG = Path("/etc/docker/registry/config.yml")
DEFAULT_LISTEN = "127.0.0.1:8099"
SOURCES = ("storage", "openshift")
DRIVERS = ("filesystem", "s3", "azure", "gcs")
_SUPPORTED = ", ".join(DRIVERS)


class ConfigError(Exception):
    """The configuration cannot be used; the message says which file/variable and why."""


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Go-style duration ('90s', '1h30m', '2d', '0') -> seconds; ValueError otherwise."""
    value = text.strip()
    if value == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(value) or not value:
        raise ValueError(f"bad duration {text!r}: use a number with a unit, e.g. 30m, 1h, 90s, 2d")
    return total


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class S3Settings:
    bucket: str
    region: str = "us-east-1"
    regionendpoint: str | None = None
    accesskey: str | None = None
    secretkey: str | None = None
    secure: bool = True
    skipverify: bool = False
    forcepathstyle: bool = False
    ca_bundle: str | None = None


#: Azure credential types, as distribution's azure driver names them
AZURE_CREDENTIALS = ("shared_key", "client_secret", "default_credentials")


@dataclass(frozen=True, slots=True)
class AzureSettings:
    container: str
    accountname: str | None = None
    accountkey: str | None = None
    realm: str = "core.windows.net"
    serviceurl: str | None = None  # default https://<accountname>.blob.<realm>
    connectionstring: str | None = None
    credentials: str = "shared_key"  # one of AZURE_CREDENTIALS
    clientid: str | None = None
    tenantid: str | None = None
    secret: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The Blob service's URL (a connection string may name another one)."""
        return (self.serviceurl or f"https://{self.accountname}.blob.{self.realm}").rstrip("/")


@dataclass(frozen=True, slots=True)
class GCSSettings:
    bucket: str
    keyfile: str | None = None  # a service account's JSON key file
    credentials: str | None = field(default=None, repr=False)  # the same, inline (JSON text)
    emulator: str | None = None  # STORAGE_EMULATOR_HOST: no credentials, plain http


@dataclass(frozen=True, slots=True)
class StorageSettings:
    driver: str  # filesystem | s3 | azure | gcs
    rootdirectory: str  # filesystem: a directory; object stores: a key prefix ('' = the root)
    s3: S3Settings | None = None
    azure: AzureSettings | None = None
    gcs: GCSSettings | None = None

    def describe(self) -> str:
        root = self.rootdirectory.strip("/")
        if self.driver == "s3" and self.s3 is not None:
            return f"s3://{self.s3.bucket}/{root}"
        if self.driver == "azure" and self.azure is not None:
            return f"azure://{self.azure.accountname or ''}/{self.azure.container}/{root}"
        if self.driver == "gcs" and self.gcs is not None:
            return f"gs://{self.gcs.bucket}/{root}"
        return f"filesystem:{self.rootdirectory}"


@dataclass(frozen=True, slots=True)
class Settings:
    storage: StorageSettings
    registry_config: Path | None = None
    registry_read_only: bool = False
    listen: str = DEFAULT_LISTEN
    state_dir: Path = Path("state")
    grace: float = 3600.0
    upload_max_age: float = 86400.0
    #: delete runs keep what they remove in the store's trash this long (seconds); 0: off
    trash: float = 0.0
    source: str = "storage"
    workers: int = 16
    log_level: str = "warning"
    log_format: str = "json"
    kubeconfig: str | None = None
    history: int = 50
    api_page_size: int = 500
    api_timeout: float = 60.0
    extra: Mapping[str, Any] = field(default_factory=dict)
    # serve's auth: auto = on unless listening on loopback (daemon/auth.py)
    auth: str = "auto"
    insecure_no_auth: bool = False
    auth_check_verb: str = "get"
    auth_delete_verb: str = "delete"
    auth_resource: str = "images.image.openshift.io"
    # Host names (besides localhost and IP addresses) the daemon answers to: a Service's
    allowed_hosts: tuple[str, ...] = ()


def _load_file(path: Path, required: bool) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        if required:
            raise ConfigError(
                f"registry config {path} does not exist; pass the registry's config.yml with "
                "--registry-config FILE (or REGISTRY_CONFIGURATION_PATH), set its storage with "
                "REGISTRY_STORAGE_* variables, or on OpenShift use --storage-from openshift"
            ) from None
        return {}
    except OSError as exc:
        raise ConfigError(f"registry config {path} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"registry config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"registry config {path} is not a YAML mapping")
    return data


def _apply_env(config: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Apply distribution's REGISTRY_<SECTION>_<KEY> overrides for the storage section."""
    storage = config.setdefault("storage", {}) or {}
    config["storage"] = storage
    if not isinstance(storage, dict):
        raise ConfigError("registry config: 'storage' must be a mapping")
    selected = env.get("REGISTRY_STORAGE")
    if selected:
        # distribution replaces the driver section when REGISTRY_STORAGE names another one
        for name in list(storage):
            if name not in ("maintenance", "delete", "redirect", "cache", selected):
                storage.pop(name)
        storage.setdefault(selected, {})
    for key, value in env.items():
        if not key.startswith("REGISTRY_STORAGE_"):
            continue
        parts = key[len("REGISTRY_STORAGE_") :].lower().split("_")
        if parts[:2] == ["gcs", "credentials"] and len(parts) > 2:
            # a service account key's fields have '_' in their names (private_key_id)
            parts = [*parts[:2], "_".join(parts[2:])]
        node = storage
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return config


def maintenance_read_only(value: Any) -> bool:
    """``storage.maintenance.readonly`` -> enabled? A map, a bool, or the YAML text that
    REGISTRY_STORAGE_MAINTENANCE_READONLY carries (``{enabled: true}``); ValueError if bad."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"not a YAML map or boolean: {value[:60]!r}") from None
    if isinstance(value, dict):
        return _bool(value.get("enabled", False))
    return _bool(value)


def registry_read_only_now(settings: Settings, env: Mapping[str, str] | None = None) -> bool:
    """Read the registry's config (file + env) again: is it in read-only mode now? The file
    is often a mounted ConfigMap that changes under a running daemon."""
    current = load_settings(settings.registry_config, env)
    if current.storage != settings.storage:
        raise ConfigError(
            f"the registry's storage is now {current.storage.describe()}, not "
            f"{settings.storage.describe()} as when this daemon started; restart it"
        )
    return current.registry_read_only


def _storage(
    config: dict[str, Any], source: str, env: Mapping[str, str] | None = None
) -> tuple[StorageSettings, bool]:
    """The storage section of a distribution-style config (env already applied) -> settings,
    and whether the registry is read-only. ``env``: the variables Google clients read."""
    env = {} if env is None else env
    storage = config.get("storage") or {}
    drivers = [k for k in storage if k not in ("maintenance", "delete", "redirect", "cache")]
    if len(drivers) != 1:
        found = ", ".join(drivers) or "none"
        raise ConfigError(
            f"{source}: storage must configure exactly one driver ({_SUPPORTED}), found {found}"
        )
    driver = drivers[0]
    params = storage[driver] or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: storage.{driver} must be a mapping")
    maintenance = storage.get("maintenance") or {}
    readonly = (maintenance.get("readonly") or {}) if isinstance(maintenance, dict) else {}
    try:
        read_only = maintenance_read_only(readonly)
    except ValueError:
        raise ConfigError(f"{source}: storage.maintenance.readonly is not valid") from None
    if driver == "filesystem":
        root = str(params.get("rootdirectory") or "/var/lib/registry")
        return StorageSettings("filesystem", root), read_only
    if driver == "s3":
        bucket = params.get("bucket")
        if not bucket:
            raise ConfigError(
                f"{source}: storage.s3.bucket (REGISTRY_STORAGE_S3_BUCKET) is required"
            )
        s3 = S3Settings(
            bucket=str(bucket),
            region=str(params.get("region") or "us-east-1"),
            regionendpoint=params.get("regionendpoint") or None,
            accesskey=params.get("accesskey") or None,
            secretkey=params.get("secretkey") or None,
            secure=_bool(params.get("secure", True)),
            skipverify=_bool(params.get("skipverify", False)),
            forcepathstyle=_bool(params.get("forcepathstyle", False)),
            ca_bundle=params.get("cabundle") or None,
        )
        root = str(params.get("rootdirectory") or "").strip("/")
        return StorageSettings("s3", root, s3), read_only
    if driver == "azure":
        return _azure(params, source), read_only
    if driver == "gcs":
        return _gcs(params, source, env), read_only
    raise ConfigError(
        f"{source}: storage driver {driver!r} is not supported; supported: {_SUPPORTED}"
    )


def _text(params: Mapping[str, Any], key: str) -> str | None:
    value = params.get(key)
    return None if value is None or value == "" else str(value)


def _azure(params: Mapping[str, Any], source: str) -> StorageSettings:
    """distribution's azure section (accountname, accountkey, container, realm, serviceurl,
    rootdirectory, credentials) plus a connectionstring."""
    env = "REGISTRY_STORAGE_AZURE_"
    container = _text(params, "container")
    if not container:
        raise ConfigError(f"{source}: storage.azure.container ({env}CONTAINER) is required")
    creds = params.get("credentials") or {}
    if not isinstance(creds, dict):
        raise ConfigError(f"{source}: storage.azure.credentials must be a mapping")
    kind = str(creds.get("type") or "shared_key").strip().lower()
    # "default": the word the companion's mapping of the operator's config uses (issue 15)
    kind = "default_credentials" if kind == "default" else kind
    if kind not in AZURE_CREDENTIALS:
        raise ConfigError(
            f"{source}: storage.azure.credentials.type ({env}CREDENTIALS_TYPE) {kind!r} "
            f"is not one of {', '.join(AZURE_CREDENTIALS)}"
        )
    settings = AzureSettings(
        container=container,
        accountname=_text(params, "accountname"),
        accountkey=_text(params, "accountkey")
        or (_text(creds, "secret") if kind == "shared_key" else None),
        realm=_text(params, "realm") or "core.windows.net",
        serviceurl=_text(params, "serviceurl"),
        connectionstring=_text(params, "connectionstring"),
        credentials=kind,
        clientid=_text(creds, "clientid"),
        tenantid=_text(creds, "tenantid"),
        secret=_text(creds, "secret"),
    )
    if settings.connectionstring is None:
        if not settings.accountname:
            raise ConfigError(
                f"{source}: storage.azure.accountname ({env}ACCOUNTNAME) is required "
                "(or storage.azure.connectionstring)"
            )
        if kind == "shared_key":
            if not settings.accountkey:
                raise ConfigError(
                    f"{source}: storage.azure.accountkey ({env}ACCOUNTKEY) is required with "
                    "shared_key credentials (or set credentials.type to client_secret or "
                    "default_credentials)"
                )
            try:
                base64.b64decode(settings.accountkey, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(
                    f"{source}: storage.azure.accountkey ({env}ACCOUNTKEY) is not a base64 "
                    "account key (copy it from the storage account's access keys)"
                ) from None
        if kind == "client_secret":
            missing = [k for k in ("clientid", "tenantid", "secret") if not _text(creds, k)]
            if missing:
                names = ", ".join(f"storage.azure.credentials.{k}" for k in missing)
                raise ConfigError(f"{source}: client_secret credentials need {names}")
    url = settings.serviceurl
    if url is not None and not re.match(r"https?://[^/]+", url):
        raise ConfigError(
            f"{source}: storage.azure.serviceurl ({env}SERVICEURL) {url!r} is not an http(s) URL"
        )
    root = str(params.get("rootdirectory") or "").strip("/")
    return StorageSettings("azure", root, azure=settings)


def _gcs(params: Mapping[str, Any], source: str, env: Mapping[str, str]) -> StorageSettings:
    """distribution's gcs section (bucket, keyfile, credentials, rootdirectory), then
    Application Default Credentials; STORAGE_EMULATOR_HOST points at an emulator."""
    bucket = _text(params, "bucket")
    if not bucket:
        raise ConfigError(f"{source}: storage.gcs.bucket (REGISTRY_STORAGE_GCS_BUCKET) is required")
    keyfile = _text(params, "keyfile")
    credentials: str | None = None
    if keyfile is not None:
        _service_account(Path(keyfile), source)
    inline = params.get("credentials")
    if inline:
        if not isinstance(inline, dict):
            raise ConfigError(f"{source}: storage.gcs.credentials must be a mapping")
        creds = {str(k): v for k, v in inline.items()}
        missing = [k for k in ("type", "client_email", "private_key") if not creds.get(k)]
        if missing:
            raise ConfigError(
                f"{source}: storage.gcs.credentials lacks {', '.join(missing)} "
                "(a service account key's fields)"
            )
        credentials = json.dumps(creds)
    emulator = (env.get("STORAGE_EMULATOR_HOST") or "").strip() or None
    if emulator is not None and "://" not in emulator:
        emulator = f"http://{emulator}"
    gcs = GCSSettings(bucket, keyfile, credentials, emulator.rstrip("/") if emulator else None)
    root = str(params.get("rootdirectory") or "").strip("/")
    return StorageSettings("gcs", root, gcs=gcs)


def _service_account(path: Path, source: str) -> None:
    """A keyfile must be a readable service-account (or user) JSON key."""
    setting = "storage.gcs.keyfile (REGISTRY_STORAGE_GCS_KEYFILE)"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{source}: {setting} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{source}: {setting} {path} cannot be read: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{source}: {setting} {path} is not a JSON key file") from None
    if not isinstance(data, dict) or not data.get("type"):
        raise ConfigError(f"{source}: {setting} {path} is not a Google credentials file")


def load_settings(
    registry_config: Path | None,
    env: Mapping[str, str] | None = None,
    *,
    storage_config: Mapping[str, Any] | None = None,
    storage_origin: str = "",
    **overrides: Any,
) -> Settings:
    """Build Settings from the registry config file, the environment and explicit overrides.

    ``storage_config`` (a registry config's ``{"storage": ...}``, named ``storage_origin`` in
    errors) replaces the file and the REGISTRY_STORAGE_* variables: --storage-from."""
    env = os.environ if env is None else env
    if storage_config is not None:
        return _from_storage_config(storage_config, storage_origin, env, overrides)
    explicit = registry_config is not None
    default = env.get("REGISTRY_CONFIGURATION_PATH") or DEFAULT_REGISTRY_CONFIG
    path = registry_config or Path(default)
    has_env_storage = any(k.startswith("REGISTRY_STORAGE") for k in env)
    config = _load_file(path, required=explicit or not has_env_storage)
    config = _apply_env(config, env)
    storage, read_only = _storage(config, str(path) if config else "environment", env)
    if _bool(env.get("REGISTRY_STORAGE_MAINTENANCE_READONLY_ENABLED", read_only)):
        read_only = True
    values = {k: v for k, v in overrides.items() if v is not None}
    if values.get("source", "storage") not in SOURCES:
        raise ConfigError(f"source must be one of {', '.join(SOURCES)}")
    return Settings(
        storage=storage,
        registry_config=path if config else None,
        registry_read_only=read_only,
        **values,
    )


def _from_storage_config(
    storage_config: Mapping[str, Any],
    origin: str,
    env: Mapping[str, str],
    overrides: Mapping[str, Any],
) -> Settings:
    """Settings whose storage is ``storage_config``; no file, no REGISTRY_STORAGE_* variables."""
    values = {k: v for k, v in overrides.items() if v is not None}
    if values.get("source", "storage") not in SOURCES:
        raise ConfigError(f"source must be one of {', '.join(SOURCES)}")
    config = dict(storage_config)  # _storage only reads it
    # the registry's read-only state is not in its storage config here: the default (False)
    # refuses deletes unless the reference source can tell (openshift: spec.readOnly)
    storage, _read_only = _storage(config, origin or "storage config", env)
    return Settings(storage=storage, **values)
