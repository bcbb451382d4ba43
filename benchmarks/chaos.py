"""Chaos run: the real pipeline over a growing Firebird source while its parts are killed.

    .venv/bin/python benchmarks/chaos.py --minutes 10 --seed 7
    .venv/bin/python benchmarks/chaos.py --minutes 2 --seed 7 --claims 50000 --keep /tmp/chaos
    .venv/bin/python benchmarks/chaos.py --minutes 10 --seed 7 --json     # one JSON object

Not a test (FAULTS.md, "A chaos run"); run it on demand from the repository root. It needs
what `make test` needs (`redis-server`, `libtommath1`) and builds its own world in a temporary
folder (`--keep DIR`: in DIR, left there with the Firebird database, the DuckDB file, the
worker logs in `logs/`, redis' folder and `chaos.log`, the timeline of what it did):

- a redis-server on a free port with its append-only file on (`local_services.RedisServer`);
- an embedded Firebird demo database with `--claims` claims (`make_billing_db`);
- a pipeline config with only `billing` (chunk_size 5,000, `schedule` 5 s: beat runs it),
  ETL_OVERDUE_S=10 and ETL_SUPERVISE_EVERY_S=2, ETL_WRITER_LEASE_S=10 (a loader restarted after
  kill -9 waits for its predecessor's writer lease to lapse);
- the fleet (`--concurrency 2`), the loader and beat as real processes (`local_services.Worker`).

For `--minutes` a feeder thread adds 1,000 to 4,000 claims every 2 to 5 s and updates 20 to
200 of the last 25,000 (AMOUNT + 1, UPDATED_AT = CURRENT_TIMESTAMP), while a chaos thread,
every 10 to 30 s, injects one fault drawn with the seed (the sequence of kinds is the same for
a seed; the times shift with the machine): kill -9 the fleet (main process and pool, a new
fleet after 0 to 5 s; 25%), kill -9 one fleet pool child (25%), kill -9 the loader (restarted
at once; 20%), kill -9 redis-server and restart it from its append-only file (20%), or kill -9
it and restart it empty (its AOF deleted: the pipeline must rebuild its checkpoints from the
DuckDB ledger; 10%). Then it stops the feeder and the chaos, makes sure every process is up,
lets beat's runs catch up (at most `--catchup-s`, default 300) until the store holds every
source row in its current version, and counts independently with the fault tests' oracle
(`tests/integration/oracle.py`): Firebird against DuckDB, never the pipeline's counters.
Firebird statements of this script run in a helper process of their own, started afresh
after a failure, so that the embedded engine in a long-lived process beside processes killed
with -9 cannot stop the feeder or the counts.

It prints faults injected (per kind), runs (finished / partial / failed in `etl_runs`),
source rows, loaded, quarantined, dead-lettered, lost, duplicated, stale (claims stored in
another version than Firebird's, or updated claims left quarantined though their current
version is valid: lost updates), stray (stored claims Firebird does not have), and the
recovery of each fault: from the fault to the end (finished or partial) of the first run
that *started after it*, with the longest and the mean, and the time to the first ledger
commit after it. Exit status 1 when lost, duplicated, stale or stray is not 0; 2 when the
world could not be built. Every process it started is stopped at the end, also on Ctrl-C,
SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python benchmarks/chaos.py` puts benchmarks/ first, not the repo
    sys.path.insert(0, str(REPO))

CHUNK_SIZE = 5_000
SCHEDULE_S = 5.0
PIPELINE_TOML = f"""
[[sources]]
name = "billing"
kind = "firebird"
location = "BILLING_CLAIMS"
key_column = "CLAIM_ID"
schedule = {SCHEDULE_S}
chunk_size = {CHUNK_SIZE}
target_table = "billing_claims"
"""

# Fault kinds and how often each is drawn.
FAULTS: dict[str, float] = {
    "fleet": 0.25,        # kill -9 the fleet's process group, a new fleet after 0-5 s
    "pool_child": 0.25,   # kill -9 one pool child of the fleet (Celery forks a new one)
    "loader": 0.2,        # kill -9 the loader, restarted at once
    "redis_aof": 0.2,     # kill -9 redis-server, restarted from its append-only file
    "redis_empty": 0.1,   # kill -9 redis-server, AOF deleted, restarted empty
}
FAULT_EVERY_S = (10.0, 30.0)
FEED_EVERY_S = (2.0, 5.0)
FEED_NEW = (1_000, 4_000)
FEED_UPDATES = (20, 200)
UPDATE_WINDOW = 25_000  # updates hit the most recent claims, loaded or in flight
STALE_BATCH = 50_000


class ChaosError(RuntimeError):
    """The world could not be built (a missing binary, a worker that never came up)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True,
                        help="how long the feeder and the chaos run")
    parser.add_argument("--seed", type=int, default=7, help="seed of the faults and the feeder")
    parser.add_argument("--claims", type=int, default=50_000, help="claims at the start")
    parser.add_argument("--keep", type=Path, default=None,
                        help="work in DIR and leave the databases, logs and chaos.log there")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--catchup-s", type=float, default=300.0,
                        help="longest wait at the end for the store to hold every row")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.claims < 1:
        parser.error("--claims must be at least 1")
    return args


