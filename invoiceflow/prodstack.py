"""Prefect's production stack on loopback: Postgres, Redis, API replicas, haproxy, S3.

Laid out the way Prefect's self-hosting guide (docs/v3/advanced/self-hosted.mdx) runs
several API replicas:

    clients/workers ──https──▶ haproxy (TLS, round robin) ──▶ N x `prefect server start
    --no-services`  ──▶ Postgres (state)  +  Redis (messaging, causal ordering, leases,
    docket)  ◀── one `prefect server services start` process

Everything listens on 127.0.0.1 at free ports; all state (Postgres data, Redis AOF, TLS
files, logs, the generated passwords) lives under one directory. `up_production` records
pids and ports in `<state>/production.json`; `down_production` stops every process.
With `die_with_caller` (tests, benchmarks) the processes get SIGTERM when the caller
dies, even by SIGKILL.

Postgres refuses to run as root; as root the stack runs it as the `postgres` user.

Imports nothing from Prefect: its servers run as subprocesses.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from invoiceflow import stack
from invoiceflow.tls import ensure_certificates

PG_BIN = Path(os.environ.get("INVOICEFLOW_PG_BIN", "/usr/lib/postgresql/15/bin"))
STATE_FILE = "production.json"
DB_NAME = "prefect"
DB_USER = "prefect"
API_USER = "invoiceflow"
# Prefect client settings that matter on any multi-replica server: a 500 from a replica
# that is going away is as transient as the 502/503 the client retries by default.
CLIENT_RETRY_EXTRA_CODES = "500"
LEASE_STORAGE = "prefect_redis.lease_storage"


@dataclass
class ProductionStack:
    """Ports, pids and secrets of a running production stack (the state file's content)."""

    state_dir: str
    postgres_port: int
    redis_port: int
    s3_port: int
    lb_port: int
    replica_ports: list[int]
    db_password: str
    redis_password: str
    api_password: str
    postgres_data: str
    pids: dict[str, int] = field(default_factory=dict)
    bucket: str = "invoiceflow"
    # Prefect's default is per-process memory; only the tests of the start-up check
    # run the replicas that way, to show what it catches.
    lease_storage: str = LEASE_STORAGE

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.lb_port}/api"

    @property
    def ui_url(self) -> str:
        return f"https://127.0.0.1:{self.lb_port}"

    def replica_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.replica_ports[index]}/api"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def auth_string(self) -> str:
        return f"{API_USER}:{self.api_password}"

    @property
    def ca_file(self) -> Path:
        return Path(self.state_dir) / "tls" / "ca.pem"

    @property
    def database_url(self) -> str:
        return (
            f"postgresql+asyncpg://{DB_USER}:{self.db_password}"
            f"@127.0.0.1:{self.postgres_port}/{DB_NAME}"
        )

    @property
    def redis_url(self) -> str:
        return f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0"

    def env(self) -> dict[str, str]:
        """What every client of the stack needs: the CLI, workers, flow runs, tests."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_API_AUTH_STRING": self.auth_string,
            "PREFECT_API_SSL_CERT_FILE": str(self.ca_file),
            "PREFECT_CLIENT_RETRY_EXTRA_CODES": CLIENT_RETRY_EXTRA_CODES,
            "PREFECT_HOME": str(Path(self.state_dir) / "prefect-client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "AWS_ACCESS_KEY_ID": "invoiceflow-local",
            "AWS_SECRET_ACCESS_KEY": "invoiceflow-local",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def server_env(self) -> dict[str, str]:
        """The settings every API replica and the services process share."""
        return {
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url,
            # Migrations run once, before the replicas start (see `_migrate`).
            "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
            "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": self.lease_storage,
            "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1",
            "PREFECT_REDIS_MESSAGING_PORT": str(self.redis_port),
            "PREFECT_REDIS_MESSAGING_DB": "0",
            "PREFECT_REDIS_MESSAGING_PASSWORD": self.redis_password,
            "PREFECT_SERVER_DOCKET_URL": self.redis_url,
            "PREFECT_SERVER_API_AUTH_STRING": self.auth_string,
            # The browser reaches the API through haproxy, not the replica it loaded from.
            "PREFECT_UI_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }


def default_state_dir() -> Path:
    return stack.default_state_dir() / "production"


def load(state_dir: Path | None = None) -> ProductionStack | None:
    path = (state_dir or default_state_dir()) / STATE_FILE
    if not path.exists():
        return None
    return ProductionStack(**json.loads(path.read_text()))


def _save(info: ProductionStack) -> None:
    path = Path(info.state_dir) / STATE_FILE
    path.write_text(json.dumps(asdict(info), indent=2))
    path.chmod(0o600)  # it holds the passwords


def _postgres_user() -> pwd.struct_passwd | None:
    """Who runs Postgres: `postgres` when we are root (initdb/postgres refuse root)."""
    return pwd.getpwnam("postgres") if os.geteuid() == 0 else None


def _reachable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """Can `user` traverse every directory above `path` (world or owner execute bit)?"""
    for parent in path.parents:
        mode = parent.stat()
        if not (mode.st_mode & 0o001 or mode.st_uid == user.pw_uid):
            return False
    return True


def _postgres_data_dir(state: Path) -> Path:
    """`<state>/postgres`, or a directory under the temp dir the postgres user can reach."""
    user = _postgres_user()
    data = state / "postgres"
    if user is not None:
        state.chmod(state.stat().st_mode | 0o011)  # traverse only, nothing listable
        if not _reachable_by(data, user):
            parent = Path(tempfile.mkdtemp(prefix="invoiceflow-postgres-"))
            parent.chmod(0o711)
            data = parent / "data"
    return data


def _as_postgres() -> dict[str, object]:
    user = _postgres_user()
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _initdb(data: Path, password: str) -> None:
    if (data / "PG_VERSION").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    user = _postgres_user()
    if user is not None:
        shutil.chown(data, user.pw_uid, user.pw_gid)
    with tempfile.NamedTemporaryFile("w", dir=data.parent, suffix=".pw", delete=False) as pw_file:
        pw_file.write(password)
    if user is not None:
        shutil.chown(pw_file.name, user.pw_uid, user.pw_gid)
    try:
        subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(data), "-U", DB_USER, "--pwfile", pw_file.name,
             "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"],
            check=True, capture_output=True, **_as_postgres(),  # type: ignore[arg-type]
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        raise stack.StackError(f"initdb failed: {exc.stderr.decode(errors='replace')}") from None
    finally:
        Path(pw_file.name).unlink(missing_ok=True)


def _wait_port(port: int, pid: int, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if not stack.pid_alive(pid):
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise stack.StackError(f"process {pid} exited before port {port} opened:\n{tail}")
        time.sleep(0.2)
    raise stack.StackError(f"port {port} did not open within {timeout_s:.0f}s; see {log}")


def _start_postgres(info: ProductionStack, logs: Path, die: bool, timeout_s: float) -> None:
    data = Path(info.postgres_data)
    _initdb(data, info.db_password)
    log = logs / "postgres.log"
    if _postgres_user() is not None and log.exists():
        shutil.chown(log, _postgres_user().pw_uid)  # type: ignore[union-attr]
    command = [
        str(PG_BIN / "postgres"), "-D", str(data), "-p", str(info.postgres_port),
        "-h", "127.0.0.1", "-k", "",  # TCP on loopback only, no Unix socket
        "-c", "max_connections=300",
    ]  # fmt: skip
    pid = stack._spawn(command, log, dict(os.environ), die_with_parent=die, **_as_postgres())
    info.pids["postgres"] = pid
    _wait_port(info.postgres_port, pid, log, timeout_s)
    _create_database(info, timeout_s)


def _create_database(info: ProductionStack, timeout_s: float) -> None:
    """CREATE DATABASE unless it exists (the server accepts connections a bit after listening)."""
    env = {**os.environ, "PGPASSWORD": info.db_password}
    base = ["-h", "127.0.0.1", "-p", str(info.postgres_port), "-U", DB_USER]
    deadline = time.monotonic() + timeout_s
    while True:
        found = subprocess.run(
            [str(PG_BIN / "psql"), *base, "-d", "postgres", "-tAc",
             f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'"],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        if found.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise stack.StackError(f"Postgres does not accept connections: {found.stderr}")
        time.sleep(0.3)
    if found.stdout.strip() != "1":
        subprocess.run([str(PG_BIN / "createdb"), *base, DB_NAME], env=env, check=True)


def _start_redis(info: ProductionStack, logs: Path, die: bool, timeout_s: float) -> None:
    """Redis with an append-only file, so a restart keeps leases and unacked messages."""
    directory = Path(info.state_dir) / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    command = [
        shutil.which("redis-server") or "/usr/bin/redis-server",
        "--bind", "127.0.0.1", "--port", str(info.redis_port), "--dir", str(directory),
        "--requirepass", info.redis_password, "--appendonly", "yes",
        "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
    ]  # fmt: skip
    log = logs / "redis.log"
    pid = stack._spawn(command, log, dict(os.environ), die_with_parent=die)
    info.pids["redis"] = pid
    _wait_port(info.redis_port, pid, log, timeout_s)


def restart_redis(info: ProductionStack, *, die_with_caller: bool, timeout_s: float = 60) -> None:
    """Stop Redis and start it again on the same port and data (a fault for the tests)."""
    stack._stop(info.pids["redis"])
    logs = Path(info.state_dir) / "logs"
    _start_redis(info, logs, die_with_caller, timeout_s)
    _save(info)


def _migrate(info: ProductionStack, logs: Path) -> None:
    """Run the database migrations once, before any replica starts."""
    env = {**os.environ, **info.server_env(), "PREFECT_HOME": str(_home(info, "migrate"))}
    with open(logs / "migrate.log", "ab") as out:
        result = subprocess.run(
            [stack._bin("prefect"), "server", "database", "upgrade", "-y"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    if result.returncode != 0:
        raise stack.StackError(f"prefect database migrations failed; see {logs / 'migrate.log'}")


def _home(info: ProductionStack, name: str) -> Path:
    home = Path(info.state_dir) / "prefect" / name
    home.mkdir(parents=True, exist_ok=True)
    return home


def start_replica(info: ProductionStack, index: int, *, die_with_caller: bool) -> int:
    """One API replica without services (they run once, in the services process)."""
    port = info.replica_ports[index]
    command = [
        stack._bin("prefect"), "server", "start", "--no-services",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, **info.server_env(), "PREFECT_HOME": str(_home(info, f"api-{index}"))}
    if index:
        # One replica registers the block types; replicas starting together on a fresh
        # database otherwise race on the same rows (unique violations in the logs).
        env["PREFECT_SERVER_REGISTER_BLOCKS_ON_START"] = "false"
    log = Path(info.state_dir) / "logs" / f"api-{index}.log"
    pid = stack._spawn(command, log, env, die_with_parent=die_with_caller)
    info.pids[f"api-{index}"] = pid
    return pid


def _start_services(info: ProductionStack, die: bool) -> None:
    command = [stack._bin("prefect"), "server", "services", "start"]
    env = {**os.environ, **info.server_env(), "PREFECT_HOME": str(_home(info, "services"))}
    log = Path(info.state_dir) / "logs" / "services.log"
    info.pids["services"] = stack._spawn(command, log, env, die_with_parent=die)


def haproxy_config(info: ProductionStack) -> str:
    """Round robin over the replicas; a dead replica is skipped after one failed check,
    and a request whose connection it refused is sent to another (`redispatch`)."""
    servers = "\n".join(
        f"  server api-{i} 127.0.0.1:{port} check" for i, port in enumerate(info.replica_ports)
    )
    pem = Path(info.state_dir) / "tls" / "server.pem"
    return f"""global
  maxconn 2000

defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout tunnel 1h
  option redispatch
  retries 3

frontend prefect_api
  bind 127.0.0.1:{info.lb_port} ssl crt {pem}
  default_backend prefect_replicas

backend prefect_replicas
  balance roundrobin
  option httpchk GET /api/health
  default-server inter 1s fall 1 rise 2
{servers}
"""


def _start_haproxy(info: ProductionStack, logs: Path, die: bool, timeout_s: float) -> None:
    config = Path(info.state_dir) / "haproxy.cfg"
    config.write_text(haproxy_config(info))
    command = [shutil.which("haproxy") or "/usr/sbin/haproxy", "-f", str(config), "-db"]
    log = logs / "haproxy.log"
    pid = stack._spawn(command, log, dict(os.environ), die_with_parent=die)
    info.pids["haproxy"] = pid
    _wait_port(info.lb_port, pid, log, timeout_s)


def wait_replica_healthy(info: ProductionStack, index: int, timeout_s: float) -> None:
    log = Path(info.state_dir) / "logs" / f"api-{index}.log"
    stack._wait_healthy(
        f"{info.replica_url(index)}/health", info.pids[f"api-{index}"], log, timeout_s
    )


def _stack_secrets(state: Path) -> dict[str, str]:
    """Passwords and the Postgres data path, generated once and kept across `down`/`up`
    (the database keeps its password)."""
    path = state / "secrets.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    kept = {
        "db_password": secrets.token_urlsafe(18),
        "redis_password": secrets.token_urlsafe(18),
        "api_password": secrets.token_urlsafe(18),
        "postgres_data": str(_postgres_data_dir(state)),
    }
    path.write_text(json.dumps(kept))
    path.chmod(0o600)
    return kept


def _new_stack(state: Path, replicas: int, bucket: str) -> ProductionStack:
    return ProductionStack(
        state_dir=str(state),
        postgres_port=stack.free_port(),
        redis_port=stack.free_port(),
        s3_port=stack.free_port(),
        lb_port=stack.free_port(),
        replica_ports=[stack.free_port() for _ in range(replicas)],
        bucket=bucket,
        **_stack_secrets(state),
    )


def is_running(info: ProductionStack) -> bool:
    return all(stack.pid_alive(pid) for pid in info.pids.values()) and _lb_healthy(info)


def _lb_healthy(info: ProductionStack) -> bool:
    try:
        context = ssl.create_default_context(cafile=str(info.ca_file))
        response = httpx.get(f"{info.api_url}/health", verify=context, timeout=3)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def up_production(
    state_dir: Path | None = None,
    *,
    replicas: int = 2,
    bucket: str = "invoiceflow",
    timeout_s: float = 240,
    die_with_caller: bool = False,
    lease_storage: str = LEASE_STORAGE,
) -> tuple[ProductionStack, bool]:
    """Start (or reuse) the production stack. Returns (info, reused).

    Order as the self-hosting guide has it: Postgres and Redis, migrations once, the API
    replicas and the services process, then the load balancer once a replica is up.
    """
    state = (state_dir or default_state_dir()).resolve()
    existing = load(state)
    if existing is not None and is_running(existing):
        return existing, True
    if existing is not None:
        down_production(state)
    state.mkdir(parents=True, exist_ok=True)
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    info = _new_stack(state, replicas, bucket)
    info.lease_storage = lease_storage
    ensure_certificates(state / "tls")
    try:
        _start_backing_services(info, logs, die_with_caller, timeout_s)
        for index in range(replicas):
            start_replica(info, index, die_with_caller=die_with_caller)
        _start_services(info, die_with_caller)
        _save(info)
        for index in range(replicas):
            wait_replica_healthy(info, index, timeout_s)
        _start_haproxy(info, logs, die_with_caller, timeout_s)
        _save(info)
        _wait_lb(info, timeout_s)
    except BaseException:
        _save(info)
        down_production(state)
        raise
    return info, False


def _start_backing_services(info: ProductionStack, logs: Path, die: bool, timeout_s: float) -> None:
    """Postgres, Redis and S3 (in parallel where it is free), then the migrations."""
    s3_log = logs / "s3.log"
    info.pids["s3"] = stack._spawn(
        [stack._bin("moto_server"), "-H", "127.0.0.1", "-p", str(info.s3_port)],
        s3_log, dict(os.environ), die_with_parent=die,
    )  # fmt: skip
    _start_redis(info, logs, die, timeout_s)
    _start_postgres(info, logs, die, timeout_s)
    _save(info)
    _migrate(info, logs)
    stack._wait_healthy(info.s3_endpoint, info.pids["s3"], s3_log, timeout_s)


def _wait_lb(info: ProductionStack, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not _lb_healthy(info):
        if time.monotonic() > deadline:
            raise stack.StackError(f"haproxy on {info.api_url} is not healthy; see logs/")
        time.sleep(0.3)


def start_worker(
    info: ProductionStack,
    command: list[str],
    name: str,
    *,
    die_with_caller: bool,
    cwd: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> int:
    """A worker process (its command line comes from the caller: this package knows no
    Prefect), pointed at the stack, logging to `logs/<name>.log`, recorded for `down`."""
    env = {**os.environ, **info.env(), **(extra_env or {})}
    log = Path(info.state_dir) / "logs" / f"{name}.log"
    pid = stack._spawn(command, log, env, die_with_parent=die_with_caller, cwd=cwd)
    info.pids[name] = pid
    _save(info)
    return pid


def stop_process(info: ProductionStack, name: str, *, sig_kill: bool = False) -> None:
    """Stop one named process of the stack (a replica, a worker) and forget it;
    `sig_kill` kills it without a chance to clean up (a crashed machine)."""
    pid = info.pids.pop(name)
    if sig_kill:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    stack._stop(pid, first_signal=_first_signal(name))
    _save(info)


def _first_signal(name: str) -> int:
    # A Prefect worker shuts down (and stops its flow runs) on SIGINT; it ignores SIGTERM.
    return signal.SIGINT if name.startswith("worker") else signal.SIGTERM


def down_production(state_dir: Path | None = None) -> ProductionStack | None:
    """Stop every process of the stack: workers first, Postgres last (data is kept)."""
    state = (state_dir or default_state_dir()).resolve()
    info = load(state)
    if info is None:
        return None
    order = sorted(info.pids, key=_stop_order)
    for name in order:
        timeout_s = 30 if name == "postgres" else 15
        stack._stop(info.pids[name], timeout_s, first_signal=_first_signal(name))
    (state / STATE_FILE).unlink(missing_ok=True)
    return info


def _stop_order(name: str) -> int:
    first_to_last = ["worker", "haproxy", "api", "services", "s3", "redis", "postgres"]
    return next((i for i, prefix in enumerate(first_to_last) if name.startswith(prefix)), 0)


def restart_replicas(
    info: ProductionStack,
    *,
    lease_storage: str | None = None,
    die_with_caller: bool,
    wait: bool = True,
    timeout_s: float = 180,
) -> None:
    """Start every API replica that is not running (again), optionally all of them with
    another lease storage; with `wait`, until haproxy routes to all of them."""
    if lease_storage is not None and lease_storage != info.lease_storage:
        info.lease_storage = lease_storage
        for index in range(len(info.replica_ports)):
            if f"api-{index}" in info.pids:
                stop_process(info, f"api-{index}")
    for index in range(len(info.replica_ports)):
        name = f"api-{index}"
        if name not in info.pids or not stack.pid_alive(info.pids[name]):
            start_replica(info, index, die_with_caller=die_with_caller)
    _save(info)
    if not wait:
        return  # haproxy adds each replica once its health checks pass
    for index in range(len(info.replica_ports)):
        wait_replica_healthy(info, index, timeout_s)
    time.sleep(HAPROXY_RISE_S)  # haproxy marks a server up after two passing checks


HAPROXY_RISE_S = 3.0


def purge(state_dir: Path) -> None:
    """Stop the stack and delete all its state, Postgres data included (tests, benches).
    The data may live outside the state dir when the postgres user cannot reach it."""
    down_production(state_dir)
    secrets_file = state_dir / "secrets.json"
    if secrets_file.exists():
        data = Path(json.loads(secrets_file.read_text())["postgres_data"])
        if data.parent.name.startswith("invoiceflow-postgres-"):
            shutil.rmtree(data.parent, ignore_errors=True)
    shutil.rmtree(state_dir, ignore_errors=True)
