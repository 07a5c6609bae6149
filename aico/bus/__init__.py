"""The AICO message bus: embedded broker, reactor client, module SDK, built-in modules.

Nothing here imports :mod:`aico.gateway`: a backend module runs without the gateway.
"""
