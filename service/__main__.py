"""``python -m service``: serve the configured model with uvicorn (settings from DINO_*)."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.settings import Settings


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.exit(f"invalid DINO_* setting: {exc}")
    # One worker: the model and the index live in this process; threads come from DINO_THREADS.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=False,  # the app logs one line per request with its timing
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
