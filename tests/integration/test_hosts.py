"""Several hosts on one machine (issue 10; ../shared/FAULTS.md F13): Linux network namespaces
joined by veth pairs to a bridge, each running what docker-compose.yml runs there, started
from the compose file's own command, environment and health checks (tests/compose_file.py).

    svc  10.77.0.1   redis (the compose command: password, AOF, noeviction) and the
                     Firebird server the compose file's ETL_FIREBIRD_DSN names (port 3050)
    w1   10.77.0.11  fleet
    w2   10.77.0.12  fleet
    ld   10.77.0.21  loader and beat
    (this process: 10.77.0.254, like `docker compose exec loader etl ...`)

The hosts share the machine's filesystem (volumes and secrets are folders of the test) but
each has its own network and host name. A first run completes across the hosts; in a second,
w2's link is cut (`ip link set eth0 down` in its namespace) while it extracts: the supervisor
re-sends what it held and w1 finishes it (the time it took is printed); the totals are exact
by the shared oracle. w2's link then comes back: it rejoins, and a third run across both
hosts still doubles nothing.

Needs root (CI runs as root) and iproute2; it fails, never skips, without them. Namespaces
and links are named etlh-*: leftovers of an aborted run are removed first, and everything
is removed at the end, even on failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from etl_tasks.api import RunHandle, run_source
from etl_tasks.celery import app
from etl_tasks.demo_data import generate_claims, make_billing_db
from etl_tasks.local_services import FirebirdServer
from etl_tasks.resources import get_resources
from etl_tasks.runs import state
from etl_tasks.sealing import new_key
from etl_tasks.sources.firebird import FirebirdTarget
from tests import compose_file
from tests.integration import oracle
from tests.integration.fault_stack import FaultStack, point_process_at, wait_until

pytestmark = pytest.mark.integration

PREFIX = "etlh"
SUBNET = "10.77.0"
HUB = f"{PREFIX}-hub"
CLIENT = f"{SUBNET}.254"
# host -> last byte of its address
HOSTS = {"svc": 1, "w1": 11, "w2": 12, "ld": 21}
ROLES = {"w1": ["fleet"], "w2": ["fleet"], "ld": ["loader", "beat"]}
CLAIMS = 12_000
CHUNK_SIZE = 1_500  # eight key ranges a run
EXTRACT_DELAY_S = 2  # each extract holds its unit this long: a cut lands mid-task
OVERDUE_S = 5
PIPELINE = f"""
[[sources]]
name = "billing"
kind = "firebird"
location = "BILLING_CLAIMS"
schedule = "manual"
chunk_size = {CHUNK_SIZE}
"""
# What the test changes in the compose file's environment, and why: its own pipeline (one
# source, run when asked), a supervisor fast enough for a test (the bound under test), and
# on the fleet a slow extract, so that the cut finds w2 holding work.
TEST_ENV = {"ETL_OVERDUE_S": str(OVERDUE_S), "ETL_SUPERVISE_EVERY_S": "1"}
FLEET_ENV = {"ETL_FAULT_POINT": "extract", "ETL_FAULT_ACTION": f"delay:{EXTRACT_DELAY_S}"}
# Compose's variables: the passwords an operator sets, a Redis sized for a test.
PASSWORDS = {"FIREBIRD_PASSWORD": secrets.token_urlsafe(12),
             "FLOWER_PASSWORD": "unused", "GRAFANA_PASSWORD": "unused"}


def ns(host: str) -> str:
    return f"{PREFIX}-{host}"


def address(host: str) -> str:
    return f"{SUBNET}.{HOSTS[host]}"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def remove_network() -> None:
    """Remove every etlh-* namespace (killing what still runs in one: processes of an
    aborted run of this test) and this process's leg."""
    listed = ip("netns", "list").stdout.split()
    for name in [n for n in listed if n.startswith(f"{PREFIX}-")]:
        for pid in ip("netns", "pids", name, check=False).stdout.split():
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        ip("netns", "del", name, check=False)
    ip("link", "del", f"{PREFIX}-root", check=False)


