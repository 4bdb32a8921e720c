"""The web front ends: the embeddable chat widget (`/widget.js`, demo page `/demo`) and the
operator console (`/console`). Plain files from `service/web/`, no build step; the console's
chart library (uPlot) is vendored there, so both work offline."""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.api.deps import SettingsDep

WEB = Path(__file__).resolve().parents[2] / "web"
router = APIRouter(tags=["web"])
# The console's script, styles and the vendored chart library.
static = StaticFiles(directory=WEB)


@router.get("/widget.js", include_in_schema=False)
async def widget_js() -> FileResponse:
    # Short cache: pages that embed the widget pick up a new release within minutes.
    return FileResponse(
        WEB / "widget.js",
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=300"},
    )


@router.get("/v1/widget/config")
async def widget_config(settings: SettingsDep) -> dict[str, int]:
    """What the widget asks the service before the first message: how often to compare."""
    return {"compare_every": settings.widget_compare_every}


@router.get("/demo", response_class=HTMLResponse, include_in_schema=False)
async def demo(segment: str = "", key: str = "") -> HTMLResponse:
    """A page that embeds the widget as a customer's site would (`?segment=` and `?key=` set
    its data attributes)."""
    attrs = "".join(
        f' data-{name}="{html.escape(value, quote=True)}"'
        for name, value in (("segment", segment), ("key", key))
        if value
    )
    page = (WEB / "demo.html").read_text().replace("{{widget_attrs}}", attrs)
    return HTMLResponse(page)


@router.get("/console", include_in_schema=False)
async def console() -> FileResponse:
    return FileResponse(WEB / "console.html", media_type="text/html")
