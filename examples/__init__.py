"""Runnable scenarios and the demo's workload."""