def create_network() -> None:
    """A bridge in a hub namespace, one namespace per host with its eth0 on the bridge, and
    a leg for this process (etlh-root, in the root namespace)."""
    remove_network()
    ip("netns", "add", HUB)
    ip("-n", HUB, "link", "add", "br0", "type", "bridge")
    ip("-n", HUB, "link", "set", "br0", "up")
    for host in HOSTS:
        ip("netns", "add", ns(host))
        ip("-n", HUB, "link", "add", host, "type", "veth", "peer", "name", "eth0",
           "netns", ns(host))
        ip("-n", HUB, "link", "set", host, "master", "br0", "up")
        ip("-n", ns(host), "addr", "add", f"{address(host)}/24", "dev", "eth0")
        ip("-n", ns(host), "link", "set", "eth0", "up")
        ip("-n", ns(host), "link", "set", "lo", "up")  # health checks ask 127.0.0.1
    ip("link", "add", f"{PREFIX}-root", "type", "veth", "peer", "name", "root", "netns", HUB)
    ip("-n", HUB, "link", "set", "root", "master", "br0", "up")
    ip("addr", "add", f"{CLIENT}/24", "dev", f"{PREFIX}-root")
    ip("link", "set", f"{PREFIX}-root", "up")


def set_link(host: str, up: bool) -> None:
    """Cut (or restore) a host's only link: its eth0 down, as a pulled cable or a dead
    switch port; its processes keep running."""
    ip("-n", ns(host), "link", "set", "eth0", "up" if up else "down")


def on_host(host: str, argv: list[str]) -> list[str]:
    """`argv` on a test host: in its network namespace, with its own host name (a worker's
    node name and the health check's ping name carry it)."""
    return ["ip", "netns", "exec", ns(host), "unshare", "--uts", "sh", "-c",
            'hostname "$0" && exec "$@"', ns(host), *argv]


