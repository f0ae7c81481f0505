"""``make run-vllm``: a short demo of wasmshare steering inside vLLM on SmolLM2.

Run by vLLM's environment (``.venv-vllm/bin/python -m wasmshare.vllm.demo``) with
``$WASMSHARE_PYTHON`` naming the Python of wasmshare's own environment, which converts the
embedded model once and runs the controller service. One ``generate`` call decodes a plain
request beside a JSON Schema, a regex and a choice constraint; each answer is printed with
whether it meets its constraint. Exits 1 when one does not.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
COLOURS = ["red", "green", "blue"]


def _model_folder(python: str) -> str:
    code = "from wasmshare.llm.models import load_model; print(load_model('smollm2-135m').path)"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def main() -> int:
    python = os.environ.get("WASMSHARE_PYTHON")
    if not python:
        print("set WASMSHARE_PYTHON to the python of wasmshare's own environment", file=sys.stderr)
        return 2
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from .processor import WasmshareLogitsProcessor

    llm = LLM(
        model=_model_folder(python),
        logits_processors=[WasmshareLogitsProcessor],
        enforce_eager=True,
        max_model_len=512,
    )

    def greedy(max_tokens: int, **steer: Any) -> Any:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=steer or None)

    def is_person(text: str) -> bool:
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return isinstance(value, dict) and set(value) == {"name", "age"} and isinstance(value["age"], int)

    requests: list[tuple[str, str, Any, Callable[[str], bool]]] = [
        ("plain", "The capital of France is", greedy(16), lambda text: True),
        ("json schema", "A person as JSON:", greedy(64, wasmshare_json_schema=json.dumps(PERSON)), is_person),
        (
            "regex [0-9]{3}",
            "Three digits:",
            greedy(8, wasmshare_regex="[0-9]{3}"),
            lambda t: bool(re.fullmatch("[0-9]{3}", t)),
        ),
        (
            "choice",
            "My favourite colour is",
            greedy(8, wasmshare_choice=COLOURS),
            lambda text: text in COLOURS,
        ),
    ]
    outputs = llm.generate([r[1] for r in requests], [r[2] for r in requests], use_tqdm=False)
    failed = 0
    for (label, prompt, _, check), output in zip(requests, outputs, strict=True):
        text = output.outputs[0].text
        ok = check(text)
        failed += not ok
        print(f"{'ok ' if ok else 'BAD'} {label:16} {prompt!r} -> {text!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
