"""`python -m app`: serve the gateway with uvicorn (GATEWAY_HOST, GATEWAY_PORT, GATEWAY_CONFIG)."""

from __future__ import annotations

import sys

import uvicorn

from app.config import ConfigError, config_path_from_env, load_config, settings_from_env
from app.logs import setup_logging
from app.main import create_app


class _DrainingServer(uvicorn.Server):
    """On SIGTERM, /ready turns 503 at once so load balancers stop sending, while uvicorn
    stops accepting and lets in-flight streams run up to the drain timeout."""

    def handle_exit(self, sig, frame) -> None:
        self.config.app.state.gw.draining = True
        super().handle_exit(sig, frame)


def main() -> int:
    try:
        settings = settings_from_env()
        config = load_config(config_path_from_env())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    app = create_app(config)
    server = _DrainingServer(uvicorn.Config(
        app, host=settings.host, port=settings.port, loop="uvloop", http="httptools",
        access_log=False, log_config=None, lifespan="on", server_header=False,
        timeout_graceful_shutdown=config.drain_timeout_s, timeout_keep_alive=75,
    ))
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
