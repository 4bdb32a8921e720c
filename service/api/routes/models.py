from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import EngineDep
from service.api.protocol import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
async def list_models(engine: EngineDep) -> ModelList:
    base = engine.model_name
    cards = [ModelCard(id=base, root=base)]
    cards += [ModelCard(id=name, parent=base, root=base) for name in engine.adapters()]
    return ModelList(data=cards)
