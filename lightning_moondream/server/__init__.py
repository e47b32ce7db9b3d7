"""The local tuning service: the tuning API, offline, with a small policy that learns.

A stand-in for Moondream Cloud for offline work and tests, not a replacement for it:
the reference policy is a tiny model trained on synthetic shapes. It serves the spec's
``/adapters`` dialect and the SDK's ``/finetunes`` dialect over one store (see ``app``). Importing this
package does not import Lightning.

Example:
    >>> from lightning_moondream.server import create_app
    >>> app = create_app(data_dir="runs/tuning")  # doctest: +SKIP
"""

from lightning_moondream.server.app import DIALECTS, close_app, create_app
from lightning_moondream.server.engine import POLICIES
from lightning_moondream.server.faults import ENDPOINTS, FAULT_KINDS, DroppedConnection, FaultConfig

__all__ = [
    "DIALECTS",
    "ENDPOINTS",
    "FAULT_KINDS",
    "POLICIES",
    "DroppedConnection",
    "FaultConfig",
    "close_app",
    "create_app",
]
