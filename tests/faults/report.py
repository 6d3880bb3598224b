"""The one line every fault scenario prints: what was acknowledged, lost, duplicated, and what
callers saw. `tests/faults/` asserts the same figures it prints."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Tally:
    scenario: str
    acked: int = 0  # writes acknowledged to a caller during the scenario
    lost: int = 0  # acknowledged writes not readable afterwards
    duplicated: int = 0  # writes applied twice (a retried append or increment landing twice)
    caller_errors: int = 0  # errors the (well-behaved) callers saw
    note: str = ""  # anything else the scenario measures, e.g. "audited=12"

    def line(self) -> str:
        extra = f" {self.note}" if self.note else ""
        return (f"FAULT {self.scenario}: acked={self.acked} lost={self.lost} "
                f"duplicated={self.duplicated} caller_errors={self.caller_errors}{extra}")


def fault_line(t: Tally) -> str:
    """Print the scenario's line (pytest -s shows it; `-rA` too) and return it."""
    text = t.line()
    print(text, flush=True)
    return text
