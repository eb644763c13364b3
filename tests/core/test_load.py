"""A short load run (counts only, no timing assertions): nothing errors, nothing goes unanswered."""

from __future__ import annotations

import sys

from conftest import ROOT, csm_slot, running_server

sys.path.insert(0, str(ROOT / "bench"))
from load import run_load  # noqa: E402


async def test_concurrent_connections_all_get_answers(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, max_batch=4), max_queue=4, rate_limit=10**6) as server:
        result = await run_load(server.port, connections=12, requests=3, timeout=240)
        assert server.service.scheduler.depth == 0
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == 36
    assert set(outcomes) <= {"success", "busy"}, outcomes  # no errors, nothing unanswered
    assert outcomes["success"] >= 12 and outcomes.get("busy", 0) > 0  # the small queue did push back