@dataclass
class Hosts:
    """The hosts' processes, the compose roles they run, and the test's folders."""

    root: Path
    compose: dict[str, Any]
    volumes: dict[str, Path]
    secrets: dict[str, Path]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    roles: dict[str, compose_file.Role] = field(default_factory=dict)

    def role(self, host: str, service: str, extra: dict[str, str] | None = None
             ) -> compose_file.Role:
        private = self.root / "hosts" / host
        role = compose_file.role(self.compose, service, hosts={"redis": address("svc"),
                                 "firebird": address("svc")}, volumes=self.volumes,
                                 secrets=self.secrets, private=private)
        env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": str(private / "home"),
               **role.env}
        if service != "redis":
            env.update(ETL_PIPELINE_CONFIG=str(self.root / "pipeline.toml"), **TEST_ENV,
                       **(extra or {}))
        return compose_file.Role(role.service, role.argv, env, role.health)

    def start(self, host: str, service: str, extra: dict[str, str] | None = None) -> int:
        role = self.role(host, service, extra)
        private = self.root / "hosts" / host
        (private / "home").mkdir(parents=True, exist_ok=True)
        log = (self.root / "logs" / f"{host}-{service}.log")
        log.parent.mkdir(exist_ok=True)
        with log.open("ab") as out:
            process = subprocess.Popen(on_host(host, role.argv), env=role.env, cwd=private,
                                       stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes[f"{host}/{service}"] = process
        self.roles[f"{host}/{service}"] = role
        return process.pid

    def health(self, host: str, service: str, timeout: float = 30) -> tuple[int, str]:
        """Run the compose file's health check of `service` on `host`: (exit code, output)."""
        role = self.roles[f"{host}/{service}"]
        assert role.health is not None, f"{service} has no health check in docker-compose.yml"
        try:
            done = subprocess.run(on_host(host, role.health), env=role.env,
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return 124, f"no answer within {timeout:.0f}s"
        return done.returncode, (done.stdout + done.stderr).strip()

    def wait_healthy(self, host: str, service: str, timeout: float = 60) -> str:
        last: tuple[int, str] = (1, "")

        def healthy() -> bool:
            nonlocal last
            last = self.health(host, service)
            return last[0] == 0

        try:
            wait_until(healthy, timeout, f"{service} on {host} healthy", every=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: last check said {last[1]!r}; {self.logs()}") from None
        return last[1]

    def node(self, host: str, service: str) -> str:
        return f"{service}-{self.processes[f'{host}/{service}'].pid}@{ns(host)}"

    def log(self, host: str, service: str) -> str:
        return (self.root / "logs" / f"{host}-{service}.log").read_text(errors="replace")

    def logs(self) -> str:
        return f"logs in {self.root / 'logs'}"

    def stop(self) -> None:
        for process in self.processes.values():
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)


@dataclass
class World:
    """What the oracle counts: Firebird through its server, DuckDB from its volume."""

    firebird_target: FirebirdTarget
    duckdb_path: Path

    # The fault stack's readers, which need only these two attributes.
    firebird = FaultStack.firebird
    query = FaultStack.query


def require_root_and_iproute2() -> None:
    if os.geteuid() != 0:
        pytest.fail("the multi-host test creates network namespaces and veth links: run it "
                    "as root (CI does)")
    for tool in ("ip", "unshare", "redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: `make test` installs iproute2, util-linux and "
                        "redis-server")


@contextmanager
def hosts_up(root: Path) -> Iterator[tuple[Hosts, World]]:
    """The network, Redis and Firebird on svc, the roles on their hosts, all healthy; this
    process pointed at the cluster. Everything is torn down on exit, even on failure."""
    require_root_and_iproute2()
    compose = compose_file.load({**PASSWORDS, "REDIS_MAXMEMORY": "256mb"})
    volumes = {name: root / "volumes" / name for name in compose["volumes"]}
    for folder in volumes.values():
        folder.mkdir(parents=True)
    (root / "secrets").mkdir()
    values = {"staging_key": new_key(), "redis_password": secrets.token_urlsafe(16),
              "firebird_password": PASSWORDS["FIREBIRD_PASSWORD"]}
    secret_files = {}
    for name, value in values.items():
        secret_files[name] = root / "secrets" / name
        secret_files[name].write_text(value + "\n")  # as a secrets file often ends
    (root / "pipeline.toml").write_text(PIPELINE)
    cluster = Hosts(root, compose, volumes, secret_files)
    saved = dict(os.environ)
    dsn = cluster.role("ld", "loader").env["ETL_FIREBIRD_DSN"]
    port = int(dsn.split("/", 1)[1].split(":", 1)[0])
    server = FirebirdServer(volumes["firebird"], port=port, host=address("svc"),
                            password=PASSWORDS["FIREBIRD_PASSWORD"],
                            prefix=("ip", "netns", "exec", ns("svc")))
    try:
        create_network()
        cluster.start("svc", "redis")
        print(f"redis on svc: {cluster.wait_healthy('svc', 'redis', 30) or 'PONG'}")
        server.start()
        # This process is a client host too, with the loader's settings (`docker compose
        # exec loader etl ...`), reaching svc through its leg on the bridge.
        client = cluster.role("client", "loader")
        point_process_at({**{k: v for k, v in saved.items() if not k.startswith("ETL_")},
                          **client.env})
        target = FirebirdTarget(dsn=dsn, user="SYSDBA",
                                password=PASSWORDS["FIREBIRD_PASSWORD"],
                                runtime_dir=Path(client.env["ETL_FIREBIRD_RUNTIME_DIR"]))
        make_billing_db(target, CLAIMS)
        for host, services in ROLES.items():
            for service in services:
                cluster.start(host, service, FLEET_ENV if service == "fleet" else None)
        for host, services in ROLES.items():
            for service in services:
                print(f"{service} on {host}: {cluster.wait_healthy(host, service)}")
        yield cluster, World(target, Path(client.env["ETL_DUCKDB_PATH"]))
    finally:
        cluster.stop()
        server.kill()
        remove_network()
        point_process_at(saved)


def wait_end(handle: RunHandle, timeout: float, cluster: Hosts) -> state.Summary:
    try:
        return handle.wait(timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"run {handle.run_id} did not end within {timeout:.0f}s: "
                             f"{handle.progress()}; {cluster.logs()}") from None


def extracting(node: str, run_id: str) -> list[str]:
    """Units of `run_id` the worker `node` is extracting now (its active tasks)."""
    replies = app.control.inspect(destination=[node], timeout=1.0, limit=1).active() or {}
    return [task["args"][1] for task in replies.get(node, [])
            if task["name"] == "etl.extract.unit" and task["args"][0] == run_id]


def finished(run_id: str, units: list[str]) -> bool:
    """Every chunk of every one of `units` committed by the loader."""
    r = get_resources().redis
    of_unit = state.chunk_units(r, run_id)
    done = state.done_chunks(r, run_id)
    return all(state.is_split(r, run_id, unit) and
               all(chunk in done for chunk, u in of_unit.items() if u == unit)
               for unit in units)


def test_a_cut_host_s_work_is_finished_by_the_other(tmp_path):
    with hosts_up(tmp_path) as (cluster, world):
        # 1. A run across the hosts: both fleet hosts extract, the loader commits.
        first = run_source("billing")
        summary = wait_end(first, 120, cluster)
        assert summary.status == "finished", summary
        oracle.check(world, "hosts: a run across hosts")
        for host in ("w1", "w2"):
            assert first.run_id in cluster.log(host, "fleet"), \
                f"{host} did no work of the first run; {cluster.logs()}"

        # 2. New claims, a run, and w2's link cut while it holds units.
        generate_claims(world.firebird_target, CLAIMS + 1, CLAIMS)
        second = run_source("billing")
        w2 = cluster.node("w2", "fleet")
        held = wait_until(lambda: extracting(w2, second.run_id), 60,
                          "w2 extracting a unit of the second run", every=0.05)
        set_link("w2", up=False)
        cut_at = time.monotonic()
        assert not finished(second.run_id, held), "w2's units ended before the cut"
        code, said = cluster.health("w2", "fleet")
        assert code != 0, f"w2's health check passed with its link down: {said}"
        print(f"w2 cut holding {held}; its health check: {said}")
        wait_until(lambda: finished(second.run_id, held), 60,
                   f"w2's units {held} finished by another host")
        moved_s = time.monotonic() - cut_at
        summary = wait_end(second, 120, cluster)
        ended_s = time.monotonic() - cut_at
        print(f"hosts: the cut host's work was finished elsewhere {moved_s:.1f}s after the cut "
              f"(supervisor bound ETL_OVERDUE_S={OVERDUE_S}s + a supervise interval + the "
              f"step itself); the run ended {ended_s:.1f}s after the cut")
        assert summary.status == "finished", summary
        assert moved_s < OVERDUE_S + 2 * EXTRACT_DELAY_S + 15, moved_s
        oracle.check(world, "hosts: a fleet host cut mid-run", fault_at=cut_at,
                     ended_at=cut_at + ended_s)
        w1_log = cluster.log("w1", "fleet")
        assert all(unit in w1_log for unit in held), f"w1 never extracted {held}"

        # 3. The link back: w2 rejoins, and a third run across both hosts doubles nothing.
        set_link("w2", up=True)
        print(f"w2 back: {cluster.wait_healthy('w2', 'fleet', 120)}")
        generate_claims(world.firebird_target, 2 * CLAIMS + 1, CLAIMS)
        summary = wait_end(run_source("billing"), 120, cluster)
        assert summary.status == "finished", summary
        tally = oracle.check(world, "hosts: after the cut host rejoined")
        assert tally.source == 3 * CLAIMS