# --- the world ------------------------------------------------------------------------------


@dataclass
class Fault:
    at: float  # time.time() of the kill
    t_s: float  # seconds since the clock started
    kind: str
    detail: str
    first_commit_s: float | None = None
    recovery_s: float | None = None


@dataclass
class Feed:
    inserted: int = 0
    update_statements: int = 0
    updated_ids: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


def _firebird_helper(conn: Any, env: dict[str, str]) -> None:
    """The Firebird side of `FirebirdHelper`, in a process of its own: ("sql", text, params),
    ("generate", first_id, count) or ("make", claims) in, ("ok", value) or ("error", why) out."""
    os.environ.clear()
    os.environ.update(env)
    from etl_tasks.demo_data import generate_claims, make_billing_db
    from etl_tasks.resources import get_resources
    from etl_tasks.sources.firebird import connect

    target = get_resources().firebird_target
    while True:
        try:
            op, args = conn.recv()
        except EOFError:  # the chaos run ended (or died): so does this process
            return
        try:
            value: Any = None
            if op == "sql":
                con = connect(target)
                try:
                    cur = con.cursor()
                    cur.execute(args[0], list(args[1]))
                    value = list(cur.fetchall()) if cur.description else []
                    cur.close()
                    con.commit()
                finally:
                    con.close()
            elif op == "generate":
                generate_claims(target, *args)
            elif op == "make":
                make_billing_db(target, *args)
            conn.send(("ok", value))
        except Exception as exc:  # noqa: BLE001 - reported to the caller with its cause
            cause = f" <- {type(exc.__cause__).__name__}: {exc.__cause__}" \
                if exc.__cause__ is not None else ""
            conn.send(("error", f"{type(exc).__name__}: {exc}{cause}".replace("\n", " ")[:400]))


