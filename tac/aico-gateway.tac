# twistd -ny tac/aico-gateway.tac — the same service as `twistd aico-gateway`.
# The config file comes from $AICO_GATEWAY_CONFIG; the state directory from
# $AICO_STATE_DIR, then [gateway] state_dir, then the platform's data directory.
import os

from twisted.application.service import Application

from aico.gateway.tap import Options, makeService

options = Options()
options.parseOptions(["--config", os.environ["AICO_GATEWAY_CONFIG"]] if os.environ.get("AICO_GATEWAY_CONFIG") else [])
application = Application("aico-gateway")
makeService(options).setServiceParent(application)
