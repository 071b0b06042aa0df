"""A faithful local DokStamp API (the sandbox), used by tests, benchmarks and the demo.

See :mod:`.app` (routes, :class:`SandboxConfig`), :mod:`.generations` (what each generation of
the docs promises: ``SandboxConfig.generation`` "a" or "b"), :mod:`.store` (data and rules),
:mod:`.schema` (fields, uniqueness, the documented filters ``strict`` mode keeps),
:mod:`.accounts` (auth), :mod:`.faults` (fault injection, outages, stats), :mod:`.admin` (the
``/_sandbox/`` admin API) and :mod:`.server` (serving it).
"""

from dokstamp_sync.sandbox.accounts import Account
from dokstamp_sync.sandbox.app import Sandbox, SandboxConfig, create_app
from dokstamp_sync.sandbox.faults import Faults, ScriptedFault
from dokstamp_sync.sandbox.server import SandboxServer, serve

__all__ = ["Account", "Faults", "Sandbox", "SandboxConfig", "SandboxServer", "ScriptedFault",
           "create_app", "serve"]
