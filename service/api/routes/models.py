from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import CallerDep, EngineDep, RouterDep, SettingsDep
from service.api.protocol import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
async def list_models(
    engine: EngineDep, adapters: RouterDep, settings: SettingsDep, caller: CallerDep
) -> ModelList:
    """The base model (served by the `default` segment's active adapter, if any), each segment
    with an active version, and every loaded version or static adapter (pinned by name); a
    tenant sees only the segments it owns."""

    def visible(name: str) -> bool:
        return caller.sees_tenant(settings.tenant_of(name.split("@")[0]))

    base = engine.model_name
    cards = [ModelCard(id=base, root=base)] if visible("default") else []
    cards += [
        ModelCard(id=name, parent=base, root=base) for name in adapters.models() if visible(name)
    ]
    return ModelList(data=cards)
