"""Which code a result came from: $FASTCHAT_COMMIT when set (the device machine gets a copy of the working
tree whose .git may be stale or absent), else `git rev-parse`."""
import os
import subprocess


def commit() -> str:
    return os.environ.get("FASTCHAT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
