"""This machine's CPU and memory use, for the node agent's heartbeat (the dashboard's plots).

Called by the node agent on its heartbeat timer (its I/O thread), about once a second;
a few tens of microseconds (psutil reads /proc).  Owns nothing but psutil's CPU counter.
"""

from __future__ import annotations


def host() -> dict:
    """{"cpu_percent": since the last call (0-100, all cores), "memory_used", "memory_total": bytes}."""
    try:
        import psutil
        memory = psutil.virtual_memory()
        return {"cpu_percent": psutil.cpu_percent(interval=None),
                "memory_used": memory.total - memory.available, "memory_total": memory.total}
    except Exception:  # noqa: BLE001 - a heartbeat never fails for want of a number
        return {}
