"""vLLM's adapter routes: load and unload LoRA or prefix-tuning adapters at run time (they are listed by
/v1/models)."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from engine.adapters.manager import AdapterNotFound
from server.errors import ERROR_RESPONSES, APIError
from server.guards import require_api_key
from server.protocol import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from server.state import State

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES,
                   default_response_class=PlainTextResponse)


@router.post("/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(req: LoadLoraAdapterRequest, state: State) -> PlainTextResponse:
    if req.lora_name == state.config.model_name:
        raise APIError(400, f"{req.lora_name!r} is the base model's name", param="lora_name")
    if req.load_inplace is False and any(a["name"] == req.lora_name for a in state.engine.list_adapters()):
        raise APIError(400, f"the adapter {req.lora_name!r} is already loaded (load_inplace: true replaces it)",
                       param="lora_name")
    before = {a["name"] for a in state.engine.list_adapters()}
    try:
        await state.engine.load_adapter(req.lora_name, req.lora_path)
    except AdapterNotFound as e:
        raise APIError(404, str(e), "not_found_error", param="lora_path") from None
    except (ValueError, OSError) as e:
        raise APIError(400, str(e), param="lora_path") from None
    evicted = sorted(before - {a["name"] for a in state.engine.list_adapters()})  # (--max-loras were loaded)
    note = f" To make room, the least recently used idle adapter was unloaded: {', '.join(evicted)}." if evicted else ""
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.{note}")


@router.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(req: UnloadLoraAdapterRequest, state: State) -> PlainTextResponse:
    try:
        await state.engine.unload_adapter(req.lora_name)
    except AdapterNotFound as e:
        raise APIError(404, str(e), "not_found_error", param="lora_name") from None
    except ValueError as e:
        raise APIError(400, str(e), param="lora_name") from None
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
