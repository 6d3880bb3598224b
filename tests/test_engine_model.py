"""The storage engine against the reference model (tests/engine_model.py): random sequences of
every State operation, TTL expiry with the machine's clock, the sweeper and restarts (close +
reopen of the same LevelDB), each answer compared with the model's."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from tests.engine_model import EngineDriver, machine

EngineModel = machine(EngineDriver, "EngineModel")

TestEngineModel = EngineModel.TestCase
TestEngineModel.settings = settings(
    max_examples=260, stateful_step_count=80, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
