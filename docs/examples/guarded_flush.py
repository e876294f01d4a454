"""A Python function that asks in Slack before it runs (bot.guard through the bot).

Run the bot with RUNBOOK_GUARD_TOKEN set, then, with the same token:

    RUNBOOK_BOT_URL=https://runbook-bot.internal RUNBOOK_GUARD_TOKEN=… \\
        RUNBOOK_ENV=staging CACHE_DIR=/var/cache/payments python docs/examples/guarded_flush.py

The bot posts the request in the catalog's default channel with Approve / Reject /
Pause buttons; once one of the catalog's approvers approves, `flush_cache` runs here
(it empties CACHE_DIR) and its result is reported to the thread. Outside staging and
dev it refuses without asking.
"""

from __future__ import annotations

import os
from pathlib import Path

from bot import guard
from bot.errors import ApprovalDenied, PolicyViolation

guard.configure(bot_url=os.environ.get("RUNBOOK_BOT_URL", "http://127.0.0.1:3000"))


@guard.require_confirmation(message="Flush the session cache of payments?", timeout=300)
@guard.allowed_envs(["staging", "dev"])
def flush_cache() -> str:
    cache = Path(os.environ.get("CACHE_DIR", "/var/cache/payments"))
    removed = [entry for entry in cache.iterdir() if entry.is_file()]
    for entry in removed:
        entry.unlink()
    return f"flushed {len(removed)} cache files in {cache}"


def main() -> int:
    try:
        print(flush_cache())
    except (ApprovalDenied, PolicyViolation) as exc:
        print(f"not run: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
