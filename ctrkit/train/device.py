"""Moved to ctrkit/distributed/device.py (a rank's device is the runtime's, below the trainer);
this name stays for code that imports it from here (bench/throughput.py)."""
from ctrkit.distributed.device import resolve_backend, resolve_device, use_device  # noqa: F401