class FirebirdHelper:
    """Every Firebird statement of the chaos run goes through one child process, started
    again after any failure. The embedded engine lives in each process that connects, and
    this one runs for many minutes beside processes killed with -9: a fresh process keeps a
    broken engine state (if any) from ending the feeder or the final counts."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.lock = threading.Lock()
        self.process: Any = None
        self.conn: Any = None
        self.restarts = 0

    def _spawn(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_firebird_helper, args=(child, self.env),
                                   name="chaos-firebird", daemon=True)
        self.process.start()
        child.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join(timeout=10)
            self.process = None

    def call(self, op: str, *args: Any, timeout: float = 300) -> Any:
        with self.lock:
            if self.process is None or not self.process.is_alive():
                self._spawn()
            why = f"no answer from the Firebird helper process in {timeout:.0f}s"
            try:
                self.conn.send((op, args))
                if self.conn.poll(timeout):
                    status, value = self.conn.recv()
                    if status == "ok":
                        return value
                    why = str(value)
            except (EOFError, OSError):
                why = "the Firebird helper process died"
            self.stop()  # the next call gets a fresh process
            self.restarts += 1
            raise FirebirdFailed(f"{op}: {why}")


class FirebirdFailed(RuntimeError):
    """A Firebird statement of the chaos run failed (in its helper process)."""


class World:
    """What one chaos run started, and how to read its two stores."""

    def __init__(self, root: Path, env: dict[str, str], redis_server: Any,
                 fb: FirebirdHelper) -> None:
        self.root = root
        self.env = env
        self.redis_server = redis_server
        self.fb = fb
        self.workers: dict[str, Any] = {}  # role -> the current Worker
        self.started: list[Any] = []  # every Worker ever started, for the final clean-up
        self.incarnation: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.clock0 = time.time()
        self.quiet = False
        self._log = (root / "chaos.log").open("a", buffering=1)

    def close_log(self) -> None:
        self._log.close()

    def log(self, message: str) -> None:
        line = f"{datetime.now().isoformat(timespec='milliseconds')} " \
               f"[{time.time() - self.clock0:7.1f}s] {message}"
        with suppress(ValueError):  # closed during the final clean-up
            self._log.write(line + "\n")
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    # -- processes ------------------------------------------------------------------------
    def start_worker(self, role: str) -> Any:
        from etl_tasks.local_services import Worker

        with self.lock:
            self.incarnation[role] += 1
            n = self.incarnation[role]
            log_path = self.root / "logs" / f"{role}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as log:
                log.write(f"\n=== chaos: {role} #{n} started at {datetime.now().isoformat()} "
                          f"===\n")
            # The pid file puts this run's folder in every command line (pgrep -f ROOT).
            pidfile = self.root / "pids" / f"{role}-{n}.pid"
            pidfile.parent.mkdir(parents=True, exist_ok=True)
            extra = ["--concurrency", "2"] if role == "fleet" else []
            worker = Worker(role, self.env, log_path, [*extra, "--pidfile", str(pidfile)])
            worker.start()
            self.workers[role] = worker
            self.started.append(worker)
            return worker

    def kill_worker(self, role: str) -> int:
        with self.lock:
            worker = self.workers[role]
            pid = int(worker.pid)
            with suppress(ProcessLookupError):
                worker.kill()
            return pid

    def alive(self, role: str) -> bool:
        worker = self.workers.get(role)
        return worker is not None and worker.process is not None and \
            worker.process.poll() is None

    def stop_all(self, graceful: bool) -> None:
        for worker in reversed(self.started):
            if worker.process is None:
                continue
            if graceful:
                with suppress(Exception):
                    worker.stop(timeout=15)
            # Whatever is left in its process group (pool children of a dead main process).
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.pid, signal.SIGKILL)
            with suppress(Exception):
                worker.process.wait(timeout=10)
        with suppress(Exception):
            self.redis_server.stop(signal.SIGTERM if graceful else signal.SIGKILL)

    def redis_alive(self) -> bool:
        process = self.redis_server.process
        return process is not None and process.poll() is None

    def redis_empty_restart(self) -> None:
        self.redis_server.stop(signal.SIGKILL)
        folder = Path(self.redis_server.directory)
        shutil.rmtree(folder / "appendonlydir", ignore_errors=True)
        for pattern in ("*.aof", "*.rdb"):
            for path in folder.glob(pattern):
                path.unlink()
        self.redis_server.start()

    # -- stores ---------------------------------------------------------------------------
    @property
    def duckdb_path(self) -> Path:
        return Path(self.env["ETL_DUCKDB_PATH"])

    def firebird(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run SQL on the source; the rows of a SELECT, [] for a change. A read is tried
        again (in a fresh helper process) when it fails."""
        reads = sql.lstrip().upper().startswith("SELECT")
        for attempt in range(1, 4 if reads else 2):
            try:
                return list(self.fb.call("sql", sql, list(params)))
            except FirebirdFailed as exc:
                self.log(f"Firebird: {exc}" + ("; trying again in a fresh process"
                                               if reads and attempt < 3 else ""))
                if not reads or attempt == 3:
                    raise
                time.sleep(1)
        raise AssertionError("unreachable")

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Read the store with a short read-only connection; wait while the loader holds it."""
        from etl_tasks.load import duckdb as store

        with store.read_only(self.duckdb_path, wait_s=60) as con:
            return con.execute(sql, params or []).fetchall()


def build(args: argparse.Namespace, root: Path) -> World:
    """The folder, the settings (in this process too) and the demo database; nothing runs."""
    for name in ("redis", "logs", "pids", "data", "chaos.log", "pipeline.toml"):
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    (root / "pipeline.toml").write_text(PIPELINE_TOML)
    data = root / "data"
    data.mkdir(parents=True)
    # Settings are read when etl_tasks is first imported: set them before any import.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "CELERY_"))}
    env = {
        **base,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")])),
        "ETL_DATA_DIR": str(data),
        "ETL_DUCKDB_PATH": str(data / "warehouse.duckdb"),
        "ETL_FIREBIRD_DSN": str(data / "billing.fdb"),
        "ETL_FIREBIRD_RUNTIME_DIR": str(data / ".firebird"),
        "ETL_PIPELINE_CONFIG": str(root / "pipeline.toml"),
        "ETL_STAGE_TTL_S": "3600",
        "ETL_OVERDUE_S": "10",
        "ETL_SUPERVISE_EVERY_S": "2",
        "ETL_WRITER_LEASE_S": "10",
    }
    from etl_tasks.local_services import RedisServer

    redis_server = RedisServer(root / "redis", appendonly=True)
    env["ETL_REDIS_URL"] = redis_server.url
    os.environ.clear()
    os.environ.update(env)

    from etl_tasks.celery import use_redis
    from etl_tasks.resources import reset_resources

    reset_resources()
    use_redis(redis_server.url)
    world = World(root, env, redis_server, FirebirdHelper(env))
    world.quiet = args.json
    world.fb.call("make", args.claims, timeout=600)
    return world


def start(world: World) -> None:
    """Redis, then the fleet, the loader and beat; returns when the workers answer."""
    from etl_tasks.celery import app
    from etl_tasks.errors import FatalError
    from etl_tasks.local_services import wait_for_workers

    try:
        world.redis_server.start()
        world.log(f"redis-server on port {world.redis_server.port} (appendonly), "
                  f"database {world.env['ETL_FIREBIRD_DSN']}")
        for role in ("fleet", "loader", "beat"):
            world.start_worker(role)
        wait_for_workers(app.control, [f"fleet-{world.workers['fleet'].pid}@", "loader-"],
                         timeout=120)
    except FatalError as exc:
        raise ChaosError(f"{exc}; see {world.root / 'logs'}") from exc
    world.log("fleet, loader and beat are up")


# --- feeder and chaos -----------------------------------------------------------------------


def feeder(world: World, rng: random.Random, stop: threading.Event, feed: Feed) -> None:
    """Grow the source and update recent claims until told to stop."""
    while not stop.wait(rng.uniform(*FEED_EVERY_S)):
        try:
            [(top,)] = world.firebird("SELECT MAX(CLAIM_ID) FROM BILLING_CLAIMS")
            top = int(top or 0)
            n = rng.randint(*FEED_NEW)
            world.fb.call("generate", top + 1, n)
            feed.inserted += n
            k = rng.randint(*FEED_UPDATES)
            low = max(1, top - UPDATE_WINDOW + 1)
            ids = sorted(rng.sample(range(low, top + 1), min(k, top - low + 1)))
            if ids:
                marks = ", ".join("?" * len(ids))
                world.firebird("UPDATE BILLING_CLAIMS SET AMOUNT = AMOUNT + 1, UPDATED_AT = "
                               f"CURRENT_TIMESTAMP WHERE CLAIM_ID IN ({marks})", ids)
                feed.update_statements += 1
                feed.updated_ids.update(ids)
        except FirebirdFailed as exc:  # the feeder keeps going; the error is shown
            feed.errors.append(str(exc)[:300])
            world.log(f"feeder error: {exc}")


def inject(world: World, kind: str, rng: random.Random) -> Fault:
    """One fault of `kind`, for real; returns its record (time = the kill)."""
    if kind == "fleet":
        at = time.time()
        pid = world.kill_worker("fleet")
        pause = rng.uniform(0, 5)
        time.sleep(pause)
        new = world.start_worker("fleet")
        detail = f"kill -9 fleet group {pid}; new fleet {new.pid} after {pause:.1f}s"
    elif kind == "pool_child":
        children: list[int] = []
        deadline = time.monotonic() + 15
        while not children and time.monotonic() < deadline:
            from tests.integration.fault_stack import child_pids

            children = child_pids(world.workers["fleet"].pid)
            if not children:
                time.sleep(0.5)
        at = time.time()
        if not children:
            detail = f"fleet {world.workers['fleet'].pid} has no pool child: nothing killed"
        else:
            victim = rng.choice(children)
            with suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
            detail = f"kill -9 pool child {victim} of fleet {world.workers['fleet'].pid}"
    elif kind == "loader":
        at = time.time()
        pid = world.kill_worker("loader")
        new = world.start_worker("loader")
        detail = f"kill -9 loader {pid}; new loader {new.pid}"
    elif kind == "redis_aof":
        at = time.time()
        world.redis_server.restart()
        detail = f"kill -9 redis-server; restarted from its AOF on port {world.redis_server.port}"
    elif kind == "redis_empty":
        at = time.time()
        world.redis_empty_restart()
        detail = f"kill -9 redis-server; AOF deleted; restarted empty on port " \
                 f"{world.redis_server.port}"
    else:
        raise ValueError(kind)
    return Fault(at=at, t_s=round(at - world.clock0, 1), kind=kind, detail=detail)


def chaos(world: World, rng: random.Random, stop: threading.Event, faults: list[Fault],
          errors: list[str]) -> None:
    kinds, weights = list(FAULTS), list(FAULTS.values())
    while not stop.wait(rng.uniform(*FAULT_EVERY_S)):
        kind = rng.choices(kinds, weights)[0]
        try:
            fault = inject(world, kind, rng)
        except Exception as exc:  # noqa: BLE001 - shown, and the end makes sure all is up
            errors.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])
            world.log(f"fault {kind} could not be injected: {type(exc).__name__}: {exc}")
            continue
        faults.append(fault)
        world.log(f"fault #{len(faults)} {kind} at {fault.t_s:.1f}s: {fault.detail}")


# --- the end --------------------------------------------------------------------------------


def ensure_up(world: World) -> list[str]:
    """Start whatever is down (Redis first); returns what had to be started."""
    restarted = []
    if not world.redis_alive():
        world.redis_server.start()
        restarted.append("redis")
    for role in ("fleet", "loader", "beat"):
        if not world.alive(role):
            world.start_worker(role)
            restarted.append(role)
    return restarted


def stale_claims(world: World) -> tuple[int, list[dict[str, Any]]]:
    """Stored claims whose (updated_at, amount) differ from Firebird's, over every key."""
    [(top,)] = world.firebird("SELECT MAX(CLAIM_ID) FROM BILLING_CLAIMS")
    stale, sample = 0, list[dict[str, Any]]()
    for lo in range(1, int(top or 0) + 1, STALE_BATCH):
        hi = lo + STALE_BATCH - 1
        source = {int(k): (ts, Decimal(a)) for k, ts, a in world.firebird(
            "SELECT CLAIM_ID, UPDATED_AT, AMOUNT FROM BILLING_CLAIMS WHERE CLAIM_ID BETWEEN ? "
            "AND ?", (lo, hi))}
        for k, ts, a in world.query("SELECT claim_id, updated_at, amount FROM billing_claims "
                                    "WHERE claim_id BETWEEN ? AND ?", [lo, hi]):
            want = source.get(int(k))
            if want is not None and want != (ts, Decimal(a)):
                stale += 1
                if len(sample) < 10:
                    sample.append({"claim_id": int(k), "firebird": [str(want[0]), str(want[1])],
                                   "stored": [str(ts), str(a)]})
    return stale, sample


