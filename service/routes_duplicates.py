"""``GET /duplicates``: groups of near-duplicate items in the index, paged."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from service.index.duplicates import MAX_MEMBERS, DuplicateSearchError, store_groups
from service.routes_common import RuntimeDep
from service.schemas import error_responses

router = APIRouter(tags=["index"])
# Measured with the centred quickstart model on a synthetic copy-detection set (see
# docs/duplicates.md): augmented copies score above it, unrelated images well below.
DEFAULT_THRESHOLD = 0.8
THRESHOLD_HELP = (
    "pairs scoring above this cosine (0 < threshold <= 1) are linked; linked items form a group"
)


class DuplicateMember(BaseModel):
    id: str
    metadata: dict
    best_score: float = Field(description="its highest score against another member")


class DuplicateGroup(BaseModel):
    size: int = Field(description="members in the group (at most 100 are listed)")
    max_score: float
    items: list[DuplicateMember]


class DuplicatesResponse(BaseModel):
    model: str
    threshold: float
    total_groups: int
    offset: int
    items_scanned: int = Field(description="items compared (every stored item)")
    pairs: int = Field(description="pairs scoring above the threshold")
    groups: list[DuplicateGroup] = Field(description="largest groups first")


@router.get(
    "/duplicates",
    response_model=DuplicatesResponse,
    responses=error_responses(409, 422, 503),
    summary="Groups of near-duplicate items (pairs scoring above a threshold), largest first",
)
async def duplicates(
    rt: RuntimeDep,
    threshold: Annotated[
        float, Query(gt=0.0, le=1.0, allow_inf_nan=False, description=THRESHOLD_HELP)
    ] = DEFAULT_THRESHOLD,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> DuplicatesResponse:
    store, manifest = rt.open_index(), rt.loaded_manifest()
    if not hasattr(store, "all_vectors"):
        raise HTTPException(
            409,
            "near-duplicate groups compare every stored vector, which the embedded index does "
            "in memory; with DINO_INDEX_URL (PostgreSQL) use POST /similar with min_score per "
            "item instead",
        )
    try:
        found = await anyio.to_thread.run_sync(store_groups, store, threshold)
    except DuplicateSearchError as exc:
        raise HTTPException(422, str(exc)) from None
    page = range(offset, min(offset + limit, len(found.members)))
    shown = {i: found.members[i][:MAX_MEMBERS] for i in page}
    wanted = [int(r) for rows in shown.values() for r in rows]
    described = await anyio.to_thread.run_sync(store.describe, wanted)
    groups = []
    for i, rows in shown.items():
        members = [
            DuplicateMember(id=described[r][0], metadata=described[r][1], best_score=float(b))
            for r, b in zip(rows.tolist(), found.best[i][:MAX_MEMBERS].tolist(), strict=True)
            if r in described  # deleted since the search: the next call recomputes
        ]
        groups.append(
            DuplicateGroup(size=len(found.members[i]), max_score=found.max_score[i], items=members)
        )
    return DuplicatesResponse(
        model=manifest.name,
        threshold=threshold,
        total_groups=len(found.members),
        offset=offset,
        items_scanned=found.items,
        pairs=found.pairs,
        groups=groups,
    )
