"""`lamina bench fleet`'s workload: each setup's system prompts are its own."""

from __future__ import annotations

import random

from app.bench import fleet_bench


def test_each_setup_gets_system_prompts_of_its_own():
    # A setup must not find the previous setup's prompts in the replicas' prefix caches:
    # the salt comes first, so the prompts differ from their first words on.
    nginx = fleet_bench.system_prompts(2, 300, "nginx-1", random.Random(0))
    router = fleet_bench.system_prompts(2, 300, "router-1", random.Random(0))
    assert len(nginx) == 2 and nginx[0] != nginx[1]  # two shared prompts per setup
    for a, b in zip(nginx, router, strict=True):
        assert a.split()[0] != b.split()[0]
        assert len(a.split()) >= 300