def revalidated(world: World, updated: set[int]) -> list[int]:
    """Updated claims that are quarantined and not loaded, though their current version in
    Firebird is valid (AMOUNT + 1 can lift a planted non-positive amount above 0): the new
    version was never loaded, an update lost that the stored-version check cannot see."""
    import pyarrow as pa

    from etl_tasks.sources.firebird import CLAIM_COLUMNS
    from etl_tasks.transform import transform_chunk

    refs = world.query("SELECT DISTINCT source_ref FROM etl_quarantine WHERE source = "
                       "'billing' AND source_ref LIKE 'CLAIM_ID=%'")
    held = sorted({int(ref.split("=", 1)[1]) for (ref,) in refs
                   if ref.split("=", 1)[1].isdigit()} & updated)
    found: list[int] = []
    names = [name for name, _, _ in CLAIM_COLUMNS]
    for i in range(0, len(held), 1000):
        batch = held[i:i + 1000]
        marks = ", ".join("?" * len(batch))
        loaded = {int(k) for (k,) in world.query(
            f"SELECT claim_id FROM billing_claims WHERE claim_id IN ({marks})", batch)}
        rest = [k for k in batch if k not in loaded]
        if not rest:
            continue
        rows = world.firebird(f"SELECT {', '.join(names)} FROM BILLING_CLAIMS WHERE CLAIM_ID "
                              f"IN ({', '.join('?' * len(rest))})", rest)
        columns = [[row[i] for row in rows] for i in range(len(names))]
        table = pa.table([pa.array(v, type=t) for v, (_, t, _) in
                          zip(columns, CLAIM_COLUMNS, strict=True)],
                         names=[n.lower() for n in names])
        valid = transform_chunk("billing_claims", table).valid
        found += [int(k) for k in valid.column("claim_id").to_pylist()]
    return sorted(found)


