"""Sealed staging with real parts: a staged payload altered in Redis (a flipped byte, as a
corrupt or tampered value would be) fails authentication; it is never read as rows, its range
is extracted again and the run ends exact."""

from __future__ import annotations

from etl_tasks.api import run_source
from tests.integration import oracle
from tests.integration.fault_stack import wait_until
from tests.integration.test_faults import wait_end

CHUNK = "billing:keys:2001-4000"


def test_an_altered_staged_payload_is_extracted_again_never_read(world):
    stack = world()
    # The first load of the chunk waits 4 s before it reads its payload: the window in which
    # the test alters it in Redis. (A range's rows are validated where they are read, so its
    # valid rows are the first payload staged.)
    stack.start_all(loader_env={"ETL_FAULT_POINT": f"load:1@{CHUNK}",
                                "ETL_FAULT_ACTION": "delay:4"})
    r = stack.redis
    handle = run_source("billing")
    key = wait_until(lambda: next(iter(r.scan_iter(match=f"etl:stage:*:{CHUNK}:valid")), None),
                     60, "the chunk's staged payload")
    r.append(key, "x")  # one byte more: the sealed payload no longer authenticates
    summary = wait_end(stack, handle, 120)
    assert summary.status == "finished", summary
    assert summary.dead_letters == []
    oracle.check(stack, "altered staged payload")
    # Refused by the load that read it, and said so (the range was then extracted again).
    log = (stack.root / "logs" / "loader.log").read_text()
    assert f"{CHUNK}:valid failed authentication" in log
