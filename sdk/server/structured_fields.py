"""What a chat or completion request asks of structured output: one constraint from
`response_format`, `structured_outputs` or vLLM's older `guided_*` fields (a mixin of the
request models in `requests.py`, which hold those fields)."""

from __future__ import annotations

from typing import Any

from polymodal.llm_core.sampling_params import StructuredOutputsParams
from polymodal.server.errors import RequestError


class StructuredFields:
    """`structured()`, `field_names()` of a request with the structured-output fields."""

    def structured(self) -> StructuredOutputsParams | None:
        """The one structured-output constraint the request asks for (or None)."""
        given = self._constraints()
        if len(given) > 1:
            names = ", ".join(name for name, _ in given)
            raise RequestError(f"give one structured output constraint, got {names}", given[1][0])
        if not given:
            return None
        name, spec = given[0]
        try:
            return StructuredOutputsParams(**spec)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"{name}: {str(exc).splitlines()[0]}", name) from None

    def field_names(self) -> dict[str, str]:
        """SamplingParams name -> the request field that set it, where they differ: engine
        errors name the request's field (see `openai_format.request_error`)."""
        given = self._constraints()
        return {"structured_outputs": given[0][0]} if given else {}

    def _constraints(self) -> list[tuple[str, dict[str, Any]]]:
        """(request field, StructuredOutputsParams fields) of each constraint given."""
        given = []
        if self.response_format is not None and self.response_format.type != "text":
            fmt = self.response_format
            if fmt.type == "json_object":
                given.append(("response_format", {"json_object": True}))
            elif fmt.type == "structural_tag":
                given.append(("response_format", {"structural_tag": _tag(fmt)}))
            elif fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise RequestError(
                    "response_format json_schema needs json_schema.schema", "response_format"
                )
            else:
                given.append(("response_format", {"json": fmt.json_schema.schema_}))
        if self.structured_outputs is not None:
            given.append(("structured_outputs", self.structured_outputs))
        if self.structural_tag is not None:
            given.append(("structural_tag", {"structural_tag": self.structural_tag}))
        for name in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{name}")
            if value is not None:
                given.append((f"guided_{name}", {name: value}))
        return given


def _tag(fmt) -> dict[str, Any]:
    """The structural tag of a `response_format` of type structural_tag (either form)."""
    if fmt.format is not None:
        if fmt.structures is not None or fmt.triggers is not None:
            raise RequestError(
                "response_format structural_tag: give format, or structures and triggers",
                "response_format",
            )
        return {"type": "structural_tag", "format": fmt.format}
    if fmt.structures is None or fmt.triggers is None:
        raise RequestError(
            "response_format structural_tag needs format (or structures and triggers)",
            "response_format",
        )
    return {"structures": fmt.structures, "triggers": fmt.triggers}