def tally(world: World, updated: set[int]) -> dict[str, Any]:
    """The oracle's figures plus stale claims; {"error": ...} while the store is not ready."""
    import duckdb

    from etl_tasks.errors import EtlError
    from tests.integration.oracle import count

    try:
        t = count(world)
    except (duckdb.Error, EtlError) as exc:  # no store or table yet: nothing loaded
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    result: dict[str, Any] = {
        "source": t.source, "loaded": t.loaded, "quarantined": t.quarantined,
        "dead_lettered": t.dead_lettered, "lost": t.lost, "duplicated": t.duplicated,
        "stray": t.stray, "missing_sample": list(t.missing_sample)}
    # The stale check reads every row: only once nothing is missing any more.
    result["stale"], result["stale_sample"] = stale(world, updated) if t.lost == 0 else (None, [])
    return result


def stale(world: World, updated: set[int]) -> tuple[int, list[dict[str, Any]]]:
    """Claims stored in another version than Firebird's, plus updated claims whose valid
    current version was never loaded (left quarantined)."""
    count, sample = stale_claims(world)
    lifted = revalidated(world, updated)
    sample += [{"claim_id": k, "quarantined, but its current version is valid": True}
               for k in lifted[:5]]
    return count + len(lifted), sample


def catch_up(world: World, bound_s: float,
             updated: set[int]) -> tuple[bool, float, dict[str, Any]]:
    """Let beat's runs go on until nothing is lost or stale, at most `bound_s`."""
    start = time.monotonic()
    last: dict[str, Any] = {}
    while True:
        last = tally(world, updated)
        if "error" not in last and last["lost"] == 0 and last["stale"] == 0:
            return True, time.monotonic() - start, last
        if time.monotonic() - start > bound_s:
            return False, time.monotonic() - start, last
        time.sleep(5)


