"""``python -m service``: serve the configured model with uvicorn (settings from DINO_*).

Before loading anything it checks what a deployment most often gets wrong (a bad DINO_* value, a
models or data folder the process's user cannot use, no model) and exits with one line that says
what to do: in a container that line is the whole log, so it must name the folder, the uid and
the fix.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.settings import Settings, SettingsError, find_model_dir


def _invalid_settings(exc: ValidationError) -> str:
    """One line per bad DINO_* variable, joined: pydantic's own text spans several lines."""
    parts = []
    for err in exc.errors():
        name = "DINO_" + "_".join(str(p) for p in err.get("loc", ())).upper()
        value = os.environ.get(name, err.get("input"))
        parts.append(f"{name}={value!r}: {err.get('msg', 'invalid')}")
    port_bad = any(p.startswith("DINO_PORT=") for p in parts)
    hint = " (DINO_PORT takes a port number 1-65535, e.g. 8000)" if port_bad else ""
    return "invalid setting: " + "; ".join(parts) + hint


def _owner(path: Path) -> str:
    info = path.stat()
    return f"{path} is owned by uid {info.st_uid}, mode {info.st_mode & 0o777:o}"


def _check_models_dir(settings: Settings, uid: int) -> None:
    store = settings.models_dir
    if store.is_dir() and not os.access(store, os.R_OK | os.X_OK):
        raise SettingsError(
            f"the models folder {store} (DINO_MODELS_DIR) is not readable by uid {uid} "
            f"({_owner(store)}): make it readable, e.g. `chmod -R a+rX ./models` on the host"
        )
    model_dir = find_model_dir(settings)  # SettingsError: no model, or several and none named
    if os.access(model_dir, os.R_OK | os.X_OK):
        unreadable = [p for p in model_dir.iterdir() if not os.access(p, os.R_OK)]
    else:
        unreadable = [model_dir]
    if unreadable:
        what = unreadable[0]
        raise SettingsError(
            f"the model file {what} is not readable by uid {uid} ({_owner(what)}): make the "
            "model readable, e.g. `chmod -R a+rX ./models` on the host"
        )


def _check_data_dir(settings: Settings, uid: int) -> None:
    """The index writes its lock, database and snapshot at the top of DINO_DATA_DIR."""
    data = settings.data_dir
    target = data if data.exists() else next(p for p in data.parents if p.exists())
    blocked = None
    if not os.access(target, os.W_OK | os.X_OK):
        blocked = target
    elif data.is_dir():
        blocked = next((p for p in data.iterdir() if not os.access(p, os.W_OK)), None)
    if blocked is not None:
        raise SettingsError(
            f"the data folder {data} (DINO_DATA_DIR) is not writable by uid {uid} "
            f"({_owner(blocked)}): give the folder to that user, e.g. `chown -R {uid} ./data` "
            "on the host, or run as the folder's owner"
        )


def preflight() -> Settings:
    """Settings that can be served, or exit with one line that says what to change."""
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.exit(f"cannot start: {_invalid_settings(exc)}")
    uid = os.getuid()
    try:
        _check_models_dir(settings, uid)
        _check_data_dir(settings, uid)
    except SettingsError as exc:
        sys.exit(f"cannot start: {exc}")
    return settings


def main() -> None:
    settings = preflight()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
