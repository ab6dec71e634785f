"""Open the index backend the settings ask for: PostgreSQL + pgvector when ``DINO_INDEX_URL`` is
set, else the embedded FAISS + SQLite index in ``DINO_DATA_DIR``.

The PostgreSQL client (``psycopg``, ``pgvector``) is imported only when a URL is set, so the
embedded default needs neither (``pip install '.[postgres]'`` adds them).
"""

from __future__ import annotations

from service.index.backend import IndexBackend
from service.index.errors import IndexStoreError
from service.index.lock import DirLock
from service.index.store import IndexStore
from service.settings import Settings


def shared(settings: Settings) -> bool:
    """Whether the index lives in a database shared by several processes."""
    return bool(settings.index_url)


def location(settings: Settings) -> str:
    """Where the index lives, for logs and errors (no password)."""
    if not settings.index_url:
        return str(settings.data_dir)
    from service.index.pg_pool import redact

    return redact(settings.index_url)


def check_url(settings: Settings) -> None:
    """A malformed ``DINO_INDEX_URL`` or a missing client: ``ValueError`` at start-up."""
    if not settings.index_url:
        return
    try:
        from service.index.pg_pool import check_url as parse
    except ImportError as exc:
        raise ValueError(
            f"DINO_INDEX_URL is set but the PostgreSQL client is not installed ({exc}); "
            "install it with `pip install '.[postgres]'`"
        ) from None
    parse(settings.index_url)


def open_index(
    settings: Settings,
    model_sha256: str,
    dim: int,
    model_name: str | None = None,
    *,
    progress: bool = True,
    lock: DirLock | None = None,
    transform: str = "none",
) -> IndexBackend:
    """The configured backend, created on first use for this model (``IndexModelMismatch`` if it
    holds another model's vectors; ``IndexUnavailable`` if its database cannot be reached)."""
    if settings.index_url:
        check_url(settings)
        from service.index.postgres import PgStore

        try:
            return PgStore.open(
                settings.index_url,
                model_sha256,
                dim,
                model_name=model_name,
                transform=transform,
                **settings.index_params,
            )
        except ValueError as exc:  # a parameter that does not apply to pgvector
            raise IndexStoreError(str(exc)) from None
    return IndexStore.open(
        settings.data_dir,
        model_sha256,
        dim,
        settings.index_type,
        model_name=model_name,
        progress=progress,
        lock=lock,
        transform=transform,
        **settings.index_params,
    )
