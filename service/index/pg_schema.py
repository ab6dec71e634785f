"""What the PostgreSQL backend creates on first start, and the model check on every start.

Tables (in the URL's database, schema ``public``):

* ``dino_items``: ``id`` (primary key), ``seq`` (insertion order for the gallery), ``embedding``
  (pgvector ``vector(dim)``, unit length), ``metadata`` (``jsonb``), ``source``, ``thumbnail``
  (``bytea``), ``created_at``. Indexes: HNSW on ``embedding`` with inner product
  (``vector_ip_ops``, built with ``m`` and ``ef_construction``), GIN on ``metadata`` for filters.
* ``dino_index_meta``: key/value rows recording the model (sha256, name, dimension) and the HNSW
  build parameters. A server with another model refuses the database.

Set-up runs under a transaction-scoped advisory lock, so replicas starting together on an empty
database create everything once.
"""

from __future__ import annotations

import logging

import psycopg

from service.index.db import SCHEMA_VERSION, utc_now
from service.index.errors import IndexModelMismatch, IndexStoreError, refuse_other_model

log = logging.getLogger(__name__)

ITEMS = "dino_items"
META = "dino_index_meta"
SETUP_LOCK = 0x64696E6F  # "dino": the advisory lock id serialising first-start set-up
MAX_DIM = 2000  # pgvector's HNSW limit for the vector type
PG_DEFAULTS = {"m": 16, "ef_construction": 64, "ef_search": 64}
ALIASES = {"hnsw_m": "m"}  # the embedded HNSW's name for the same knob


def pg_params(params: dict[str, object]) -> dict[str, int]:
    """``DINO_INDEX_PARAMS`` for pgvector: m, ef_construction, ef_search (all >= 1)."""
    out = dict(PG_DEFAULTS)
    for key, value in params.items():
        name = ALIASES.get(key, key)
        if name not in PG_DEFAULTS:
            raise ValueError(
                f"index parameter {key!r} does not apply to PostgreSQL (pgvector HNSW); "
                f"known: {sorted(PG_DEFAULTS)}"
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"index parameter {key} must be an integer >= 1, got {value!r}")
        out[name] = value
    if out["ef_construction"] < 2 * out["m"]:
        raise ValueError("pgvector needs ef_construction >= 2 * m")
    return out


def _create(conn: psycopg.Connection, dim: int, params: dict[str, int]) -> None:
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {ITEMS} (
            seq bigint GENERATED ALWAYS AS IDENTITY,
            id text PRIMARY KEY,
            embedding vector({int(dim)}) NOT NULL,
            metadata jsonb NOT NULL DEFAULT '{{}}',
            source text,
            thumbnail bytea,
            created_at text NOT NULL
        )"""
    )
    conn.execute(f"CREATE INDEX IF NOT EXISTS {ITEMS}_seq ON {ITEMS} (seq)")
    conn.execute(
        f"CREATE INDEX IF NOT EXISTS {ITEMS}_hnsw ON {ITEMS} USING hnsw (embedding vector_ip_ops) "
        f"WITH (m = {int(params['m'])}, ef_construction = {int(params['ef_construction'])})"
    )
    conn.execute(
        f"CREATE INDEX IF NOT EXISTS {ITEMS}_metadata ON {ITEMS} "
        "USING gin (metadata jsonb_path_ops)"
    )


def _put(conn: psycopg.Connection, values: dict[str, object]) -> None:
    for key, value in values.items():
        conn.execute(
            f"INSERT INTO {META} (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, str(value)),
        )


def setup(
    conn: psycopg.Connection,
    where: str,
    sha: str,
    dim: int,
    name: str | None,
    params: dict[str, int],
    transform: str = "none",
) -> dict[str, str]:
    """Create what is missing and record the model (and its embedding transform), or refuse
    another model's database. Runs inside the caller's transaction."""
    if dim > MAX_DIM:
        raise IndexStoreError(
            f"pgvector's HNSW index takes at most {MAX_DIM} dimensions, got {dim}"
        )
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SETUP_LOCK,))
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.errors.InsufficientPrivilege:
        raise IndexStoreError(
            f"cannot create the pgvector extension in {where}: ask the database owner to run "
            "`CREATE EXTENSION vector;` there once"
        ) from None
    conn.execute(f"CREATE TABLE IF NOT EXISTS {META} (key text PRIMARY KEY, value text NOT NULL)")
    meta = dict(conn.execute(f"SELECT key, value FROM {META}").fetchall())
    if "model_sha256" not in meta:
        _create(conn, dim, params)
        _put(
            conn,
            {
                "schema_version": SCHEMA_VERSION,
                "model_sha256": sha,
                "dim": dim,
                "model_name": name or "",
                "embedding_transform": transform,
                "m": params["m"],
                "ef_construction": params["ef_construction"],
                "created_at": utc_now(),
            },
        )
        log.info("created the pgvector index in %s for model %s (dim %d)", where, sha[:12], dim)
        return dict(conn.execute(f"SELECT key, value FROM {META}").fetchall())
    _refuse_other_model(where, meta, sha, dim, name)
    _refuse_other_transform(where, meta.get("embedding_transform", "none"), transform)
    built = {k: int(meta[k]) for k in ("m", "ef_construction") if k in meta}
    wanted = {k: params[k] for k in built}
    if built != wanted:
        log.warning(
            "the HNSW index in %s was built with %s; %s applies only to a new database "
            "(or REINDEX after changing it by hand)",
            where, built, wanted,
        )  # fmt: skip
    if name and meta.get("model_name") != name:
        _put(conn, {"model_name": name})  # same weights under a new name
        meta["model_name"] = name
    return meta


def _refuse_other_transform(where: str, recorded: str, transform: str) -> None:
    """Same weights, but vectors made with another (or no) centring cannot be mixed."""
    if recorded == transform:
        return
    raise IndexModelMismatch(
        f"the index in {where} holds vectors made with embedding transform {recorded!r}, but "
        f"the model in use applies {transform!r}; scores would not be comparable. Point "
        "DINO_INDEX_URL at another database and re-index the images there with "
        "`python -m service.index build`."
    )


def _refuse_other_model(
    where: str, meta: dict[str, str], sha: str, dim: int, name: str | None
) -> None:
    """Raise if the database's vectors come from another model than the one in use."""
    refuse_other_model(
        where,
        meta,
        sha,
        dim,
        name,
        "Point DINO_INDEX_URL at another database (and re-index the images there with "
        "`python -m service.index build`), or serve the model that built it.",
    )
