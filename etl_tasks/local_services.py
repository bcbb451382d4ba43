"""Processes `etl demo` (and the test suite) start on one machine: redis-server and workers.

In production these run under a supervisor or docker-compose; here they are children of the
command that started them, stopped when it ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from etl_tasks.errors import FatalError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """A CA certificate and a certificate and key it signed (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    def directives(self) -> dict[str, str]:
        """redis-server's and redis-sentinel's TLS directives: clients need not show a
        certificate; replication and a sentinel's links to the servers use TLS too."""
        return {"tls-cert-file": str(self.cert), "tls-key-file": str(self.key),
                "tls-ca-cert-file": str(self.ca), "tls-auth-clients": "optional",
                "tls-replication": "yes"}

    def client_options(self) -> dict[str, Any]:
        return {"ssl": True, "ssl_ca_certs": str(self.ca)}


@dataclass
class RedisServer:
    """A redis-server on a free loopback port, append-only file in `directory`.

    With `appendonly=False` it keeps nothing: a restart starts empty (the fault tests' case).
    `maxmemory` bounds it with `noeviction`: a full Redis refuses writes (staging treats that
    as a transient error) rather than evicting queues, run state or staged chunks.
    `password` sets requirepass (and masterauth, so it can follow a master with the same
    one); it never goes in `url`: clients take it from ETL_REDIS_PASSWORD. With `tls` the
    port speaks TLS only (`rediss://`). `replica_of` makes it a replica of that server.
    """

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    appendonly: bool = True
    maxmemory: str = "1gb"
    password: str | None = field(default=None, repr=False)
    tls: TlsFiles | None = None
    replica_of: RedisServer | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def client(self, **options: Any) -> redis.Redis:
        """A client of this very server (not following a failover), with its password."""
        tls = self.tls.client_options() if self.tls else {}
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           **tls, **options)

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FatalError("redis-server is not installed: run `sudo apt-get install "
                             "redis-server` (or set ETL_REDIS_URL to a running Redis)")
        self.directory.mkdir(parents=True, exist_ok=True)
        ports = ["--port", str(self.port)] if self.tls is None else \
            ["--port", "0", "--tls-port", str(self.port),
             *(arg for key, value in self.tls.directives().items()
               for arg in (f"--{key}", value))]
        auth = [] if self.password is None else \
            ["--requirepass", self.password, "--masterauth", self.password]
        # A replica's first sync starts at once, not after the 5 s diskless-sync delay.
        follow = ["--repl-diskless-sync-delay", "0"] + (
            [] if self.replica_of is None else
            ["--replicaof", "127.0.0.1", str(self.replica_of.port)])
        self.process = subprocess.Popen(
            [binary, *ports, "--bind", "127.0.0.1", "--dir",
             str(self.directory.resolve()), "--appendonly", "yes" if self.appendonly else "no",
             "--appendfsync", "everysec", "--save", "", "--logfile", "redis.log",
             "--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction",
             *auth, *follow],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_ping(self.client(), self.process, self.directory / "redis.log",
                       "redis-server")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def restart(self) -> RedisServer:
        """kill -9 the server and start it again on the same port and folder: with what its
        append-only file kept, or empty when it keeps none."""
        self.stop(signal.SIGKILL)
        return self.start()

    def wait_replicated(self, timeout: float = 15) -> None:
        """Block until a replica of this server streams its writes: after its first sync a
        replica receives them only once it acknowledged (within a second)."""
        client = self.client()
        client.set("etl:replication:probe", time.time())
        if client.wait(1, int(timeout * 1000)) < 1:
            raise FatalError(f"no replica of redis-server :{self.port} acknowledged a write "
                             f"within {timeout:.0f}s; see {self.directory / 'redis.log'}")


def _wait_for_ping(client: redis.Redis, process: subprocess.Popen[bytes], log: Path,
                   what: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            if client.ping():
                return
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise FatalError(f"{what} did not start; see {log}") from None
            time.sleep(0.05)


SENTINEL_PACKAGE = "redis-sentinel"


@dataclass
class RedisSentinel:
    """A redis-sentinel (Debian's package, not its system service) on a free loopback port,
    watching `master` as `master_name`; its config (which Sentinel rewrites as it learns) and
    log live in `directory`.

    Failover is quick for tests: the master is down after `down_after_ms` without an answer,
    and with one sentinel a quorum of 1 starts the failover at once. `password` is the
    sentinel's own requirepass (ETL_REDIS_SENTINEL_PASSWORD); the master's password, if any,
    is given to it with `sentinel auth-pass`. With TLS on the master, the sentinel speaks
    TLS both ways. Sentinels started on the same master find each other through it.
    """

    directory: Path
    master: RedisServer
    master_name: str = "etl"
    quorum: int = 1
    port: int = field(default_factory=free_port)
    password: str | None = field(default=None, repr=False)
    down_after_ms: int = 1000
    failover_timeout_ms: int = 5000
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A client of this sentinel (SENTINEL commands)."""
        tls = self.master.tls
        options = tls.client_options() if tls else {}
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           decode_responses=True, **options)

    def start(self) -> RedisSentinel:
        binary = shutil.which("redis-sentinel")
        if binary is None:
            raise FatalError(f"redis-sentinel is not installed: run `sudo apt-get install "
                             f"{SENTINEL_PACKAGE}` (`make test` installs it; its system "
                             "service is not used)")
        self.directory.mkdir(parents=True, exist_ok=True)
        name, tls = self.master_name, self.master.tls
        lines = [f"port {0 if tls else self.port}", "bind 127.0.0.1",
                 f"dir {self.directory.resolve()}", "logfile sentinel.log",
                 f"sentinel monitor {name} 127.0.0.1 {self.master.port} {self.quorum}",
                 f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                 f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                 f"sentinel parallel-syncs {name} 1"]
        if self.master.password is not None:
            lines.append(f"sentinel auth-pass {name} {self.master.password}")
        if self.password is not None:  # its own, and the one its peers have
            lines += [f"requirepass {self.password}", f"sentinel sentinel-pass {self.password}"]
        if tls:
            lines.append(f"tls-port {self.port}")
            lines += [f"{key} {value}" for key, value in tls.directives().items()]
        config = self.directory / "sentinel.conf"
        config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen([binary, str(config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        _wait_for_ping(self.client(), self.process, self.directory / "sentinel.log",
                       "redis-sentinel")
        return self

    def master_port(self) -> int | None:
        """The port of the server this sentinel names master now (None: it names none)."""
        address: Any = self.client().sentinel_get_master_addr_by_name(self.master_name)
        return int(address[1]) if address else None

    def knows_replicas(self) -> int:
        """How many replicas of the master this sentinel sees up (a failover needs one)."""
        replicas = self.client().sentinel_slaves(self.master_name)
        return sum(1 for r in replicas if not {"s_down", "o_down", "disconnected"} &
                   set(str(r.get("flags", "")).split(",")))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None


@dataclass
class Worker:
    """A real `celery worker` process of one role (`fleet` or `loader`)."""

    role: str
    env: dict[str, str]
    log_path: Path
    extra: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"workers.{self.role}", *self.extra],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: kill it with its children
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # warm shutdown: finish the current task
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        """kill -9 the worker and its pool children: the fault a crash produces."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def wait_for_workers(app_control: object, names: list[str], timeout: float = 60) -> None:
    """Block until a worker of each role prefix in `names` answers a ping."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app_control.ping(timeout=0.5) or []  # type: ignore[attr-defined]
        seen = {name for reply in replies for name in reply}
        if all(any(s.startswith(prefix) for s in seen) for prefix in names):
            return
    raise FatalError(f"workers {names} did not come up within {timeout:.0f}s; see their logs")


FIREBIRD_SERVER_PACKAGE = "firebird3.0-server"
_FIREBIRD_BINARY = Path("/usr/sbin/firebird")
_FIREBIRD_SECURITY_SQL = Path("/usr/share/firebird/3.0/security.sql")


def _firebird_server_files() -> tuple[Path, Path, Path]:
    """The server binary, its root folder (plugins, intl, firebird.msg) and isql-fb of
    Debian's firebird3.0-server; a FatalError naming the package when one is missing."""
    roots = sorted(Path("/usr/lib").glob("*/firebird/3.0"))  # multiarch: x86_64-linux-gnu
    root = next((r for r in roots if (r / "firebird.msg").exists()), None)
    isql = shutil.which("isql-fb")
    if not _FIREBIRD_BINARY.exists() or root is None or isql is None or \
            not _FIREBIRD_SECURITY_SQL.exists():
        raise FatalError(f"the Firebird server is not installed: run `sudo apt-get install "
                         f"{FIREBIRD_SERVER_PACKAGE}` (Debian/Ubuntu; `make test` installs it)")
    return _FIREBIRD_BINARY, root, Path(isql)


@dataclass
class FirebirdServer:
    """A private Firebird 3 server (Debian's firebird3.0-server) on a free loopback port.

    Not the system service: a child process of whoever starts it, stopped (`stop`, SIGTERM),
    killed (`kill`, SIGKILL) and started again on the same port by its owner. Everything it
    uses is under `directory`: `conf/` (its own firebird.conf, named by FIREBIRD, with
    symbolic links to the package's plugins, intl and messages), `lock/` (FIREBIRD_LOCK),
    `system/security3.fdb` (its own security database, made once with isql-fb, where SYSDBA
    has `password` under Srp, which the Firebird 5 client of the firebird-embedded wheel
    speaks), `server.log` (its output; the package's build keeps its own log in
    /var/log/firebird). Databases can only be opened under `directory` (DatabaseAccess):
    `dsn(path)` names one for ETL_FIREBIRD_DSN. `host` is the address it listens on and
    `prefix` a command it runs under: `("ip", "netns", "exec", "<ns>")` starts it on a test
    host of tests/integration/test_hosts.py, listening on that host's address.
    """

    directory: Path
    port: int = field(default_factory=free_port)
    user: str = "SYSDBA"
    password: str = "masterkey"
    host: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def security_db(self) -> Path:
        return self.directory / "system" / "security3.fdb"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    def dsn(self, path: Path | str) -> str:
        """`<host>/<port>:<path>`: a database file of this server, for ETL_FIREBIRD_DSN."""
        return f"{self.host}/{self.port}:{Path(path).resolve()}"

    def start(self) -> FirebirdServer:
        binary, root, isql = _firebird_server_files()
        self.directory = self.directory.resolve()
        self._configure(root, isql)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([*self.prefix, str(binary)], env=self._env(),
                                            cwd=self.directory, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop(signal.SIGKILL)
                    raise FatalError(f"the Firebird server did not start on port {self.port}; "
                                     f"see {self.log_path} and /var/log/firebird/") from None
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGTERM: it closes its connections and exits); SIGKILL after 30 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """kill -9 the server: its clients' connections break mid-statement."""
        self.stop(signal.SIGKILL)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("LD_LIBRARY_PATH", "ISC_USER", "ISC_PASSWORD")}
        env.update(FIREBIRD=str(self.directory / "conf"),
                   FIREBIRD_LOCK=str(self.directory / "lock"),
                   FIREBIRD_TMP=str(self.directory / "tmp"))
        return env

    def _configure(self, root: Path, isql: Path) -> None:
        """Write the server's folders and configuration; make its security database once."""
        conf = self.directory / "conf"
        for folder in (conf, self.directory / "lock", self.directory / "tmp",
                       self.security_db.parent):
            folder.mkdir(parents=True, exist_ok=True)
        for item in root.iterdir():
            link = conf / item.name
            if item.name in ("firebird.conf", "databases.conf") or link.is_symlink():
                continue
            link.symlink_to(item)
        # The build fixes where plugins and intl live; the configuration and messages are
        # read from the root that FIREBIRD names (this folder).
        (conf / "firebird.conf").write_text(
            "# A private server for tests, written by etl_tasks.local_services.FirebirdServer\n"
            f"RemoteServicePort = {self.port}\n"
            f"RemoteBindAddress = {self.host}\n"
            f"DatabaseAccess = Restrict {self.directory}\n"
            f"SecurityDatabase = {self.security_db}\n"
            "AuthServer = Srp\n"
            "UserManager = Srp\n"
            "ServerMode = Super\n"
            "UdfAccess = None\n"
            f"TempDirectories = {self.directory / 'tmp'}\n")
        (conf / "databases.conf").write_text(
            f"security.db = {self.security_db}\n{{\n    RemoteAccess = false\n}}\n")
        if not self.security_db.exists():
            self._make_security_db(isql)

    def _make_security_db(self, isql: Path) -> None:
        """The security database, made as Debian's postinst makes the system one (isql-fb
        on the embedded engine), with SYSDBA's Srp password set."""
        password = self.password.replace("'", "''")
        steps = [
            ([str(isql), "-q", "-b"], f"CREATE DATABASE '{self.security_db}';\n"),
            ([str(isql), "-q", "-b", "-user", self.user, "-i", str(_FIREBIRD_SECURITY_SQL),
              str(self.security_db)], ""),
            ([str(isql), "-q", "-b", "-user", self.user, str(self.security_db)],
             f"CREATE OR ALTER USER {self.user} PASSWORD '{password}' USING PLUGIN Srp;\n"
             "COMMIT;\n"),
        ]
        for command, script in steps:
            done = subprocess.run(command, input=script.encode(), env=self._env(),
                                  cwd=self.directory, capture_output=True, timeout=60)
            if done.returncode != 0:
                self.security_db.unlink(missing_ok=True)
                raise FatalError(f"could not make the Firebird server's security database "
                                 f"{self.security_db}: isql-fb exited {done.returncode}: "
                                 f"{done.stderr.decode(errors='replace').strip()[:500]}")
