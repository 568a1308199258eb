"""``--storage-from openshift``: the operator's storage config and secret configure the drivers.

The mapping is checked key by key for every kind the operator knows; end to end, a companion
daemon on a store the real registry wrote (filesystem through a claim, S3 on SeaweedFS) finds
exactly the candidates of an explicit ``--registry-config`` for the same store.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import ConfigError, load_settings
from daemon.operator_storage import (
    AZURE_ACCOUNTKEY,
    DEFAULT_CA_FILE,
    GCS_KEYFILE,
    S3_ACCESSKEY,
    S3_CREDENTIALS,
    S3_SECRETKEY,
    Mounts,
    select_storage,
    storage_config,
)
from tests.conftest import would_delete
from tests.harness.daemon import Daemon
from tests.harness.fake_openshift import FakeCluster, FakeOpenShift, aws_credentials
from tests.harness.fake_openshift import write_secret_volume as secret_volume
from tests.harness.openshift_scenario import Pushed, cluster_for, push_scenario, run_cli
from tests.harness.registry import Registry, running_registry
from tests.harness.seaweed import SeaweedFS

ROOT = Path(__file__).resolve().parent.parent
CLAIM = "image-registry-storage"


def operator_config(status: dict[str, Any] | None, spec: dict[str, Any] | None = None) -> dict:
    """A Config object as the API serves it, with ``status.storage`` / ``spec.storage``."""
    doc: dict[str, Any] = {
        "apiVersion": "imageregistry.operator.openshift.io/v1",
        "kind": "Config",
        "metadata": {"name": "cluster"},
        "spec": {"managementState": "Managed"},
        "status": {"readyReplicas": 2},
    }
    if status is not None:
        doc["status"]["storage"] = {**status, "managementState": "Managed"}
    if spec is not None:
        doc["spec"]["storage"] = spec
    return doc


def s3_status(**extra: Any) -> dict[str, Any]:
    return {
        "s3": {
            "bucket": "image-registry-us-east-1-abc",
            "region": "us-east-1",
            "virtualHostedStyle": False,
            "encrypt": True,
            **extra,
        }
    }


@pytest.fixture
def secret(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "secret"


# -- the mapping, kind by kind -------------------------------------------------------------------


def test_s3_maps_to_distribution_keys_and_parses_like_a_registry_config(
    secret: Path, tmp_path: Path
) -> None:
    secret_volume(secret, {S3_CREDENTIALS: aws_credentials("AKIAEXAMPLE", "s3cr3t/+=")})
    mounts = Mounts(secret_dir=secret)
    # AWS itself: no endpoint, the client's own addressing
    config = storage_config(operator_config(s3_status()), mounts)
    assert config == {
        "storage": {
            "s3": {
                "bucket": "image-registry-us-east-1-abc",
                "region": "us-east-1",
                "virtualhostedstyle": False,
                "encrypt": True,
                "accesskey": "AKIAEXAMPLE",
                "secretkey": "s3cr3t/+=",
            }
        }
    }
    settings = load_settings(None, env={}, storage_config=config)
    assert settings.storage.driver == "s3" and settings.storage.rootdirectory == ""
    s3 = settings.storage.s3
    assert s3 is not None
    assert (s3.bucket, s3.region, s3.regionendpoint) == (
        "image-registry-us-east-1-abc",
        "us-east-1",
        None,
    )
    assert (s3.accesskey, s3.secretkey, s3.forcepathstyle) == ("AKIAEXAMPLE", "s3cr3t/+=", False)
    assert settings.registry_config is None and settings.registry_read_only is False
    # an S3-compatible endpoint: path style unless virtual-hosted is asked, scheme kept
    for endpoint, virtual, url, secure, path_style in (
        ("https://s3.odf.example:443", False, "https://s3.odf.example:443", True, True),
        ("http://minio.local:9000", False, "http://minio.local:9000", False, True),
        ("s3.example.com", True, "https://s3.example.com", True, False),
    ):
        params = storage_config(
            operator_config(s3_status(regionEndpoint=endpoint, virtualHostedStyle=virtual)),
            mounts,
        )["storage"]["s3"]
        assert (params["regionendpoint"], params["secure"]) == (url, secure)
        assert params["forcepathstyle"] is path_style
        parsed = load_settings(None, env={}, storage_config={"storage": {"s3": params}}).storage
        assert parsed.s3 is not None and parsed.s3.regionendpoint == url
        assert parsed.s3.secure is secure and parsed.s3.forcepathstyle is path_style


def test_user_secret_keys_take_precedence_over_the_credentials_file(secret: Path) -> None:
    secret_volume(
        secret,
        {
            S3_CREDENTIALS: aws_credentials("MINTED", "minted-secret"),
            S3_ACCESSKEY: "USERKEY\n",
            S3_SECRETKEY: "user-secret\n",
        },
    )
    params = storage_config(operator_config(s3_status()), Mounts(secret_dir=secret))
    assert params["storage"]["s3"]["accesskey"] == "USERKEY"
    assert params["storage"]["s3"]["secretkey"] == "user-secret"


def test_ibmcos_is_the_s3_driver_on_the_regional_endpoint(secret: Path) -> None:
    secret_volume(secret, {S3_CREDENTIALS: aws_credentials("hmac-id", "hmac-secret")})
    status = {
        "ibmcos": {
            "bucket": "registry-bucket",
            "location": "eu-de",
            "resourceGroupName": "rg",
            "serviceInstanceCRN": "crn:v1:instance",
            "resourceKeyCRN": "crn:v1:key",
        }
    }
    params = storage_config(operator_config(status), Mounts(secret_dir=secret))["storage"]["s3"]
    assert params == {
        "bucket": "registry-bucket",
        "region": "eu-de",
        "regionendpoint": "https://s3.eu-de.cloud-object-storage.appdomain.cloud",
        "secure": True,
        "forcepathstyle": True,
        "accesskey": "hmac-id",
        "secretkey": "hmac-secret",
    }


def test_trusted_ca_is_the_operators_copy_or_the_given_file(secret: Path, tmp_path: Path) -> None:
    secret_volume(secret, {S3_CREDENTIALS: aws_credentials("k", "s")})
    status = s3_status(regionEndpoint="https://s3.internal", trustedCA={"name": "s3-ca"})
    bundle = tmp_path / "ca" / "storage-ca-bundle.pem"
    # not mounted: the error names the field, the ConfigMap and the flag
    with pytest.raises(ConfigError) as err:
        storage_config(operator_config(status), Mounts(secret_dir=secret, ca_file=bundle))
    text = str(err.value)
    assert "status.storage.s3.trustedCA" in text and "'s3-ca'" in text
    assert "image-registry-certificates" in text and "--storage-ca-file" in text
    assert str(bundle) in text
    # without --storage-ca-file the default path is the one named
    with pytest.raises(ConfigError, match=str(DEFAULT_CA_FILE)):
        storage_config(operator_config(status), Mounts(secret_dir=secret))
    bundle.parent.mkdir()
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    params = storage_config(operator_config(status), Mounts(secret_dir=secret, ca_file=bundle))
    settings = load_settings(None, env={}, storage_config=params)
    assert settings.storage.s3 is not None and settings.storage.s3.ca_bundle == str(bundle)
    # no trustedCA: the system's trust, unless a file is given
    plain = storage_config(operator_config(s3_status()), Mounts(secret_dir=secret))
    assert "cabundle" not in plain["storage"]["s3"]


def test_azure_maps_to_distribution_keys(secret: Path, tmp_path: Path) -> None:
    secret_volume(secret, {AZURE_ACCOUNTKEY: "YWNjb3VudGtleQ==\n"})
    status = {"azure": {"accountName": "imageregistryabc", "container": "registry"}}
    params = storage_config(operator_config(status), Mounts(secret_dir=secret))
    assert params == {
        "storage": {
            "azure": {
                "accountname": "imageregistryabc",
                "container": "registry",
                "accountkey": "YWNjb3VudGtleQ==",
            }
        }
    }
    for cloud, realm in (
        ("AzurePublicCloud", "core.windows.net"),
        ("AzureUSGovernmentCloud", "core.usgovcloudapi.net"),
        ("AzureChinaCloud", "core.chinacloudapi.cn"),
    ):
        status["azure"]["cloudName"] = cloud
        azure = storage_config(operator_config(status), Mounts(secret_dir=secret))
        assert azure["storage"]["azure"]["realm"] == realm
    status["azure"]["cloudName"] = "AzureStackCloud"
    with pytest.raises(ConfigError, match=r"status\.storage\.azure\.cloudName 'AzureStackCloud'"):
        storage_config(operator_config(status), Mounts(secret_dir=secret))
    # workload identity: no key in the secret, a federated token in the pod
    del status["azure"]["cloudName"]
    empty = secret_volume(tmp_path / "empty", {})
    token = tmp_path / "token"
    token.write_text("eyJ...")
    federated = storage_config(
        operator_config(status), Mounts(secret_dir=empty, azure_federated_token=str(token))
    )
    assert federated["storage"]["azure"]["credentials"] == {"type": "default"}
    assert "accountkey" not in federated["storage"]["azure"]
    with pytest.raises(ConfigError, match=f"secret key {AZURE_ACCOUNTKEY} not found"):
        storage_config(operator_config(status), Mounts(secret_dir=empty))


def test_gcs_maps_to_distribution_keys(secret: Path) -> None:
    secret_volume(secret, {GCS_KEYFILE: json.dumps({"type": "service_account"})})
    params = storage_config(
        operator_config({"gcs": {"bucket": "registry-gcs", "region": "us-east1"}}),
        Mounts(secret_dir=secret),
    )
    # distribution's keyfile is a path: the mounted key itself
    assert params == {
        "storage": {"gcs": {"bucket": "registry-gcs", "keyfile": str(secret / GCS_KEYFILE)}}
    }
    assert json.loads(Path(params["storage"]["gcs"]["keyfile"]).read_text())


def test_pvc_is_the_filesystem_at_the_mount(tmp_path: Path) -> None:
    mount = tmp_path / "registry"
    status = {"pvc": {"claim": CLAIM}}
    with pytest.raises(ConfigError) as err:
        storage_config(operator_config(status), Mounts(pvc_mount=str(mount)))
    assert f"status.storage.pvc.claim is {CLAIM!r}" in str(err.value)
    assert "--pvc-mount" in str(err.value)
    mount.mkdir()
    params = storage_config(operator_config(status), Mounts(pvc_mount=str(mount)))
    assert params == {"storage": {"filesystem": {"rootdirectory": str(mount)}}}
    settings = load_settings(None, env={}, storage_config=params)
    assert (settings.storage.driver, settings.storage.rootdirectory) == ("filesystem", str(mount))
    # the manifest's claim must be the operator's
    with pytest.raises(ConfigError, match="mounts the claim 'other'"):
        storage_config(operator_config(status), Mounts(pvc_mount=str(mount), pvc_claim="other"))
    assert (
        storage_config(operator_config(status), Mounts(pvc_mount=str(mount), pvc_claim=CLAIM))
        == params
    )


def test_status_storage_is_preferred_over_spec_storage() -> None:
    status = {"pvc": {"claim": "applied"}}
    spec = {"pvc": {"claim": "asked-for"}, "managementState": "Managed"}
    assert select_storage(operator_config(status, spec))[1:] == ({"claim": "applied"}, "status")
    # not reported yet: what was asked for, and errors name the part that was read
    assert select_storage(operator_config(None, spec))[1:] == ({"claim": "asked-for"}, "spec")
    with pytest.raises(ConfigError, match=r"cluster spec\.storage\.s3\.bucket is missing"):
        storage_config(operator_config(None, {"s3": {"region": "r"}}), Mounts())


@pytest.mark.parametrize(
    ("status", "secret_data", "message"),
    [
        (s3_status(), {"credential": "typo"}, f"secret key {S3_CREDENTIALS} not found in"),
        (s3_status(), {S3_ACCESSKEY: "only-half"}, f"secret key {S3_SECRETKEY} not found in"),
        (s3_status(), {S3_CREDENTIALS: "[other]\nx = 1\n"}, "has no [default] profile"),
        (
            s3_status(),
            {S3_CREDENTIALS: "[default]\naws_access_key_id = k\n"},
            "[default] has no aws_secret_access_key",
        ),
        (
            s3_status(),
            {S3_CREDENTIALS: "[default]\nrole_arn = arn:x\nweb_identity_token_file = /t\n"},
            "web identity (STS)",
        ),
        ({"s3": {"region": "us-east-1"}}, {}, "status.storage.s3.bucket is missing"),
        ({"azure": {"container": "c"}}, {}, "status.storage.azure.accountName is missing"),
        ({"gcs": {"bucket": "b"}}, {}, f"secret key {GCS_KEYFILE} not found"),
        ({"swift": {"container": "c"}}, {}, "status.storage.swift: the registry stores on"),
        ({"emptyDir": {}}, {}, "status.storage.emptyDir"),
        ({"oss": {"bucket": "b"}}, {}, "status.storage.oss"),
        ({"pvc": {}}, {}, "status.storage.pvc.claim is missing"),
        (None, {}, "has no status.storage and no spec.storage"),
    ],
)
def test_what_cannot_be_served_is_named(
    secret: Path, status: dict | None, secret_data: dict[str, str], message: str
) -> None:
    secret_volume(secret, secret_data)
    with pytest.raises(ConfigError) as err:
        storage_config(operator_config(status), Mounts(secret_dir=secret))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# -- start-up through the real CLI ---------------------------------------------------------------


async def _cli(api: FakeOpenShift, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon",
        *args,
        "--source",
        "openshift",
        "--storage-from",
        "openshift",
        "--kubeconfig",
        str(kubeconfig),
        "--grace",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "KUBECONFIG": ""},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_start_up_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    cluster = FakeCluster(read_only=True)
    wrong = secret_volume(tmp_path / "wrong", {"credential": aws_credentials("k", "s")})
    cases: list[tuple[dict | None, list[str], str]] = [
        (s3_status(), ["--storage-secret-dir", str(wrong)], "secret key credentials not found"),
        ({"s3": {"region": "r"}}, [], "status.storage.s3.bucket is missing"),
        ({"swift": {"container": "c"}}, [], "status.storage.swift"),
        (None, [], "has no status.storage and no spec.storage"),
        (
            {"pvc": {"claim": CLAIM}},
            ["--registry-config", str(tmp_path / "config.yml")],
            "--storage-from openshift replaces --registry-config",
        ),
    ]
    async with FakeOpenShift(cluster) as api:
        for status, extra, message in cases:
            cluster.storage = status
            state = ["--state-dir", str(tmp_path / "state")]
            answers = await asyncio.gather(
                _cli(api, tmp_path, "check", *extra, *state),
                _cli(api, tmp_path, "serve", *extra, *state, "--listen", "127.0.0.1:0"),
            )
            for code, out, err in answers:
                assert code == 2, (status, out, err)
                assert "Traceback" not in err
                (line,) = err.strip().splitlines()
                assert line.startswith("error: ") and message in line, line
        # the API's refusal is a start-up error too
        cluster.storage = {"pvc": {"claim": CLAIM}}
        cluster.forbid("configs")
        code, _out, err = await _cli(api, tmp_path, "check")
        assert code == 2 and "Traceback" not in err
        assert "403" in err and "get configs.imageregistry.operator.openshift.io" in err


# -- end to end: the companion finds what an explicit config finds -------------------------------


def _candidates(daemon: Daemon) -> tuple[dict[str, Any], set[str]]:
    status, doc = daemon.json("POST", "/prune?mode=check&grace=0")
    assert status == 202, doc
    done = daemon.wait_done(doc["id"])
    assert done["state"] == "succeeded", done
    _status, _headers, body = daemon.get(f"/runs/{done['id']}/candidates")
    return done, {json.loads(line)["digest"] for line in body.decode().splitlines()}


async def _compare(
    registry: Registry,
    images: dict[str, Pushed],
    storage: dict[str, Any],
    tmp_path: Path,
    *companion_args: str,
) -> set[str]:
    """The companion's candidates == those of ``check --registry-config`` on the same store."""
    cluster = cluster_for(images, skip={"app2"})
    cluster.storage = {**storage, "managementState": "Managed"}
    async with FakeOpenShift(cluster) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        code, _out, err = await run_cli(
            registry, "check", "--log-level", "info", "--log-format", "text", kubeconfig=kubeconfig
        )
        assert code == 0, err
        expected = would_delete(err)
        daemon = Daemon(
            None,
            tmp_path / "state",
            "--source",
            "openshift",
            "--storage-from",
            "openshift",
            "--kubeconfig",
            str(kubeconfig),
            *companion_args,
        )
        await asyncio.to_thread(daemon.start)
        try:
            done, found = await asyncio.to_thread(_candidates, daemon)
            status, _h, body = await asyncio.to_thread(daemon.get, "/readyz")
            assert status == 200, body
        finally:
            daemon.stop()
    (line,) = [
        json.loads(line)
        for line in daemon.log.read_text().splitlines()
        if "storage from the image registry operator" in line
    ]
    assert (line["kind"], line["field"]) == (next(iter(storage)), "status.storage")
    # app2's own layer, config and manifest: the shared base stays
    assert expected == images["app2"].digests() - {images["app2"].blobs[0].digest}
    assert found == expected
    assert done["summary"]["blobs"] == len(expected)
    assert done["summary"]["repositories"] == 2 and done["summary"]["manifest_links"] == 1
    return json.loads(body)["storage"]


