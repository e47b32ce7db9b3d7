"""The admitted rate in the usage table printed when a stage ends."""

from __future__ import annotations

from lightning_moondream.api import UsageStats
from lightning_moondream.callbacks.usage import format_usage


def table_values(usage: UsageStats) -> dict[str, str]:
    lines = format_usage(usage.snapshot()).splitlines()
    return {line.split()[0]: " ".join(line.split()[1:]) for line in lines[4:-1]}


def test_the_admitted_rate_is_a_dash_until_a_rate_limits_requests() -> None:
    usage = UsageStats()
    usage.record_attempt("POST /rollouts", 0.25, 100)
    usage.record_admitted_rate(None)
    values = table_values(usage)
    assert (values["admitted_rate"], values["rate_limited"]) == ("-", "0")
    usage.record_admitted_rate(1.94)
    assert table_values(usage)["admitted_rate"] == "1.940"
    usage.record_admitted_rate(10.0)
    assert table_values(usage)["admitted_rate"] == "10"
