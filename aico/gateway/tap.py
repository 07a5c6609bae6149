"""``twistd aico-gateway``: the command-line options and ``makeService``.

``Options`` loads and validates the whole configuration before anything runs;
``makeService`` resolves the state directory and hands both to the composition root
(:func:`aico.gateway.composition.compose`), which builds the service tree.
"""

from __future__ import annotations

import os

from twisted.python import usage

from aico.gateway import config as configuration
from aico.gateway import logs
from aico.gateway.composition import compose
from aico.gateway.config import Config, ConfigError
from aico.gateway.service import GatewayService
from aico.gateway.state import resolve_state_dir


class Options(usage.Options):
    """``twistd aico-gateway [--config FILE] [--state-dir DIR]``."""

    optParameters = [
        ["config", "c", None, "TOML configuration file (docs/configuration.md)."],
        ["state-dir", "s", None, "State directory (default: $AICO_STATE_DIR, "
         "[gateway] state_dir, then the platform's data directory)."],
    ]

    def postOptions(self) -> None:
        try:
            self.config = (configuration.load(self["config"]) if self["config"]
                           else Config())
        except ConfigError as e:
            raise usage.UsageError(str(e)) from e


def makeService(options: Options) -> GatewayService:
    # Before twistd adds its log observer (text, --logger, syslog) or the tac file its
    # own: the guard runs first, so no log line can be forged (aico.gateway.logs).
    logs.guard_log_lines()
    config: Config = options.config
    state_dir = resolve_state_dir(options["state-dir"], os.environ, config.gateway.state_dir)
    service = compose(config, state_dir, config_path=options["config"])
    service.settle_heap = True
    return service
