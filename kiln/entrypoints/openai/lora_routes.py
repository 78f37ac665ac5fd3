"""LoRA adapter endpoints (vLLM's request bodies): POST /v1/load_lora_adapter {"lora_name", "lora_path"}
and POST /v1/unload_lora_adapter {"lora_name"}, and the adapters' cards in GET /v1/models.

Loading reads the adapter on the engine thread between two steps (the slots are torch state only
that thread touches); a bad adapter is a 400 with the reason and the server keeps serving.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.responses import PlainTextResponse

from kiln.entrypoints.openai.errors import APIError
from kiln.entrypoints.openai.protocol import OpenAIModel
from kiln.entrypoints.openai.serving_common import ServingContext
from kiln.lora.adapter import LoRAError


class LoadLoRAAdapterRequest(OpenAIModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(OpenAIModel):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's body may carry it; kiln goes by name


def adapter_cards(ctx: ServingContext) -> list[dict[str, Any]]:
    """/v1/models entries of the loaded adapters (`parent`: the base model, as vLLM lists them)."""
    engine = ctx.engine.engine
    lora = engine.lora
    if lora is None:
        return []
    return [{"id": name, "object": "model", "created": ctx.created, "owned_by": "kiln", "root": adapter.path,
             "parent": ctx.model_name, "max_model_len": ctx.engine.max_model_len}
            for name, (_, adapter) in list(lora.adapters.items())]


def mount_lora_routes(app: FastAPI, ctx: ServingContext) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        if body.lora_name == ctx.model_name:
            raise APIError(400, f"{body.lora_name!r} is the base model's name; pick another adapter name",
                           param="lora_name")
        try:
            await ctx.engine.call(lambda engine: engine.add_lora(body.lora_name, body.lora_path))
        except LoRAError as exc:
            raise APIError(400, str(exc), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        if body.lora_name not in ctx.engine.engine.list_loras():
            raise APIError(404, f"no LoRA adapter named {body.lora_name!r} is loaded", param="lora_name",
                           code="model_not_found")
        try:
            await ctx.engine.call(lambda engine: engine.remove_lora(body.lora_name))
        except LoRAError as exc:
            raise APIError(400, str(exc), param="lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
