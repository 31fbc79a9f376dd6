"""The two-host harness (hosts.py) and the probe the launcher runs on each rank (probe.py)."""
