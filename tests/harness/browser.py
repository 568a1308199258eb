"""Debian's chromium, headless, driven through the DevTools protocol (aiohttp websockets)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = "/usr/bin/chromium"
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless chromium with a fresh profile and one page, for ``async with``."""

    def __init__(self, width: int = 1200, height: int = 1100) -> None:
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ids = itertools.count(1)
        self.console: list[str] = []

    def _launch(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                f"--window-size={self.width},{self.height}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    async def __aenter__(self) -> Browser:
        self.proc = await asyncio.to_thread(self._launch)
        browser_ws = await asyncio.wait_for(self._listening(), 60)
        port = browser_ws.split("//", 1)[1].split("/", 1)[0]
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://{port}/json/list") as resp:
            targets = await resp.json()
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise BrowserError(f"chromium opened no page: {targets}")
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def _listening(self) -> str:
        assert self.proc is not None and self.proc.stderr is not None
        stderr = self.proc.stderr
        seen = []
        while True:
            line = (await asyncio.to_thread(stderr.readline)).decode(errors="replace")
            if not line:
                raise BrowserError(f"chromium exited: {''.join(seen)[-2000:]}")
            seen.append(line)
            found = _LISTENING.search(line)
            if found:
                # the rest of stderr must still be read, or chromium blocks on a full pipe
                asyncio.get_running_loop().run_in_executor(None, stderr.read)
                return found.group(1)

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait, 30)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events in between are kept where useful)."""
        assert self.ws is not None
        ident = next(self.ids)
        await self.ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), 60)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise BrowserError(f"DevTools connection ended: {msg}")
            data = json.loads(msg.data)
            if data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in args)
                )
            if data.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(data["params"]["exceptionDetails"])[:500])
            if data.get("id") == ident:
                if "error" in data:
                    raise BrowserError(f"{method}: {data['error']}")
                return data.get("result", {})

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, within: float = 60) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = asyncio.get_running_loop().time() + within
        last: Any = None
        while asyncio.get_running_loop().time() < deadline:
            try:
                last = await self.evaluate(expression)
            except BrowserError as exc:
                last = exc
            if last and not isinstance(last, BrowserError):
                return last
            await asyncio.sleep(0.1)
        raise BrowserError(f"timed out waiting for {expression} (last {last!r}): {self.console}")

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))
