"""The status page in a real browser: Debian's chromium, headless, over DevTools."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from tests.harness.browser import Browser
from tests.harness.daemon import Daemon
from tests.harness.fake_openshift import FakeOpenShift
from tests.harness.images import Scenario
from tests.harness.registry import Registry
from tests.harness.usage import expected_usage
from tests.test_auth import READER_TOKEN, cluster, store_config

TEXT = "document.getElementById({!r}).textContent"


async def test_page_starts_a_check_and_charts_the_largest_repository_first(
    shared: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    registry, scenario = shared
    expected = expected_usage(registry, scenario)
    largest = max(expected, key=lambda r: expected[r]["exclusive_bytes"])
    daemon = Daemon(registry.config_path, tmp_path / "state", "--grace", "0")
    await asyncio.to_thread(daemon.start)
    try:
        async with Browser() as page:
            await page.goto(daemon.url + "/")
            await page.wait_for("document.readyState === 'complete' && !!$('start-check')")
            assert await page.evaluate(TEXT.format("latest-state")) == "no run yet"
            # every fetch carries the header the CSRF guard asks for, and no token is kept
            assert await page.evaluate("headers()['X-Registry-Pruned']") == "1"
            await page.evaluate("$('start-check').click()")
            await page.wait_for(f"{TEXT.format('latest-state')} === 'succeeded'")
            first = await page.wait_for(
                "document.querySelector('#chart .bar-row')?.dataset.repository"
            )
            assert first == largest
            shown = await page.evaluate(
                "[...document.querySelectorAll('#chart .bar-row')].map(r => r.dataset.repository)"
            )
            assert sorted(shown) == sorted(scenario.repositories)
            assert "orphaned" in await page.evaluate(TEXT.format("chart-totals"))
            # the history row links to the run's usage table
            await page.evaluate(
                "[...document.querySelectorAll('#history a')].find(a => a.textContent === 'usage')"
                ".click()"
            )
            table = await page.wait_for(f"!$('viewer').hidden && {TEXT.format('viewer')}")
            assert table.startswith("REPOSITORY") and largest in table
            await page.screenshot(tmp_path / "status-page.png")
            keep = os.environ.get("REGISTRY_PRUNED_SCREENSHOT")
            if keep:  # how docs/status-page.png is made
                shutil.copy(tmp_path / "status-page.png", keep)
            # delete only after typing the confirmation; the read-only guard answers
            await page.evaluate("$('delete-open').click()")
            assert await page.evaluate("$('delete-go').disabled") is True
            await page.evaluate(
                "$('delete-confirm').value = 'delete';"
                "$('delete-confirm').dispatchEvent(new Event('input'))"
            )
            assert await page.evaluate("$('delete-go').disabled") is False
            await page.evaluate("$('delete-go').click()")
            answer = await page.wait_for(
                f"{TEXT.format('delete-answer')}.includes('Refused') && "
                f"{TEXT.format('delete-answer')}"
            )
            assert answer.startswith("Refused: the registry is not in read-only mode\n")
            assert "storage.maintenance.readonly.enabled" in answer  # the hint: what to do
            assert daemon.json("GET", "/runs")[1][0]["mode"] == "check"  # no delete run
            assert (tmp_path / "status-page.png").stat().st_size > 10_000
    finally:
        daemon.stop()


async def test_page_asks_for_a_token_and_keeps_it_in_session_storage(tmp_path: Path) -> None:
    async with FakeOpenShift(cluster()) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        daemon = Daemon(
            store_config(tmp_path),
            tmp_path / "state",
            "--kubeconfig",
            str(kubeconfig),
            env={"PRUNER_AUTH": "on"},
        )
        await asyncio.to_thread(daemon.start)
        try:
            async with Browser() as page:
                await page.goto(daemon.url + "/")
                await page.wait_for("$('token-panel').style.display === 'block'")
                assert "bearer token" in await page.evaluate(TEXT.format("message"))
                await page.evaluate(
                    f"$('token-input').value = {READER_TOKEN!r}; $('token-save').click()"
                )
                await page.wait_for("$('token-panel').style.display === 'none'")
                await page.evaluate("$('start-check').click()")
                await page.wait_for(f"{TEXT.format('latest-state')} === 'succeeded'")
                stored = await page.evaluate("sessionStorage.getItem('registry-pruned-token')")
                assert stored == READER_TOKEN
                assert READER_TOKEN not in await page.evaluate("location.href")
        finally:
            daemon.stop()
