# twistd -ny tac/aico-gateway.tac — the same service as `twistd aico-gateway`.
# The config file comes from $AICO_GATEWAY_CONFIG; the state directory from
# $AICO_STATE_DIR, then [gateway] state_dir, then the platform's data directory.
# AICO_LOG=json writes JSON log lines (as `twistd --logger aico.gateway.logs.json_observer`).
import os

from twisted.application.service import Application
from twisted.logger import ILogObserver

from aico.gateway import logs
from aico.gateway.tap import Options, makeService

options = Options()
options.parseOptions(["--config", os.environ["AICO_GATEWAY_CONFIG"]] if os.environ.get("AICO_GATEWAY_CONFIG") else [])
application = Application("aico-gateway")
if os.environ.get("AICO_LOG") == "json":
    application.setComponent(ILogObserver, logs.json_observer())
makeService(options).setServiceParent(application)
