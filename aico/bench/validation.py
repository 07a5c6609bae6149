"""Cost per request of the validation step (``python -m aico.bench.validation``).

Measures the compiled JSON Schema 2020-12 validator (``jsonschema``) and the whole
validation step (content type, JSON parse with limits and NFC, schema) on the
conversation message body, in microseconds per request.
"""

from __future__ import annotations

import json
import timeit

from aico.gateway.api.conversations.schemas import MESSAGE_REQUEST
from aico.gateway.config import LimitsSection
from aico.gateway.routing.messages import Request
from aico.gateway.routing.table import RouteEntry
from aico.gateway.security.validate import compile_schema, make_step, prepare, strict


def main() -> None:
    n = 20_000
    doc = {"message": "hello there, how are you today?", "conversation_id": "c-123"}
    validator = compile_schema(strict(MESSAGE_REQUEST))
    schema_only = timeit.timeit(lambda: list(validator.iter_errors(doc)), number=n) / n
    compile_cost = timeit.timeit(lambda: compile_schema(strict(MESSAGE_REQUEST)), number=200) / 200
    (entry,) = prepare([RouteEntry("POST", "/m", lambda r: None, capability="c",  # type: ignore[arg-type,return-value]
                                   request_schema=MESSAGE_REQUEST)])
    step = make_step(LimitsSection)
    body = json.dumps(doc).encode()

    def one() -> None:
        request = Request("POST", "/m", "r", "bench", headers={"content-type": "application/json"},
                          body=body, route=entry)
        step(request)

    whole = timeit.timeit(one, number=n) / n
    print(f"schema compile (once per route):    {compile_cost * 1e6:8.1f} µs")
    print(f"schema validation per request:      {schema_only * 1e6:8.1f} µs")
    print(f"whole validation step per request:  {whole * 1e6:8.1f} µs")


if __name__ == "__main__":
    main()
