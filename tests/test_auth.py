"""Auth (TokenReview + SubjectAccessReview) against the fake OpenShift API: in-process and real."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiohttp.test_utils import TestClient, TestServer

from daemon import logs
from daemon.api import READINESS, build
from daemon.auth import Authenticator, auth_enabled, create_reviewer, is_loopback
from daemon.config import ConfigError, Settings, load_settings
from tests.conftest import pruned
from tests.harness.daemon import Daemon
from tests.harness.fake_openshift import PRUNER_USER, FakeCluster, FakeOpenShift
from tests.harness.registry import free_port

READER, READER_TOKEN = "system:serviceaccount:ci:reader", "reader-token-0123456789"
DELETER, DELETER_TOKEN = "system:serviceaccount:ci:deleter", "deleter-token-abcdefabcdef"
NOBODY_TOKEN = "nobody-token-9f9f9f9f9f"  # authenticated, no rights
BAD_TOKEN = "not-a-known-token-5a5a5a"
IMAGES = "images.image.openshift.io"
ALL_TOKENS = (READER_TOKEN, DELETER_TOKEN, NOBODY_TOKEN, BAD_TOKEN)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cluster() -> FakeCluster:
    """Three callers; the daemon's own account may create the reviews (rbac on, as in a pod)."""
    fake = FakeCluster(rbac=True)
    fake.allow(PRUNER_USER, "create", "tokenreviews.authentication.k8s.io")
    fake.allow(PRUNER_USER, "create", "subjectaccessreviews.authorization.k8s.io")
    fake.add_token(READER_TOKEN, READER, groups=["system:serviceaccounts"])
    fake.add_token(DELETER_TOKEN, DELETER)
    fake.add_token(NOBODY_TOKEN, "system:serviceaccount:ci:nobody")
    fake.allow(READER, "get", IMAGES)
    fake.allow(DELETER, "get", IMAGES)
    fake.allow(DELETER, "delete", IMAGES)
    return fake


def store_config(tmp_path: Path, read_only: bool = False) -> Path:
    """A registry config over an empty filesystem store: a valid, empty store."""
    root = tmp_path / "store"
    root.mkdir()
    config = tmp_path / "config.yml"
    storage: dict[str, Any] = {"filesystem": {"rootdirectory": str(root)}}
    if read_only:
        storage["maintenance"] = {"readonly": {"enabled": True}}
    config.write_text(yaml.safe_dump({"storage": storage}))
    return config


def reviews(fake: FakeOpenShift, kind: str) -> int:
    return sum(1 for _m, path, _q in fake.cluster.requests if path.endswith(kind))


@pytest_asyncio.fixture(loop_scope="function")
async def api() -> AsyncIterator[FakeOpenShift]:
    async with FakeOpenShift(cluster()) as server:
        yield server


