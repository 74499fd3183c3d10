"""Test infrastructure that runs for real (loopback servers), importable from tests and tools."""
