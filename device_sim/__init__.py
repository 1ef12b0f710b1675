"""Simulated payment terminals: thousands in one asyncio process, speaking fleet/v1."""
