"""Fault scenarios: real processes killed, stopped and fed bad input under load.

Each scenario is bounded to a few seconds of load, prints one `fault_line()` and asserts the
same figures it prints.
"""
