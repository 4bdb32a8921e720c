from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from service.api.deps import CallerDep, EngineDep, RouterDep, SettingsDep
from service.api.protocol import ModelCard, ModelList
from service.core.config import Settings
from service.core.errors import ModelNotFoundError
from service.core.identity import Principal
from service.engines.base import Engine
from service.engines.routing import AdapterRouter

router = APIRouter(prefix="/v1", tags=["models"])


def _cards(
    engine: Engine, adapters: AdapterRouter, settings: Settings, caller: Principal
) -> list[ModelCard]:
    def visible(name: str) -> bool:
        return caller.sees_tenant(settings.tenant_of(name.split("@")[0]))

    base = engine.model_name
    cards = [ModelCard(id=base, root=base)] if visible("default") else []
    cards += [
        ModelCard(id=name, parent=base, root=base) for name in adapters.models() if visible(name)
    ]
    return cards


@router.get("/models", response_model=ModelList)
async def list_models(
    engine: EngineDep, adapters: RouterDep, settings: SettingsDep, caller: CallerDep
) -> ModelList:
    """The base model (served by the `default` segment's active adapter, if any), each segment
    with an active version, and every loaded version or static adapter (pinned by name); a
    tenant sees only the segments it owns."""
    return ModelList(data=_cards(engine, adapters, settings, caller))


# `:path`: ids hold `/` (an adapter named after a directory) as well as `@` (a pinned version).
@router.get("/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(
    model_id: Annotated[str, Path(max_length=256)],
    engine: EngineDep,
    adapters: RouterDep,
    settings: SettingsDep,
    caller: CallerDep,
) -> ModelCard:
    """One model's card, as listed by `GET /v1/models`; 404 for an id this caller cannot see."""
    for card in _cards(engine, adapters, settings, caller):
        if card.id == model_id:
            return card
    raise ModelNotFoundError(f"the model {model_id!r} does not exist", param="model")
