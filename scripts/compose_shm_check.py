"""Can Triton map a region the worker creates? Run inside the compose worker container.

    docker compose exec -T worker python - < scripts/compose_shm_check.py

Checks the compose wiring for system shared memory, independently of worker/shm.py: the worker
creates a region in /dev/shm (Triton's, through ``ipc: service:triton``) and asks Triton to
register it over its HTTP API. A group-accessible region (0660) must register, since the worker's
primary group is Triton's; an owner-only one (0600) must be refused, since Triton runs under
another uid. Exit 0 when both hold, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

TRITON_HTTP = "http://triton:8000"
REGION_BYTES = 64 * 1024


def registers(mode: int) -> tuple[bool, str]:
    """Whether Triton registers a fresh region of this file mode, and what it said."""
    name = f"tritonq-compose-check-{mode:o}-{os.getpid()}"
    path = f"/dev/shm/{name}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it
        os.ftruncate(fd, REGION_BYTES)
    finally:
        os.close(fd)
    url = f"{TRITON_HTTP}/v2/systemsharedmemory/region/{name}"
    body = json.dumps({"key": f"/{name}", "offset": 0, "byte_size": REGION_BYTES}).encode()
    try:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{url}/register", data=body, method="POST"), timeout=10)
        except urllib.error.HTTPError as exc:
            return False, exc.read().decode(errors="replace")
        urllib.request.urlopen(urllib.request.Request(f"{url}/unregister", data=b"", method="POST"), timeout=10)
        return True, "registered"
    finally:
        os.unlink(path)


def main() -> int:
    shared, said_shared = registers(0o660)
    private, said_private = registers(0o600)
    print(f"shm: uid {os.getuid()} gid {os.getgid()}; 0660 region: {said_shared}; 0600 region: {said_private}")
    return 0 if shared and not private else 1


if __name__ == "__main__":
    sys.exit(main())