def recoveries(world: World, faults: list[Fault]) -> None:
    """Per fault, from the ledger and etl_runs (after the fact, so nothing is polled during
    the run): seconds to the first commit after it, and to the end (finished or partial) of
    the first run that started after it."""
    commits = sorted(float(t) for (t,) in world.query(
        "SELECT epoch(loaded_at) FROM etl_load_ledger WHERE source = 'billing'"))
    runs = world.query("SELECT epoch(started_at), epoch(finished_at) FROM etl_runs WHERE "
                       "source = 'billing' AND status IN ('finished', 'partial')")
    for f in faults:
        after = [t for t in commits if t > f.at]
        f.first_commit_s = round(after[0] - f.at, 1) if after else None
        ends = [end for begin, end in runs if begin is not None and float(begin) > f.at]
        f.recovery_s = round(min(ends) - f.at, 1) if ends else None


def redis_failures(world: World) -> dict[str, int]:
    """Runs Redis holds as failed, by reason (those refused while another run held the
    source's lease are expected: beat ticks every 5 s)."""
    import redis

    found: Counter[str] = Counter()
    r = redis.Redis.from_url(world.redis_server.url, decode_responses=True)
    try:
        for name in r.scan_iter(match="etl:run:*", count=1000):
            if name.count(":") != 2 or r.type(name) != "hash":
                continue
            if r.hget(name, "status") == "failed":
                reason = str(r.hget(name, "error") or "?")
                if "already has run" in reason:
                    reason = "refused: another run of the source in progress"
                found[reason[:120]] += 1
    finally:
        r.close()
    return dict(found)


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "etl_tasks", "workers",
                                "beat_schedule.py"], cwd=REPO, text=True, capture_output=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (product files modified in the work tree)" if dirty else "")


