from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import EngineDep, RouterDep
from service.api.protocol import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
async def list_models(engine: EngineDep, adapters: RouterDep) -> ModelList:
    """The base model (served by the `default` segment's active adapter, if any), each segment
    with an active version, and every loaded version or static adapter (pinned by name)."""
    base = engine.model_name
    cards = [ModelCard(id=base, root=base)]
    cards += [ModelCard(id=name, parent=base, root=base) for name in adapters.models()]
    return ModelList(data=cards)