class App:
    """The daemon's app in-process with auth on, its log captured."""

    def __init__(self, client: TestClient, auth: Authenticator, log: io.StringIO) -> None:
        self.client, self.auth, self.log = client, auth, log

    async def call(
        self, method: str, path: str, token: str | None = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        resp = await self.client.request(method, path, headers=bearer(token) if token else {})
        text = await resp.text()
        body = json.loads(text) if resp.content_type == "application/json" else {"text": text}
        return resp.status, body, dict(resp.headers)


@pytest_asyncio.fixture(loop_scope="function")
async def make_app(api: FakeOpenShift, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    clients: list[TestClient] = []

    async def make(
        review_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        read_only: bool = False,
        **kw: Any,
    ) -> App:
        config = store_config(tmp_path, read_only)
        settings = load_settings(config, env={}, state_dir=tmp_path / "state", grace=0.0, **kw)
        stream = io.StringIO()
        log = logs.make_logger("debug", "json", stream)
        reviewer = await create_reviewer(
            str(api.write_kubeconfig(tmp_path / "kubeconfig")), review_timeout
        )
        auth = Authenticator(
            reviewer,
            log,
            check_verb=settings.auth_check_verb,
            delete_verb=settings.auth_delete_verb,
            resource=settings.auth_resource,
            clock=clock,
        )
        app, _manager, _storage = await build(settings, log, auth)
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return App(client, auth, stream)

    yield make
    for client in clients:
        await client.close()


async def test_no_token_is_401_and_says_how_to_get_one(make_app: Any) -> None:
    app = await make_app()
    status, body, headers = await app.call("POST", "/prune?mode=check")
    assert status == 401
    assert "bearer token is required" in body["error"]
    assert "oc create token" in body["error"] and "oc whoami -t" in body["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    # another scheme is no token either
    resp = await app.client.get("/runs", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert resp.status == 401


async def test_bad_token_is_401(make_app: Any, api: FakeOpenShift) -> None:
    app = await make_app()
    status, body, _ = await app.call("GET", "/runs", BAD_TOKEN)
    assert status == 401
    assert "not accepted" in body["error"] and "oc create token" in body["error"]
    assert reviews(api, "subjectaccessreviews") == 0


async def test_token_without_the_right_is_403_naming_the_permission(make_app: Any) -> None:
    app = await make_app()
    status, body, _ = await app.call("POST", "/prune?mode=check", NOBODY_TOKEN)
    assert status == 403
    assert body["missing"] == "get images.image.openshift.io"
    assert "get images.image.openshift.io" in body["error"]
    assert "system:serviceaccount:ci:nobody" in body["error"]


async def test_right_token_starts_a_check(make_app: Any) -> None:
    app = await make_app()
    status, body, headers = await app.call("POST", "/prune?mode=check", READER_TOKEN)
    assert status == 202, body
    assert headers["Location"] == f"/runs/{body['id']}"
    for path in ("/runs", f"/runs/{body['id']}", "/runs/latest", "/metrics"):
        assert (await app.call("GET", path, READER_TOKEN))[0] == 200, path
    # unknown paths answer 404 only to a caller who may read
    assert (await app.call("GET", "/nothing-here"))[0] == 401
    assert (await app.call("GET", "/nothing-here", READER_TOKEN))[0] == 404


async def test_delete_needs_the_delete_verb(make_app: Any) -> None:
    app = await make_app(read_only=True)
    status, body, _ = await app.call("POST", "/prune?mode=delete", READER_TOKEN)
    assert status == 403
    assert body["missing"] == "delete images.image.openshift.io"
    # a repeated mode with delete in it needs delete too, before the handler's 400
    status, body, _ = await app.call("POST", "/prune?mode=check&mode=delete", READER_TOKEN)
    assert status == 403 and body["missing"] == "delete images.image.openshift.io"
    status, body, _ = await app.call("POST", "/prune?mode=delete&wait=true", DELETER_TOKEN)
    assert status == 200, body
    assert body["mode"] == "delete" and body["state"] == "succeeded"
    # stopping a run needs the verb of its mode
    stop = f"/runs/{body['id']}/stop"
    status, denied, _ = await app.call("POST", stop, READER_TOKEN)
    assert status == 403 and denied["missing"] == "delete images.image.openshift.io"
    assert (await app.call("POST", stop, DELETER_TOKEN))[0] == 409  # not running any more
    status, check, _ = await app.call("POST", "/prune?mode=check&wait=true", READER_TOKEN)
    assert status == 200
    assert (await app.call("POST", f"/runs/{check['id']}/stop", READER_TOKEN))[0] == 409
    # recover's apply writes into the cluster: it needs the delete verb; verify only reads
    apply = "/prune?mode=recover&apply=true&source=openshift"
    status, body, _ = await app.call("POST", apply, READER_TOKEN)
    assert status == 403 and body["missing"] == "delete images.image.openshift.io"
    status, body, _ = await app.call("POST", "/prune?mode=verify&wait=true", READER_TOKEN)
    assert status == 200 and body["mode"] == "verify", body


async def test_verbs_and_resource_are_settable(make_app: Any, api: FakeOpenShift) -> None:
    app = await make_app(
        auth_check_verb="list", auth_delete_verb="deletecollection", auth_resource="pods"
    )
    status, body, _ = await app.call("GET", "/runs", READER_TOKEN)
    assert status == 403 and body["missing"] == "list pods"
    api.cluster.allow(READER, "list", "pods")
    assert (await app.call("GET", "/runs", READER_TOKEN))[0] == 200
    status, body, _ = await app.call("POST", "/prune?mode=delete", DELETER_TOKEN)
    assert status == 403 and body["missing"] == "deletecollection pods"


async def test_probes_stay_open_and_metrics_do_not(make_app: Any, api: FakeOpenShift) -> None:
    app = await make_app()
    assert (await app.call("GET", "/healthz"))[0] == 200
    assert (await app.call("GET", "/readyz"))[0] == 200
    assert (await app.call("GET", "/metrics"))[0] == 401
    assert reviews(api, "tokenreviews") == 0


async def test_readyz_tells_probes_only_ready_and_is_cached(
    make_app: Any, api: FakeOpenShift, tmp_path: Path
) -> None:
    now = [1000.0]
    app = await make_app()
    readiness = app.client.server.app[READINESS]
    readiness.clock = lambda: now[0]
    store = tmp_path / "store"
    assert (await app.call("GET", "/readyz"))[:2] == (200, {"status": "ready"})
    # a caller that shows a token with the check right gets the store and the error text
    status, body, _ = await app.call("GET", "/readyz", READER_TOKEN)
    assert (status, body) == (200, {"status": "ready", "storage": f"filesystem:{store}"})
    assert (await app.call("GET", "/readyz", NOBODY_TOKEN))[0] == 403
    assert (await app.call("GET", "/readyz", BAD_TOKEN))[0] == 401
    # the store goes away: probes within the cache time are answered without asking it
    store.rename(tmp_path / "store-gone")
    for _ in range(20):
        assert (await app.call("GET", "/readyz"))[0] == 200
    assert readiness.probes == 1
    now[0] += 6
    answers = await asyncio.gather(*(app.call("GET", "/readyz") for _ in range(20)))
    assert {(status, json.dumps(body)) for status, body, _h in answers} == {
        (503, '{"status": "not ready"}')
    }
    assert readiness.probes == 2
    status, body, _ = await app.call("GET", "/readyz", READER_TOKEN)
    assert status == 503 and body["status"] == "not ready"
    assert f"storage root {store} does not exist" in body["error"]
    (tmp_path / "store-gone").rename(store)
    assert (await app.call("GET", "/readyz"))[0] == 503  # cached
    now[0] += 6
    assert (await app.call("GET", "/readyz"))[:2] == (200, {"status": "ready"})
    assert readiness.probes == 3


async def test_latest_names_one_run_for_the_review_and_the_handler(
    make_app: Any, api: FakeOpenShift, tmp_path: Path
) -> None:
    """A caller with only the check right stops ``latest`` while its review is slow, and a
    delete run starts meanwhile: the check run it was authorised for is the one it gets."""
    api.cluster.allow(PRUNER_USER, "*", "*")  # the openshift source lists with this account
    api.cluster.read_only = True
    kubeconfig = api.write_kubeconfig(tmp_path / "source-kubeconfig")
    app = await make_app(kubeconfig=str(kubeconfig))
    status, check, _ = await app.call("POST", "/prune?mode=check&wait=true", READER_TOKEN)
    assert status == 200 and check["state"] == "succeeded"
    late_reader = "late-reader-token-77777777"
    api.cluster.add_token(late_reader, "system:serviceaccount:ci:late-reader")
    api.cluster.allow("system:serviceaccount:ci:late-reader", "get", IMAGES)

    review = api.cluster.hold("tokenreviews")
    stop = asyncio.create_task(app.call("POST", "/runs/latest/stop", late_reader))
    await asyncio.wait_for(review.arrived.wait(), 10)  # type: ignore[union-attr]
    # while that review is awaited, a delete run starts and becomes the latest
    listing = api.cluster.hold("images")
    status, delete, _ = await app.call("POST", "/prune?mode=delete&source=openshift", DELETER_TOKEN)
    assert status == 202, delete
    await asyncio.wait_for(listing.arrived.wait(), 10)  # type: ignore[union-attr]
    assert (await app.call("GET", "/runs/latest", READER_TOKEN))[1]["id"] == delete["id"]

    review.release.set()  # type: ignore[union-attr]
    status, answer, _ = await stop
    assert status == 409, answer
    assert answer["error"] == f"run {check['id']} is succeeded, not running"
    status, run, _ = await app.call("GET", f"/runs/{delete['id']}", READER_TOKEN)
    assert run["state"] == "running"
    listing.release.set()  # type: ignore[union-attr]
    for _ in range(200):
        status, run, _ = await app.call("GET", f"/runs/{delete['id']}", READER_TOKEN)
        if run["state"] != "running":
            break
        await asyncio.sleep(0.05)
    assert run["state"] == "succeeded", run


@pytest.mark.parametrize("resource", ["tokenreviews", "subjectaccessreviews"])
async def test_a_review_that_errors_fails_closed(
    make_app: Any, api: FakeOpenShift, resource: str
) -> None:
    app = await make_app()
    api.cluster.fail(resource, status=500, times=None)
    for token in (READER_TOKEN, DELETER_TOKEN):
        status, body, _ = await app.call("POST", "/prune?mode=check", token)
        assert status == 503, body
        assert "fail closed" in body["error"]
    # the daemon's own account losing its right is an error too, not a "no"
    api.cluster.faults.clear()
    api.cluster.forbid(resource)
    assert (await app.call("GET", "/runs", READER_TOKEN))[0] == 503
    # errors are not cached: once the API answers again, so does the daemon
    api.cluster.faults.clear()
    assert (await app.call("POST", "/prune?mode=check", READER_TOKEN))[0] == 202


async def test_a_review_that_hangs_fails_closed(make_app: Any, api: FakeOpenShift) -> None:
    app = await make_app(review_timeout=0.3)
    api.cluster.fault("tokenreviews", delay=2.0, times=None)
    started = time.monotonic()
    status, body, _ = await app.call("GET", "/runs", READER_TOKEN)
    assert status == 503 and "0.3s" in body["error"]
    assert time.monotonic() - started < 1.5
    api.cluster.faults.clear()
    api.cluster.fault("subjectaccessreviews", delay=2.0, times=None)
    assert (await app.call("GET", "/runs", READER_TOKEN))[0] == 503


async def test_an_unreachable_api_server_fails_closed(make_app: Any, tmp_path: Path) -> None:
    app = await make_app()
    dead = tmp_path / "dead-kubeconfig"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "u", "user": {"token": "x"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    dead.write_text(yaml.safe_dump(config))
    await app.auth.reviewer.close()
    app.auth.reviewer = await create_reviewer(str(dead), 2.0)
    status, body, _ = await app.call("POST", "/prune?mode=check", READER_TOKEN)
    assert status == 503 and "TokenReview" in body["error"]


async def test_a_malformed_review_answer_fails_closed(make_app: Any, api: FakeOpenShift) -> None:
    app = await make_app()
    api.cluster.fault("tokenreviews", body=b'{"kind":"TokenReview","status":', times=None)
    assert (await app.call("GET", "/runs", READER_TOKEN))[0] == 503
    api.cluster.faults.clear()
    # authenticated without a user name, or an "allowed" that is not a boolean: not answers
    api.cluster.fault("tokenreviews", body=b'{"status":{"authenticated":true}}', times=1)
    assert (await app.call("GET", "/runs", READER_TOKEN))[0] == 503
    api.cluster.fault("subjectaccessreviews", body=b'{"status":{"allowed":"yes"}}', times=1)
    assert (await app.call("GET", "/runs", READER_TOKEN))[0] == 503
    assert (await app.call("GET", "/runs", READER_TOKEN))[0] == 200


async def test_positive_answers_are_cached_briefly_by_hash(
    make_app: Any, api: FakeOpenShift
) -> None:
    now = [1000.0]
    app = await make_app(clock=lambda: now[0])
    for _ in range(3):
        assert (await app.call("GET", "/runs", READER_TOKEN))[0] == 200
    assert reviews(api, "tokenreviews") == 1 and reviews(api, "subjectaccessreviews") == 1
    assert all(READER_TOKEN not in key for key in app.auth.cache_keys())
    assert all(len(key) == 64 for key in app.auth.cache_keys())
    # a denial is not cached: granting the right takes effect at once
    assert (await app.call("GET", "/runs", NOBODY_TOKEN))[0] == 403
    api.cluster.allow("system:serviceaccount:ci:nobody", "get", IMAGES)
    assert (await app.call("GET", "/runs", NOBODY_TOKEN))[0] == 200
    # a revoked token stops working once the cache entry expires
    del api.cluster.tokens[READER_TOKEN]
    assert (await app.call("GET", "/runs", READER_TOKEN))[0] == 200
    now[0] += 61
    assert (await app.call("GET", "/runs", READER_TOKEN))[0] == 401


async def test_tokens_never_reach_the_log(make_app: Any, api: FakeOpenShift) -> None:
    app = await make_app()
    for token in ALL_TOKENS:
        await app.call("POST", "/prune?mode=check&wait=true", token)
        await app.call("POST", "/prune?mode=delete", token)
    api.cluster.fail("tokenreviews", status=500, message=f"echo {BAD_TOKEN}", times=None)
    status, body, _ = await app.call("GET", "/runs", BAD_TOKEN)
    assert status == 503 and BAD_TOKEN not in json.dumps(body)
    text = app.log.getvalue()
    assert "auth: permission denied" in text and "auth: token rejected" in text
    for token in ALL_TOKENS:
        assert token not in text


def test_when_auth_is_required() -> None:
    def s(**kw: Any) -> Settings:
        env = {"REGISTRY_STORAGE": "filesystem", "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": "/r"}
        return load_settings(None, env=env, **kw)

    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("pod.local")
    assert not auth_enabled(s(), "127.0.0.1")
    assert auth_enabled(s(), "0.0.0.0")
    assert auth_enabled(s(auth="on"), "127.0.0.1")
    assert not auth_enabled(s(insecure_no_auth=True), "0.0.0.0")
    assert not auth_enabled(s(auth="off"), "127.0.0.1")
    with pytest.raises(ConfigError, match="refusing to listen"):
        auth_enabled(s(auth="off", listen="0.0.0.0:8099"), "0.0.0.0")
    assert not auth_enabled(s(auth="off", insecure_no_auth=True), "0.0.0.0")
    with pytest.raises(ConfigError, match="contradict"):
        auth_enabled(s(auth="on", insecure_no_auth=True), "0.0.0.0")
    with pytest.raises(ConfigError, match="auth must be"):
        auth_enabled(s(auth="maybe"), "0.0.0.0")
    with pytest.raises(ConfigError, match="must not be empty"):
        auth_enabled(s(auth_delete_verb=""), "0.0.0.0")


# -- a real daemon process ---------------------------------------------------------------


async def test_real_daemon_checks_tokens(api: FakeOpenShift, tmp_path: Path) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    daemon = Daemon(
        store_config(tmp_path),
        tmp_path / "state",
        "--kubeconfig",
        str(kubeconfig),
        "--log-format",
        "text",
        env={"PRUNER_AUTH": "on"},
    )
    # the fake API runs on this event loop: block only worker threads
    await asyncio.to_thread(daemon.start)
    try:
        status, _h, body = await asyncio.to_thread(daemon.request, "POST", "/prune?mode=check")
        assert status == 401 and b"oc create token" in body
        for token in (BAD_TOKEN, NOBODY_TOKEN):
            await asyncio.to_thread(
                daemon.request, "POST", "/prune?mode=check", headers=bearer(token)
            )
        status, _h, body = await asyncio.to_thread(
            daemon.request, "POST", "/prune?mode=delete", headers=bearer(READER_TOKEN)
        )
        assert status == 403 and b"delete images.image.openshift.io" in body
        status, headers, body = await asyncio.to_thread(
            daemon.request, "POST", "/prune?mode=check", headers=bearer(READER_TOKEN)
        )
        assert status == 202, body
        # the CI Job's loop: poll the run with the token until it is no longer running
        for _ in range(200):
            status, _h, body = await asyncio.to_thread(
                daemon.request, "GET", headers["Location"], headers=bearer(READER_TOKEN)
            )
            assert status == 200
            if json.loads(body)["state"] != "running":
                break
            await asyncio.sleep(0.05)
        assert json.loads(body)["state"] == "succeeded"
        status, _h, text = await asyncio.to_thread(
            daemon.request,
            "GET",
            headers["Location"],
            headers={**bearer(READER_TOKEN), "Accept": "text/plain"},
        )
        assert status == 200 and text.startswith(b"Would delete 0 blobs")
        api.cluster.fail("tokenreviews", status=500, times=None)
        status, _h, body = await asyncio.to_thread(
            daemon.request, "GET", "/runs", headers=bearer(DELETER_TOKEN)
        )
        assert status == 503
        assert (await asyncio.to_thread(daemon.get, "/healthz"))[0] == 200
        assert (await asyncio.to_thread(daemon.terminate)) == 0
    finally:
        daemon.stop()
    log = daemon.log.read_text()
    assert "auth=" in log and "get images.image.openshift.io" in log
    assert "TokenReview: HTTP 500" in log
    for token in ALL_TOKENS:
        assert token not in log


def test_refuses_to_listen_beyond_loopback_without_auth(tmp_path: Path) -> None:
    config, port = store_config(tmp_path), free_port()
    common = ["serve", "--registry-config", config, "--state-dir", tmp_path / "state"]
    done = pruned(*common, "--listen", f"0.0.0.0:{port}", "--auth", "off")
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0" in done.stdout + done.stderr
    assert "--insecure-no-auth" in done.stdout + done.stderr
    # auto turns auth on off loopback; outside a pod with no kubeconfig it cannot review
    done = pruned(*common, "--listen", f"0.0.0.0:{port}", env={"KUBERNETES_SERVICE_HOST": ""})
    assert done.returncode == 2
    assert "cannot be reached to review tokens" in done.stdout + done.stderr
    done = pruned(*common, "--listen", f"127.0.0.1:{port}", "--auth", "on", "--insecure-no-auth")
    assert done.returncode == 2 and "contradict" in done.stdout + done.stderr


def test_insecure_flag_starts_with_a_warning(tmp_path: Path) -> None:
    daemon = Daemon(
        store_config(tmp_path), tmp_path / "state", env={"PRUNER_INSECURE_NO_AUTH": "true"}
    )
    # the last --listen wins: all addresses, on the free port the harness picked
    daemon.args = ("--listen", f"0.0.0.0:{daemon.port}")
    daemon.start()
    try:
        status, _h, _b = daemon.request("POST", "/prune?mode=check")
        assert status == 202
    finally:
        daemon.stop()
    lines = [json.loads(line) for line in daemon.log.read_text().splitlines() if line]
    warnings = [line for line in lines if line.get("level") == "warning"]
    assert any("WITHOUT authentication" in line["event"] for line in warnings)
    listening = next(line for line in lines if line.get("event") == "listening")
    assert listening["auth"] == "off"


def test_cli_help_lists_the_auth_flags() -> None:
    done = pruned("serve", "--help")
    for flag in ("--auth ", "--insecure-no-auth", "--auth-check-verb", "--auth-resource"):
        assert flag in done.stdout
