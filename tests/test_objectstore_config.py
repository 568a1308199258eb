"""Azure and GCS configuration as distribution reads it: every key of the config file, every
REGISTRY_STORAGE_* variable, and a clear error naming the setting for each mistake."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.config import AzureSettings, ConfigError, GCSSettings, StorageSettings, load_settings
from tests.conftest import pruned

KEY = "c2VjcmV0LWFjY291bnQta2V5LTAxMjM0NTY3ODk="  # base64, as Azure's account keys are
SERVICE_ACCOUNT = {
    "type": "service_account",
    "project_id": "p",
    "private_key_id": "k",
    "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    "client_email": "pruner@p.iam.gserviceaccount.com",
    "client_id": "1",
    "token_uri": "https://oauth2.googleapis.com/token",
}


def from_file(tmp_path: Path, storage: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"version": 0.1, "storage": storage}))
    return load_settings(path, env=env or {}).storage


def from_env(env: dict[str, str]) -> StorageSettings:
    return load_settings(None, env=env).storage


def test_azure_every_key_of_the_config_file(tmp_path: Path) -> None:
    section = {
        "accountname": "acct",
        "accountkey": KEY,
        "container": "registry",
        "rootdirectory": "/a/b/",
        "realm": "core.chinacloudapi.cn",
    }
    storage = from_file(tmp_path, {"azure": section})
    assert storage == StorageSettings(
        "azure",
        "a/b",
        azure=AzureSettings(
            container="registry",
            accountname="acct",
            accountkey=KEY,
            realm="core.chinacloudapi.cn",
        ),
    )
    assert storage.azure.url == "https://acct.blob.core.chinacloudapi.cn"  # from the realm
    assert storage.describe() == "azure://acct/registry/a/b"
    served = from_file(tmp_path, {"azure": {**section, "serviceurl": "http://127.0.0.1:1/acct/"}})
    assert served.azure.url == "http://127.0.0.1:1/acct"
    assert from_file(tmp_path, {"azure": {**section, "realm": None}}).azure.url == (
        "https://acct.blob.core.windows.net"
    )
    connection = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=" + KEY
    only = from_file(tmp_path, {"azure": {"connectionstring": connection, "container": "c"}})
    assert only.azure.connectionstring == connection and only.azure.accountname is None
    secret = {
        "type": "client_secret",
        "clientid": "app-id",
        "tenantid": "tenant-id",
        "secret": "app-secret",
    }
    client = from_file(
        tmp_path, {"azure": {"accountname": "acct", "container": "c", "credentials": secret}}
    )
    assert (client.azure.credentials, client.azure.clientid, client.azure.tenantid) == (
        "client_secret",
        "app-id",
        "tenant-id",
    )
    assert client.azure.secret == "app-secret" and "app-secret" not in repr(client)
    workload = {
        "accountname": "acct",
        "container": "c",
        "credentials": {"type": "default_credentials"},
    }
    assert from_file(tmp_path, {"azure": workload}).azure.credentials == "default_credentials"
    workload["credentials"] = {"type": "default"}  # as the companion maps workload identity
    assert from_file(tmp_path, {"azure": workload}).azure.credentials == "default_credentials"
    shared = {
        "accountname": "acct",
        "container": "c",
        "credentials": {"type": "shared_key", "secret": KEY},
    }
    assert from_file(tmp_path, {"azure": shared}).azure.accountkey == KEY


def test_azure_every_variable() -> None:
    env = {
        "REGISTRY_STORAGE": "azure",
        "REGISTRY_STORAGE_AZURE_ACCOUNTNAME": "acct",
        "REGISTRY_STORAGE_AZURE_ACCOUNTKEY": KEY,
        "REGISTRY_STORAGE_AZURE_CONTAINER": "registry",
        "REGISTRY_STORAGE_AZURE_ROOTDIRECTORY": "/root",
        "REGISTRY_STORAGE_AZURE_REALM": "core.usgovcloudapi.net",
        "REGISTRY_STORAGE_AZURE_SERVICEURL": "https://acct.privatelink.example",
    }
    storage = from_env(env)
    assert storage.rootdirectory == "root"
    assert storage.azure == AzureSettings(
        container="registry",
        accountname="acct",
        accountkey=KEY,
        realm="core.usgovcloudapi.net",
        serviceurl="https://acct.privatelink.example",
    )
    identity = from_env(
        {
            "REGISTRY_STORAGE": "azure",
            "REGISTRY_STORAGE_AZURE_ACCOUNTNAME": "acct",
            "REGISTRY_STORAGE_AZURE_CONTAINER": "c",
            "REGISTRY_STORAGE_AZURE_CREDENTIALS_TYPE": "client_secret",
            "REGISTRY_STORAGE_AZURE_CREDENTIALS_CLIENTID": "app",
            "REGISTRY_STORAGE_AZURE_CREDENTIALS_TENANTID": "tenant",
            "REGISTRY_STORAGE_AZURE_CREDENTIALS_SECRET": "s3cret",
        }
    ).azure
    assert (identity.credentials, identity.clientid, identity.tenantid, identity.secret) == (
        "client_secret",
        "app",
        "tenant",
        "s3cret",
    )
    connection = from_env(
        {
            "REGISTRY_STORAGE": "azure",
            "REGISTRY_STORAGE_AZURE_CONNECTIONSTRING": "AccountName=a;AccountKey=" + KEY,
            "REGISTRY_STORAGE_AZURE_CONTAINER": "c",
        }
    ).azure
    assert connection.connectionstring == "AccountName=a;AccountKey=" + KEY


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ({"accountname": "a", "accountkey": KEY}, "storage.azure.container"),
        ({"accountkey": KEY, "container": "c"}, "storage.azure.accountname"),
        ({"accountname": "a", "container": "c"}, "storage.azure.accountkey"),
        ({"accountname": "a", "accountkey": "not base64!", "container": "c"}, "accountkey"),
        (
            {"accountname": "a", "container": "c", "credentials": {"type": "password"}},
            "storage.azure.credentials.type",
        ),
        (
            {
                "accountname": "a",
                "container": "c",
                "credentials": {"type": "client_secret", "clientid": "x"},
            },
            "storage.azure.credentials.tenantid, storage.azure.credentials.secret",
        ),
        (
            {"accountname": "a", "accountkey": KEY, "container": "c", "serviceurl": "acct.blob"},
            "storage.azure.serviceurl",
        ),
    ],
)
def test_azure_mistakes_name_the_setting(tmp_path: Path, section: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        from_file(tmp_path, {"azure": section})


def test_gcs_every_key_and_variable(tmp_path: Path) -> None:
    keyfile = tmp_path / "keyfile"
    keyfile.write_text(json.dumps(SERVICE_ACCOUNT))
    storage = from_file(
        tmp_path, {"gcs": {"bucket": "b", "rootdirectory": "/r/", "keyfile": str(keyfile)}}
    )
    assert storage == StorageSettings("gcs", "r", gcs=GCSSettings("b", keyfile=str(keyfile)))
    assert storage.describe() == "gs://b/r"
    inline = from_file(tmp_path, {"gcs": {"bucket": "b", "credentials": SERVICE_ACCOUNT}})
    assert json.loads(inline.gcs.credentials) == SERVICE_ACCOUNT
    assert "PRIVATE KEY" not in repr(inline)
    # Application Default Credentials: neither keyfile nor credentials
    assert from_file(tmp_path, {"gcs": {"bucket": "b"}}).gcs == GCSSettings("b")
    env = {
        "REGISTRY_STORAGE": "gcs",
        "REGISTRY_STORAGE_GCS_BUCKET": "eb",
        "REGISTRY_STORAGE_GCS_ROOTDIRECTORY": "/er",
        "REGISTRY_STORAGE_GCS_KEYFILE": str(keyfile),
        "STORAGE_EMULATOR_HOST": "127.0.0.1:4443",
    }
    from_vars = from_env(env)
    assert from_vars.rootdirectory == "er"
    assert from_vars.gcs == GCSSettings(
        "eb", keyfile=str(keyfile), emulator="http://127.0.0.1:4443"
    )
    # a credentials map through variables: its keys keep their '_' (private_key_id)
    env = {"REGISTRY_STORAGE": "gcs", "REGISTRY_STORAGE_GCS_BUCKET": "b"}
    env.update(
        (f"REGISTRY_STORAGE_GCS_CREDENTIALS_{k.upper()}", v) for k, v in SERVICE_ACCOUNT.items()
    )
    assert json.loads(from_env(env).gcs.credentials) == SERVICE_ACCOUNT


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ({"rootdirectory": "/r"}, "storage.gcs.bucket"),
        ({"bucket": "b", "keyfile": "/nonexistent/keyfile"}, "storage.gcs.keyfile"),
        ({"bucket": "b", "keyfile": "{config}"}, "is not a JSON key file"),
        ({"bucket": "b", "credentials": {"type": "service_account"}}, "client_email, private_key"),
    ],
)
def test_gcs_mistakes_name_the_setting(tmp_path: Path, section: dict, named: str) -> None:
    if section.get("keyfile") == "{config}":
        section["keyfile"] = str(tmp_path / "not-json")
        (tmp_path / "not-json").write_text("not json")
    with pytest.raises(ConfigError, match=named):
        from_file(tmp_path, {"gcs": section})


@pytest.mark.parametrize("driver", ["swift", "oss"])
def test_other_drivers_are_refused_in_one_line(tmp_path: Path, driver: str) -> None:
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"version": 0.1, "storage": {driver: {"container": "x"}}}))
    result = pruned("check", "--registry-config", config)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert f"'{driver}' is not supported" in result.stderr
    assert "filesystem, s3, azure, gcs" in result.stderr


def test_a_mistake_through_the_cli_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = pruned(
        "check",
        env={
            "REGISTRY_CONFIGURATION_PATH": str(tmp_path / "none.yml"),
            "REGISTRY_STORAGE": "azure",
            "REGISTRY_STORAGE_AZURE_ACCOUNTNAME": "acct",
            "REGISTRY_STORAGE_AZURE_ACCOUNTKEY": "not-a-key",
            "REGISTRY_STORAGE_AZURE_CONTAINER": "c",
        },
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "REGISTRY_STORAGE_AZURE_ACCOUNTKEY" in result.stderr
