"""/v1/search-spaces: the built-in presets users start from."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path

from service.api.deps import Caller, read_access
from service.api.schemas import ErrorOut, Preset

router = APIRouter(prefix="/v1/search-spaces", tags=["search spaces"])


def _preset(name: str) -> Preset:
    from search_spaces.spec import load_preset

    spec = load_preset(name)
    data = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else dict(spec)
    return Preset(name=name, description=data.get("description"), spec=data)


@router.get("", response_model=list[Preset], summary="The preset search spaces",
            responses={401: {"model": ErrorOut}, 403: {"model": ErrorOut}})
def list_search_spaces(_: Annotated[Caller, Depends(read_access)]):
    from search_spaces.spec import list_presets

    return [_preset(name) for name in list_presets()]


@router.get("/{name}", response_model=Preset, summary="One preset",
            responses={401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut}})
def get_search_space(name: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$")],
                     _: Annotated[Caller, Depends(read_access)]):
    from search_spaces.spec import list_presets

    if name not in list_presets():
        raise HTTPException(404, f"no preset {name!r}; presets: {', '.join(list_presets())}")
    return _preset(name)