async def test_pvc_companion_finds_what_the_registry_config_finds(
    openshift_store: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, images = openshift_store
    described = await _compare(
        registry,
        images,
        {"pvc": {"claim": CLAIM}},
        tmp_path,
        "--pvc-mount",
        str(registry.root),
        "--pvc-claim",
        CLAIM,
        "--storage-secret-dir",
        str(tmp_path / "not-mounted"),
    )
    assert described.startswith(f"filesystem:{registry.root}")


@pytest.fixture(scope="module")
def weed() -> Iterator[SeaweedFS]:
    # https too, with a CA of its own: the trustedCA of an S3-compatible store
    with SeaweedFS(tls=True) as server:
        yield server


async def test_s3_companion_finds_what_the_registry_config_finds(
    weed: SeaweedFS, tmp_path: Path
) -> None:
    bucket = weed.create_bucket("companion")
    params = {
        "bucket": bucket,
        "region": weed.region,
        "regionendpoint": weed.endpoint,
        "accesskey": weed.access_key,
        "secretkey": weed.secret_key,
    }
    status = {
        "s3": {
            "bucket": bucket,
            "region": weed.region,
            "regionEndpoint": weed.endpoint,
            "virtualHostedStyle": False,
            "encrypt": False,
        }
    }
    # S3 answers HEAD on a blob with a redirect the registry's own HEAD cannot follow
    redirect = {"REGISTRY_STORAGE_REDIRECT_DISABLE": "true"}
    with running_registry(tmp_path / "registry", s3=params, env=redirect) as registry:
        images = await asyncio.to_thread(push_scenario, registry)
        secret = secret_volume(
            tmp_path / "secret", {S3_CREDENTIALS: aws_credentials(weed.access_key, weed.secret_key)}
        )
        described = await _compare(
            registry, images, status, tmp_path, "--storage-secret-dir", str(secret)
        )
        assert described.startswith(f"s3://{bucket}/")
        # the -user keys win over a credentials file that would be refused
        user = secret_volume(
            tmp_path / "user",
            {
                S3_CREDENTIALS: aws_credentials("minted", "not-a-seaweed-key"),
                S3_ACCESSKEY: weed.access_key,
                S3_SECRETKEY: weed.secret_key,
            },
        )
        cluster = cluster_for(images, skip={"app2"})
        cluster.storage = status
        logged = ["--log-level", "info", "--log-format", "text"]
        async with FakeOpenShift(cluster) as api:
            code, _out, err = await _cli(
                api, tmp_path, "check", "--storage-secret-dir", str(user), *logged
            )
            assert code == 0, err
            assert would_delete(err) == images["app2"].digests() - {images["app2"].blobs[0].digest}
            # over https with a private CA (trustedCA): the operator's copy of the bundle
            tls = {"regionEndpoint": weed.https_endpoint, "trustedCA": {"name": "s3-ca"}}
            cluster.storage = {"s3": {**status["s3"], **tls}}
            code, _out, err = await _cli(
                api,
                tmp_path,
                "check",
                "--storage-secret-dir",
                str(secret),
                "--storage-ca-file",
                str(weed.ca_bundle),
                *logged,
            )
            assert code == 0, err
            assert would_delete(err) == images["app2"].digests() - {images["app2"].blobs[0].digest}
            # the system's trust alone does not know that CA: the run fails, nothing is found
            cluster.storage = {"s3": {**status["s3"], "regionEndpoint": weed.https_endpoint}}
            code, _out, err = await _cli(
                api, tmp_path, "check", "--storage-secret-dir", str(secret)
            )
            assert code != 0 and "certificate" in err.lower(), err
