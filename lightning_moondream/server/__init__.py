"""The local tuning service: the tuning API, offline, with a small policy that learns.

A stand-in for Moondream Cloud for offline work and tests, not a replacement for it:
the reference policy is a tiny model trained on synthetic shapes. Importing this
package does not import Lightning.

Example:
    >>> from lightning_moondream.server import create_app
    >>> app = create_app(data_dir="runs/tuning")  # doctest: +SKIP
"""

from lightning_moondream.server.app import close_app, create_app
from lightning_moondream.server.engine import POLICIES
from lightning_moondream.server.faults import ENDPOINTS, FAULT_KINDS, DroppedConnection, FaultConfig

__all__ = [
    "ENDPOINTS",
    "FAULT_KINDS",
    "POLICIES",
    "DroppedConnection",
    "FaultConfig",
    "close_app",
    "create_app",
]
