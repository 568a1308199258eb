"""A web page must not be able to drive the daemon: a real ``serve``, browser and curl requests."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import cli
from daemon.api import allowed_hosts
from daemon.config import ConfigError, load_settings
from daemon.origin import CSRF_HEADER, allowed_host_names
from tests.harness.daemon import Daemon
from tests.test_auth import store_config

SERVICE = "registry-pruned.openshift-image-registry.svc"
FORM = "application/x-www-form-urlencoded"
STORE_ENV = {"REGISTRY_STORAGE": "filesystem", "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": "/r"}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(
        store_config(tmp_path),
        tmp_path / "state",
        "--allowed-host",
        SERVICE,
        env={"PRUNER_ALLOWED_HOSTS": "ignored.example"},  # the flag wins over the variable
    ).start()
    yield d
    d.stop()


def curl(*args: str) -> tuple[int, str]:
    """The real curl, as the documented one-liners run it; (HTTP status, body)."""
    done = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    body, _, code = done.stdout.rpartition("\n")
    return int(code), body


def test_browser_requests_are_refused_and_start_nothing(daemon: Daemon) -> None:
    port = daemon.port
    own = f"http://localhost:{port}"
    evil = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    refused = {
        # the form POST the review proved: Origin elsewhere, cross-site, a foreign Host
        "cross-site form": (
            "POST",
            "/prune?mode=delete&online=true&source=openshift",
            {**evil, "Host": f"attacker.example:{port}", "Content-Type": FORM},
        ),
        "cross-site form, loopback Host": (
            "POST",
            "/prune?mode=delete",
            {**evil, "Host": f"localhost:{port}", "Content-Type": FORM, CSRF_HEADER: "1"},
        ),
        # DNS rebinding: the page's own origin, a name that now resolves to loopback
        "rebound POST": (
            "POST",
            "/prune?mode=check",
            {
                "Host": f"attacker.example:{port}",
                "Origin": f"http://attacker.example:{port}",
                "Sec-Fetch-Site": "same-origin",
                CSRF_HEADER: "1",
            },
        ),
        "rebound GET": ("GET", "/prune?mode=check", {"Host": f"attacker.example:{port}"}),
        "rebound read": ("GET", "/runs", {"Host": f"localhost.attacker.example:{port}"}),
        "trailing-dot localhost": ("GET", "/prune?mode=check", {"Host": f"localhost.:{port}"}),
        # an <img> or no-cors fetch from elsewhere carries no Origin, only Sec-Fetch-Site
        "cross-site GET": ("GET", "/prune?mode=check", {"Sec-Fetch-Site": "cross-site"}),
        "same-site GET": ("GET", "/prune?mode=check", {"Sec-Fetch-Site": "same-site"}),
        # another port of this host is another origin (a browser says same-site)
        "other port": (
            "POST",
            "/prune?mode=check",
            {
                "Host": f"localhost:{port}",
                "Origin": f"http://localhost:{port + 1}",
                CSRF_HEADER: "1",
            },
        ),
        "older browser, Origin only": ("POST", "/prune?mode=check", {"Origin": evil["Origin"]}),
        "sandboxed frame": ("POST", "/prune?mode=check", {"Origin": "null"}),
        # our own origin, but a plain form: it cannot set the custom header
        "same-origin form": (
            "POST",
            "/prune?mode=check",
            {
                "Host": f"localhost:{port}",
                "Origin": own,
                "Sec-Fetch-Site": "same-origin",
                "Content-Type": FORM,
            },
        ),
        "stop latest from elsewhere": ("POST", "/runs/latest/stop", evil),
    }
    for name, (method, path, headers) in refused.items():
        status, _headers, body = daemon.request(method, path, headers=headers)
        assert status == 403, (name, body)
        error = json.loads(body)["error"]
        assert error.startswith("refused: "), (name, error)
    # the reasons say what was wrong
    _s, _h, body = daemon.request("GET", "/runs", headers={"Host": f"attacker.example:{port}"})
    assert "--allowed-host" in json.loads(body)["error"]
    _s, _h, body = daemon.request("POST", "/prune?mode=check", headers=evil)
    assert "Sec-Fetch-Site" in json.loads(body)["error"]
    _s, _h, body = daemon.request("POST", "/prune?mode=check", headers={"Origin": "null"})
    assert "'null'" in json.loads(body)["error"]
    mine = {"Origin": own, "Host": f"localhost:{port}"}
    _s, _h, body = daemon.request("POST", "/prune?mode=check", headers=mine)
    assert CSRF_HEADER in json.loads(body)["error"]
    # nothing started
    assert daemon.json("GET", "/runs") == (200, [])
    # --allowed-host replaced PRUNER_ALLOWED_HOSTS
    assert daemon.get("/runs", headers={"Host": "ignored.example"})[0] == 403
    assert daemon.get("/runs", headers={"Host": SERVICE})[0] == 200
    log = daemon.log.read_text()
    assert log.count("browser guard: request refused") > len(refused)


def test_curl_probes_and_the_own_page_pass(daemon: Daemon) -> None:
    port = daemon.port
    # the documented one-liners, through the real curl (Host: localhost:<port>)
    status, body = curl(f"localhost:{port}/prune?mode=check")
    assert status == 202, body
    first = json.loads(body)["id"]
    assert daemon.wait_done(first)["state"] == "succeeded"
    status, body = curl(
        "-X", "POST", "-H", "Accept: text/plain", f"localhost:{port}/prune?mode=check&wait=true"
    )
    assert status == 200 and body.startswith("Would delete 0 blobs"), body
    status, body = curl(f"localhost:{port}/runs/latest")
    assert status == 200 and json.loads(body)["id"] != first
    status, body = curl(f"http://127.0.0.1:{port}/runs/{first}/candidates")
    assert status == 200 and body == ""
    # kubelet and Prometheus name the pod by its IP; an IP address cannot be rebound
    for path in ("/healthz", "/readyz", "/metrics"):
        for host in (f"10.128.2.15:{port}", f"[fd01::2f]:{port}", "127.0.0.1"):
            assert daemon.get(path, headers={"Host": host})[0] == 200, (path, host)
    # the Service's names, given with --allowed-host (any case, any port)
    for host in (SERVICE, f"{SERVICE.upper()}:{port}", f"[::1]:{port}"):
        assert daemon.get("/runs", headers={"Host": host})[0] == 200, host
    # a person typing the URL into the browser: Sec-Fetch-Site none
    typed = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate", "Host": f"localhost:{port}"}
    assert daemon.get("/runs/latest", headers=typed)[0] == 200
    # the daemon's own page: same origin, and the header a form cannot set
    page = {
        "Host": f"localhost:{port}",
        "Origin": f"http://localhost:{port}",
        "Sec-Fetch-Site": "same-origin",
        "Sec-Fetch-Mode": "cors",
        CSRF_HEADER: "1",
    }
    status, _h, body = daemon.request("POST", "/prune?mode=check&wait=true", headers=page)
    assert status == 200 and json.loads(body)["state"] == "succeeded", body
    assert len(daemon.json("GET", "/runs")[1]) == 3


def test_allowed_host_values_are_checked() -> None:
    assert allowed_host_names([f" {SERVICE.upper()} ", "", "registry-pruned."]) == {
        SERVICE,
        "registry-pruned",
    }
    for bad in ("http://x.example", "x.example:8099", "a/b", "*.svc"):
        with pytest.raises(ConfigError, match="without scheme or port"):
            allowed_host_names([bad])


def test_allowed_hosts_from_flags_or_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PRUNER_ALLOWED_HOSTS", "a.svc, b.svc,")
    base = ["serve", "--registry-config", str(store_config(tmp_path))]
    assert cli.settings_from(cli._parser().parse_args(base)).allowed_hosts == ("a.svc", "b.svc")
    flags = [*base, "--allowed-host", "c.svc", "--allowed-host", "d.svc"]
    assert cli.settings_from(cli._parser().parse_args(flags)).allowed_hosts == ("c.svc", "d.svc")
    # a listen address given by name is a name callers use
    named = load_settings(None, env=STORE_ENV, listen="pruner.example:8099")
    assert allowed_hosts(named) == ["pruner.example"]
