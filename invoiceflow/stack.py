"""The embedded local stack: a Prefect server and moto's S3 server on 127.0.0.1.

`up` starts both as detached processes (so they outlive the CLI), records their pids
and ports in `<state dir>/stack.json`, and is idempotent: if the recorded processes
are alive and healthy they are reused. `down` stops them. Provisioning what runs on
the stack (bucket, concurrency limit, blocks, sample invoices) lives in
`flows/provision.py`, because it talks to Prefect.

Imports nothing from Prefect: the server runs as a subprocess.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

DEFAULT_PREFECT_PORT = 4200
DEFAULT_S3_PORT = 5055


class StackError(RuntimeError):
    """The local stack cannot start or be reached; the message says what to do."""


def default_state_dir() -> Path:
    return Path(os.environ.get("INVOICEFLOW_HOME", Path.cwd() / ".invoiceflow")).resolve()


@dataclass
class StackInfo:
    state_dir: str
    prefect_port: int
    s3_port: int
    prefect_pid: int
    s3_pid: int
    bucket: str = "invoiceflow"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def prefect_home(self) -> Path:
        return Path(self.state_dir) / "prefect"

    def env(self) -> dict[str, str]:
        """What every process using the stack needs in its environment."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # The client retries 429/502/503 by default; a 500 from a server mid-restart
            # is just as transient for us.
            "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500",
            # moto accepts any credentials; boto3 still wants some to sign with.
            "AWS_ACCESS_KEY_ID": "invoiceflow-local",
            "AWS_SECRET_ACCESS_KEY": "invoiceflow-local",
            "AWS_DEFAULT_REGION": "us-east-1",
        }


def server_env(prefect_home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Leases on disk survive a server restart, so a held manifest slot is not stuck.
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": (
            "prefect.server.concurrency.lease_storage.filesystem"
        ),
        "PREFECT_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # A zombie child of ours still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def _wait_healthy(url: str, pid: int, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _healthy(url):
            return
        if not pid_alive(pid):
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise StackError(f"process {pid} exited before {url} came up; log {log}:\n{tail}")
        time.sleep(0.3)
    raise StackError(f"{url} did not become healthy within {timeout_s:.0f}s; see {log}")


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the process that started us dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _spawn(
    cmd: list[str],
    log: Path,
    env: dict[str, str],
    *,
    die_with_parent: bool,
    **popen_options: object,
) -> int:
    """Start `cmd` detached in its own session; `popen_options` (user=, group=, cwd=)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # own process group: `down` stops its children too
            preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None,
            **popen_options,  # type: ignore[arg-type]
        )
    return proc.pid


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def load(state_dir: Path | None = None) -> StackInfo | None:
    path = (state_dir or default_state_dir()) / "stack.json"
    if not path.exists():
        return None
    return StackInfo(**json.loads(path.read_text()))


def is_running(info: StackInfo) -> bool:
    return (
        pid_alive(info.prefect_pid)
        and pid_alive(info.s3_pid)
        and _healthy(f"{info.api_url}/health")
        and _healthy(info.s3_endpoint)
    )


def up(
    state_dir: Path | None = None,
    *,
    prefect_port: int | None = None,
    s3_port: int | None = None,
    bucket: str = "invoiceflow",
    timeout_s: float = 120,
    die_with_caller: bool = False,
) -> tuple[StackInfo, bool]:
    """Start (or reuse) the stack. Returns (info, reused).

    Ports left as None reuse the running stack's, or default to 4200 (Prefect) and
    5055 (S3) for a new one. `die_with_caller` (tests, benchmarks) stops the servers
    when this process dies, even by SIGKILL, so an interrupted run leaks no servers;
    `invoiceflow up` leaves it off so the stack outlives the command.
    """
    state = (state_dir or default_state_dir()).resolve()
    existing = load(state)
    if existing is not None and is_running(existing):
        _check_running_ports(existing, prefect_port=prefect_port, s3_port=s3_port)
        return existing, True
    prefect_port = prefect_port or DEFAULT_PREFECT_PORT
    s3_port = s3_port or DEFAULT_S3_PORT
    if existing is not None:
        down(state)  # half-dead leftovers: clean them before starting anew
    _check_ports_free(prefect_port, s3_port)
    return _start(state, prefect_port, s3_port, bucket, timeout_s, die_with_caller), False


def _check_running_ports(
    existing: StackInfo, *, prefect_port: int | None, s3_port: int | None
) -> None:
    """Refuse to reuse a running stack on other ports than the ones asked for."""
    wanted = {
        "--prefect-port": (prefect_port, existing.prefect_port),
        "--s3-port": (s3_port, existing.s3_port),
    }
    for flag, (asked, running) in wanted.items():
        if asked is not None and asked != running:
            raise StackError(
                f"the local stack is already running with {flag} {running}; "
                f"run `invoiceflow down` first to move it to {asked}"
            )


def _check_ports_free(prefect_port: int, s3_port: int) -> None:
    for name, port in (("Prefect", prefect_port), ("S3", s3_port)):
        if not port_is_free(port):
            flag = "--prefect-port" if name == "Prefect" else "--s3-port"
            raise StackError(
                f"port {port} on 127.0.0.1 is taken by another process, so the {name} "
                f"server cannot start; free it or choose another port with {flag}"
            )


def _start(
    state: Path,
    prefect_port: int,
    s3_port: int,
    bucket: str,
    timeout_s: float,
    die_with_caller: bool,
) -> StackInfo:
    """Spawn both servers, record them in stack.json and wait until both answer."""
    prefect_home = state / "prefect"
    prefect_home.mkdir(parents=True, exist_ok=True)
    logs = state / "logs"
    prefect_pid = _spawn(
        [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        logs / "prefect-server.log",
        {
            **server_env(prefect_home),
            # `--port` does not reach the UI: without this it calls the API on 4200 (or
            # on whatever PREFECT_API_URL this shell has), i.e. someone else's server.
            "PREFECT_SERVER_UI_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        },
        die_with_parent=die_with_caller,
    )
    s3_pid = _spawn(
        [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
        logs / "s3-server.log",
        dict(os.environ),
        die_with_parent=die_with_caller,
    )
    info = StackInfo(str(state), prefect_port, s3_port, prefect_pid, s3_pid, bucket)
    (state / "stack.json").write_text(json.dumps(asdict(info), indent=2))
    try:
        _wait_healthy(info.s3_endpoint, s3_pid, logs / "s3-server.log", timeout_s)
        _wait_healthy(f"{info.api_url}/health", prefect_pid, logs / "prefect-server.log", timeout_s)
    except StackError:
        down(state)
        raise
    return info


def _stop(pid: int, timeout_s: float = 15, first_signal: int = signal.SIGTERM) -> None:
    """Signal the process group, wait, then SIGKILL it (a Prefect worker stops cleanly
    on SIGINT, not SIGTERM: pass `first_signal`)."""
    if not pid_alive(pid):
        return
    try:
        os.killpg(pid, first_signal)
    except OSError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    if pid_alive(pid):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    # Reap it if it was our child (tests start the stack in-process).
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def down(state_dir: Path | None = None) -> StackInfo | None:
    """Stop the stack's servers (the Prefect database under the state dir is kept)."""
    state = (state_dir or default_state_dir()).resolve()
    info = load(state)
    if info is None:
        return None
    _stop(info.prefect_pid)
    _stop(info.s3_pid)
    (state / "stack.json").unlink(missing_ok=True)
    return info
