"""A faithful local DokStamp API (the sandbox), used by tests, benchmarks and the demo.

See :mod:`.app` (routes), :mod:`.store` (data and rules), :mod:`.accounts` (auth),
:mod:`.faults` (fault injection, stats) and :mod:`.server` (serving it).
"""

from dokstamp_sync.sandbox.accounts import Account
from dokstamp_sync.sandbox.app import Sandbox, SandboxConfig, create_app
from dokstamp_sync.sandbox.faults import Faults, ScriptedFault
from dokstamp_sync.sandbox.server import SandboxServer, serve

__all__ = ["Account", "Faults", "Sandbox", "SandboxConfig", "SandboxServer", "ScriptedFault",
           "create_app", "serve"]