def ancestors() -> set[int]:
    """This process and its parents (their command lines may name the folder too)."""
    found, pid = set(), os.getpid()
    while pid > 1:
        found.add(pid)
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


def leftovers(root: Path) -> list[str]:
    """Processes whose command line names this run's folder (none once it has stopped)."""
    found, mine = [], ancestors()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        with suppress(OSError):
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if str(root) in cmd:
                found.append(f"{entry.name} {cmd.strip()[:160]}")
    return found


# --- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    world = build(args, root)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    feed, faults, fault_errors = Feed(), list[Fault](), list[str]()
    graceful = False
    try:
        start(world)
        [(claims_start,)] = world.firebird("SELECT count(*) FROM BILLING_CLAIMS")
        world.clock0 = time.time()
        world.log(f"clock started: {args.minutes} min, seed {args.seed}")
        threads = [
            threading.Thread(target=feeder, name="feeder", daemon=True,
                             args=(world, random.Random(f"feed-{args.seed}"), stop, feed)),
            threading.Thread(target=chaos, name="chaos", daemon=True,
                             args=(world, random.Random(f"chaos-{args.seed}"), stop, faults,
                                   fault_errors)),
        ]
        for thread in threads:
            thread.start()
        stop.wait(args.minutes * 60)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        chaos_s = time.time() - world.clock0
        restarted = ensure_up(world)
        world.log(f"clock stopped after {chaos_s:.0f}s: {len(faults)} faults, "
                  f"{feed.inserted:,} claims added, {len(feed.updated_ids):,} claims updated; "
                  f"started again: {', '.join(restarted) or 'nothing'}; catching up")
        caught_up, catchup_s, figures = catch_up(world, args.catchup_s, feed.updated_ids)
        world.log(("caught up" if caught_up else "NOT caught up") + f" after {catchup_s:.0f}s")
        [(claims_end,)] = world.firebird("SELECT count(*) FROM BILLING_CLAIMS")
        if "error" in figures:
            raise ChaosError(f"the store never became readable: {figures['error']}")
        if figures["stale"] is None:  # lost rows: the stale check was skipped while polling
            figures["stale"], figures["stale_sample"] = stale(world, feed.updated_ids)
        # A fault just before the clock stopped needs a run started after it to end.
        deadline = time.monotonic() + max(0.0, args.catchup_s - catchup_s)
        while True:
            recoveries(world, faults)
            if all(f.recovery_s is not None for f in faults) or time.monotonic() > deadline:
                break
            time.sleep(2)
        runs = {status: int(n) for status, n in world.query(
            "SELECT status, count(*) FROM etl_runs WHERE source = 'billing' GROUP BY 1")}
        dead = world.query("SELECT pointer, reason FROM etl_dead_letters WHERE status = 'open'")
        failed_in_redis = redis_failures(world)
        graceful = True
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        world.log("stopping everything")
        world.stop_all(graceful)
        world.fb.stop()
        world.close_log()
    left = leftovers(root)
    for line in left:  # ours (they name our folder): make sure none outlives the run
        with suppress(ProcessLookupError, ValueError):
            os.kill(int(line.split()[0]), signal.SIGKILL)

    recovered = [f.recovery_s for f in faults if f.recovery_s is not None]
    kinds = Counter(f.kind for f in faults)
    return {
        "minutes": args.minutes,
        "seed": args.seed,
        "claims_start": int(claims_start),
        "claims_end": int(claims_end),
        "claims_added": feed.inserted,
        "claims_updated": len(feed.updated_ids),
        "update_statements": feed.update_statements,
        "faults": {**{k: kinds.get(k, 0) for k in FAULTS}, "total": len(faults)},
        "runs": {s: runs.get(s, 0) for s in ("finished", "partial", "failed")},
        "source": figures["source"],
        "loaded": figures["loaded"],
        "quarantined": figures["quarantined"],
        "dead_lettered": figures["dead_lettered"],
        "lost": figures["lost"],
        "duplicated": figures["duplicated"],
        "stale": figures["stale"],
        "stray": figures["stray"],
        "longest_recovery_s": max(recovered) if recovered else None,
        "mean_recovery_s": round(sum(recovered) / len(recovered), 1) if recovered else None,
        "unrecovered_faults": len(faults) - len(recovered),
        "caught_up": caught_up,
        "catchup_s": round(catchup_s, 1),
        "missing_sample": figures["missing_sample"],
        "stale_sample": figures["stale_sample"],
        "open_dead_letters": [{"pointer": p, "reason": r} for p, r in dead],
        "failed_runs_in_redis": failed_in_redis,
        "fault_log": [{k: v for k, v in asdict(f).items() if k != "at"} for f in faults],
        "fault_errors": fault_errors,
        "feeder_errors": feed.errors,
        "firebird_helper_restarts": world.fb.restarts,
        "leftover_processes": left,
        "code": git_state(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "workdir": str(root) if args.keep else None,
        "command": shlex.join([sys.executable if sys.executable else "python",
                               *sys.argv]),
    }


def render(result: dict[str, Any]) -> str:
    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} s"

    faults = result["faults"]
    rows = [
        ("run", f"{result['minutes']} min, seed {result['seed']}, code {result['code']}"),
        ("claims", f"{result['claims_start']:,} -> {result['claims_end']:,} "
                   f"({result['claims_updated']:,} claims updated in "
                   f"{result['update_statements']} statements)"),
        ("faults", f"{faults['total']} (" + ", ".join(f"{k} {faults[k]}" for k in FAULTS)
                   + ")"),
        ("runs in etl_runs", ", ".join(f"{k} {v}" for k, v in result["runs"].items())),
        ("source rows", f"{result['source']:,}"),
        ("loaded", f"{result['loaded']:,}"),
        ("quarantined", f"{result['quarantined']:,}"),
        ("dead-lettered", f"{result['dead_lettered']:,}"),
        ("lost", f"{result['lost']:,}" + (f"  e.g. {result['missing_sample']}"
                                          if result["lost"] else "")),
        ("duplicated", f"{result['duplicated']:,}"),
        ("stale", f"{result['stale']:,}" + (f"  e.g. {result['stale_sample'][:3]}"
                                            if result["stale"] else "")),
        ("stray", f"{result['stray']:,}"),
        ("longest recovery", secs(result["longest_recovery_s"])),
        ("mean recovery", secs(result["mean_recovery_s"])),
        ("faults not recovered", str(result["unrecovered_faults"])),
        ("catch-up", ("done" if result["caught_up"] else "NOT done") +
                     f" after {result['catchup_s']} s"),
    ]
    if result["failed_runs_in_redis"]:
        rows.append(("failed runs in Redis", "; ".join(
            f"{n} x {reason}" for reason, n in result["failed_runs_in_redis"].items())))
    if result["open_dead_letters"]:
        rows.append(("open dead letters", "; ".join(
            f"{d['pointer']}: {d['reason']}" for d in result["open_dead_letters"][:5])))
    for label in ("fault_errors", "feeder_errors", "leftover_processes"):
        if result[label]:
            rows.append((label.replace("_", " "), "; ".join(result[label][:5])))
    if result["workdir"]:
        rows.append(("kept in", result["workdir"]))
    rows.append(("command", result["command"]))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines.append("")
    lines.append("  t (s)  fault        commit after  recovery  detail")
    for f in result["fault_log"]:
        lines.append(f"{f['t_s']:7.1f}  {f['kind']:<11}  {secs(f['first_commit_s']):>12}  "
                     f"{secs(f['recovery_s']):>8}  {f['detail']}")
    return "\n".join(lines)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.keep is not None:
            root = args.keep.resolve()
            root.mkdir(parents=True, exist_ok=True)
            result = run(args, root)
        else:
            with tempfile.TemporaryDirectory(prefix="etl-chaos-") as tmp:
                result = run(args, Path(tmp).resolve())
    except ChaosError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str) if args.json else render(result))
    bad = any(result[k] for k in ("lost", "duplicated", "stale", "stray"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
