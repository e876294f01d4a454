"""Idle memory of the bot, beside a minimal waitress server measured in the same run.

Starts the real `runbook-bot` on the bundled catalog, with Slack enabled against the
local Slack stand-in from tests/fakes (so nothing leaves the machine), waits until it
answers and settles,
then reads its resident set size from /proc. The reference is a bare waitress "hello"
WSGI app started the same way. Target (DESIGN.md): idle bot under 100 MB RSS, counting
the bot's process and its intake front (bot.front); the step supervisors kept warm are
shown beside them (commands run under them, not the bot).

    python bench/bench_memory.py [--catalog DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
REFERENCE = """
import sys
from waitress import serve
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=4)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
        for child in children:
            out += [child, *descendants(child)]
    return out


def role(pid: int) -> str:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    if b"bot.front" in cmdline:
        return "intake front"
    if b"bot.supervise" in cmdline:
        return "step supervisors (fork server, warm ones)"
    return "other children"


def wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def measure(argv: list[str], env: dict[str, str], url: str) -> dict[str, float]:
    """RSS in MB of the process ("process") and of its children, by role."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(url, proc)
        for _ in range(20):  # a few requests, as a scraper would make
            with urllib.request.urlopen(url, timeout=5):
                pass
        time.sleep(2)  # settle: timers, worker threads started
        sizes = {"process": rss_mb(proc.pid)}
        for child in descendants(proc.pid):
            with contextlib.suppress(FileNotFoundError, RuntimeError):
                kind = role(child)
                sizes[kind] = sizes.get(kind, 0.0) + rss_mb(child)
        return sizes
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", default=str(REPO / "runbooks"))
    args = parser.parse_args()
    bot = shutil.which("runbook-bot", path=os.path.dirname(sys.executable)) or "runbook-bot"
    from fakes import FakeSlack

    with tempfile.TemporaryDirectory() as tmp, FakeSlack() as slack:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "PAGERDUTY_"))}
        env.update(
            RUNBOOK_CATALOG=args.catalog,
            RUNBOOK_DB=os.path.join(tmp, "bot.db"),
            RUNBOOK_ENV="staging",
            HOST="127.0.0.1",
            PORT=str(port),
            PAGERDUTY_WEBHOOK_SECRET="bench",
            SLACK_BOT_TOKEN="xoxb-bench",
            SLACK_SIGNING_SECRET="bench",
            SLACK_API_URL=slack.api_url,
        )
        bot_mb = measure([bot], env, f"http://127.0.0.1:{port}/metrics")
        ref_port = free_port()
        ref_mb = measure(
            [sys.executable, "-c", REFERENCE, str(ref_port)], env, f"http://127.0.0.1:{ref_port}/"
        )
    ref = ref_mb["process"]
    bot_total = bot_mb["process"] + bot_mb.get("intake front", 0.0)
    print(f"minimal waitress app          : {ref:7.1f} MB RSS")
    print(f"runbook-bot, idle: the bot    : {bot_mb['process']:7.1f} MB RSS")
    for kind, size in sorted(bot_mb.items()):
        if kind != "process":
            print(f"  {kind:<28}: {size:7.1f} MB RSS")
    print(f"bot + intake front            : {bot_total:7.1f} MB RSS")
    print(f"ratio                         : {bot_total / ref:7.2f}x   (target: bot under 100 MB)")


if __name__ == "__main__":
    main()
