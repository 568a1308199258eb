"""A one-shot run killed with SIGKILL leaves nothing behind: no reader process outlives it,
and the next delete on this host takes the dead run's lease at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from daemon import layout
from daemon.lease import KEY, Lease, LeaseHeld, process_identity
from daemon.storage.filesystem import FilesystemStorage
from tests.conftest import synthetic_store

#: our own executable, next to the interpreter (never found through PATH)
PRUNED = str(Path(sys.executable).parent / "registry-pruned")


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (children of children too)."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in out:
                    out.add(child)
                    todo.append(child)
    return out


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie is dead; only its parent has not looked yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def in_group(pgid: int) -> set[int]:
    """Processes of process group ``pgid`` still running."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic store large enough for a one-shot run to be killed mid-way: its config."""
    return synthetic_store(tmp_path_factory.mktemp("big"), 20_000, 40, seed=5)


def test_sigkilled_check_leaves_no_process_behind(big_store: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [PRUNED, "check", "--registry-config", str(big_store), "--state-dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: what is left of it can be found
    )
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    # the readers (forked; spawned ones came with multiprocessing's resource tracker): two or more
    while time.monotonic() < deadline and proc.poll() is None:
        seen |= descendants(proc.pid)
        if len(seen) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the check ended before it could be killed"
    assert len(seen) >= 2, seen
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and ({p for p in seen if running(p)} or in_group(proc.pid)):
        time.sleep(0.05)
    left = {p for p in seen if running(p)} | in_group(proc.pid)
    for pid in left:  # never left running for the next tests, whatever the verdict
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running 5 s after the SIGKILL: {sorted(left)}"


def test_sigkilled_delete_lease_is_taken_over_at_once(big_store: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    doc = yaml.safe_load(big_store.read_text())
    doc["storage"]["maintenance"] = {"readonly": {"enabled": True}}
    config.write_text(yaml.safe_dump(doc))
    root = Path(doc["storage"]["filesystem"]["rootdirectory"]) / layout.V2_ROOT
    args = ["--registry-config", str(config), "--state-dir", str(tmp_path), "--grace", "0"]
    proc = subprocess.Popen(
        [PRUNED, "delete", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (root / KEY).exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lease = json.loads((root / KEY).read_text())
    assert lease["expires"] > time.time() + 20  # held for long yet, by a dead holder
    assert lease["pid"] == proc.pid and lease["boot_id"] and lease["pid_namespace"]
    started = time.monotonic()
    again = subprocess.run([PRUNED, "delete", *args], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "taking over the lease of a dead holder" in again.stderr
    assert time.monotonic() - started < 60
    assert not (root / KEY).exists()


@pytest.mark.parametrize(
    ("field", "value", "taken"),
    [
        ("pid_namespace", "pid:[1]", False),  # another namespace: the pid means nothing here
        ("host", "another-pod", False),
        ("boot_id", "00000000-0000-0000-0000-000000000000", False),
        ("pid", None, True),  # same host, boot and namespace, pid gone: dead
    ],
)
def test_a_lease_is_taken_over_only_from_a_provably_dead_holder(
    tmp_path: Path, field: str, value: object, taken: bool
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    async def scenario() -> None:
        (tmp_path / layout.V2_ROOT / "blobs").mkdir(parents=True)
        storage = FilesystemStorage(str(tmp_path))
        holder = {
            "holder": "elsewhere/12345678",
            "run": "dead-run",
            "expires": time.time() + 50,
            **process_identity(),
            "pid": dead.pid,
        }
        if value is not None:
            holder[field] = value
        await storage.write(KEY, json.dumps(holder).encode())
        lease = Lease(storage, "next", ttl=60)
        try:
            if taken:
                await lease.acquire()
                assert lease.held()
            else:
                with pytest.raises(LeaseHeld, match="holds this store's delete lease"):
                    await lease.acquire()
        finally:
            await lease.release()
            await storage.close()

    asyncio.run(scenario())
