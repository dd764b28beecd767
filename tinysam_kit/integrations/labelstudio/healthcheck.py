"""`python -m tinysam_kit.integrations.labelstudio.healthcheck [URL]`: exit 0 when the backend answers /health.

For container health checks; sends the BASIC_AUTH_USER/BASIC_AUTH_PASS credentials when they are set.
"""

from __future__ import annotations

import base64
import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    url = (argv[0] if argv else f"http://127.0.0.1:{os.environ.get('PORT', '9090')}").rstrip("/") + "/health"
    headers = {}
    user = os.environ.get("BASIC_AUTH_USER")
    if user:
        token = base64.b64encode(f"{user}:{os.environ.get('BASIC_AUTH_PASS', '')}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
