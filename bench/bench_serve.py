"""Serving under load: 32 concurrent streaming requests against ``wasmshare serve`` on localhost.

The server runs in its own process (``wasmshare serve``, the embedded SmolLM2-135M-Instruct,
``--max-concurrent 16``, torch on the machine's cores) and the official ``openai`` client
(``AsyncOpenAI``) sends every request of a phase at once, streaming, greedy, ``max_tokens``
32, through the chat endpoint. Two phases, the same 32 prompts, interleaved over ``ROUNDS``
rounds (medians over rounds):

* **unconstrained** (the baseline): plain chat completions;
* **mixed**: 8 plain, 8 ``response_format`` JSON Schema, 6 ``regex`` (an ISO date), 6
  ``choice`` (yes / no / maybe), 1 uploaded ``force_answer`` controller, 1 uploaded
  ``boost_words`` controller and 2 *hostile* uploaded controllers (``spin``: an infinite loop
  stopped by the per-step deadline; ``trap_mid_mask``: a trap halfway through writing its
  mask). Every well-behaved answer is checked (the JSON validates, the regex matches, the
  choice is one of the options, the forced answer is exact); each hostile request must end in
  an error event while the server stays healthy.

A third phase, **attacked**, is *mixed* with two of its plain streams replaced by two more
hostile controllers: a *sleeper* and an *endless backtracker*. The sleeper imports WASI's
``poll_oneoff`` to sleep in every step; the server refuses that module at upload (no WASI
for controllers), so its stream runs the sleeper's in-host form instead
(``hostile_host_calls`` ``slow_opens``: every step asks the host to compile a new large
regex, host work that no epoch deadline interrupts) and must end at its deadline. The
backtracker (``endless_backtrack``) drops every sampled token, so its length never grows;
it must end at its work bound. The other 30 streams' per-token p50 is compared with the same
30 streams in *mixed* (target: within 1.1x).

Figures per phase: requests/s and tokens/s over the phase's wall time, time to first token
(submission → first content chunk) p50/p99, and per-token latency (the gaps between
successive content chunks of a stream) p50/p99. Rows compare mixed (ours) with unconstrained
(baseline): ``ratio = baseline_us / ours_us`` (below 1: the constrained load is slower).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

NAME = "serve"
ROOT = Path(__file__).resolve().parent.parent
CONTROLLERS = ROOT / "guests" / "controllers"
CONCURRENCY = 32
MAX_TOKENS = 32
MAX_CONCURRENT = 16
ROUNDS = 3

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
DATE = r"\d{4}-\d{2}-\d{2}"
CHOICES = ["yes", "no", "maybe"]
TOPICS = ["a cat", "the sea", "a city", "a robot", "a teacher", "a tree", "the moon", "a river"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    """``wasmshare serve`` in a child process."""

    def __init__(self, controllers_dir: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        code = "from wasmshare.cli import main; main()"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                "serve",
                "--port",
                str(self.port),
                "--max-concurrent",
                str(MAX_CONCURRENT),
                "--controllers-dir",
                str(controllers_dir),
                "--log-level",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        import httpx2

        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}"
                )
            try:
                if httpx2.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in 300 s")
            time.sleep(0.25)

    def healthy(self) -> bool:
        import httpx2

        try:
            return (
                self.proc.poll() is None
                and httpx2.get(self.base + "/health", timeout=10).json()["status"] == "ok"
            )
        except (httpx2.HTTPError, ValueError, KeyError):
            return False

    def upload(self, name: str) -> str:
        import httpx2

        r = httpx2.post(
            self.base + "/v1/controllers",
            params={"name": name},
            content=(CONTROLLERS / f"{name}.wasm").read_bytes(),
            timeout=60,
        )
        r.raise_for_status()
        return str(r.json()["id"])

    def upload_status(self, module: bytes) -> tuple[int, str]:
        """Upload ``module``; its HTTP status and error message ("" on success)."""
        import httpx2

        r = httpx2.post(self.base + "/v1/controllers", params={"name": "sleeper"}, content=module, timeout=60)
        return r.status_code, "" if r.status_code == 200 else str(r.json()["error"]["message"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


ATTACKED = (6, 7)  # the plain streams the attacked phase replaces with the new hostile ones

WASI_SLEEPER = CONTROLLERS / "wasi_sleeper.wat"


def _attacked(ids: dict[str, str], forced_text: str, forced_ids: list[int]) -> list[dict[str, Any]]:
    jobs = _workload(True, ids, forced_text, forced_ids)
    host_calls = ids["hostile_host_calls"]
    jobs[ATTACKED[0]] = {
        "kind": "hostile:sleeper",
        "prompt": "Hello.",
        "extra": {"extra_body": {"controller": host_calls, "controller_arg": "slow_opens"}},
    }
    jobs[ATTACKED[1]] = {
        "kind": "hostile:endless_backtrack",
        "prompt": "Hello.",
        "extra": {"extra_body": {"controller": host_calls, "controller_arg": "endless_backtrack"}},
    }
    return jobs


def _workload(
    mixed: bool, ids: dict[str, str], forced_text: str, forced_ids: list[int]
) -> list[dict[str, Any]]:
    """32 requests: (kind, extra request fields, a checker of the answer or the expected error)."""
    jobs: list[dict[str, Any]] = []
    for i in range(CONCURRENCY):
        topic = TOPICS[i % len(TOPICS)]
        jobs.append({"kind": "plain", "prompt": f"Write one sentence about {topic}.", "extra": {}})
    if not mixed:
        return jobs
    for i in range(8, 16):
        jobs[i] = {
            "kind": "json_schema",
            "prompt": f"Invent a person who likes {TOPICS[i % 8]}. Reply in JSON.",
            "extra": {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": SCHEMA},
                }
            },
        }
    for i in range(16, 22):
        jobs[i] = {
            "kind": "regex",
            "prompt": "When did the first person walk on the moon? Give the date.",
            "extra": {"extra_body": {"regex": DATE}},
        }
    for i in range(22, 28):
        jobs[i] = {
            "kind": "choice",
            "prompt": f"Do you like {TOPICS[i % 8]}?",
            "extra": {"extra_body": {"choice": CHOICES}},
        }
    jobs[28] = {
        "kind": "force_answer",
        "prompt": "What is the answer?",
        "extra": {"extra_body": {"controller": ids["force_answer"], "controller_arg": forced_ids}},
        "expect": forced_text,
    }
    jobs[29] = {
        "kind": "boost_words",
        "prompt": "Tell me about names and years.",
        "extra": {"extra_body": {"controller": ids["boost_words"], "controller_arg": "name\t2\nyear\t1"}},
    }
    jobs[30] = {
        "kind": "hostile:spin",
        "prompt": "Hello.",
        "extra": {"extra_body": {"controller": ids["hostile_controller"], "controller_arg": "spin"}},
    }
    jobs[31] = {
        "kind": "hostile:trap_mid_mask",
        "prompt": "Hello.",
        "extra": {"extra_body": {"controller": ids["hostile_controller"], "controller_arg": "trap_mid_mask"}},
    }
    return jobs


def _check(job: dict[str, Any], text: str) -> bool:
    import jsonschema

    kind = job["kind"]
    try:
        if kind == "json_schema":
            jsonschema.validate(json.loads(text), SCHEMA)
            return True
        if kind == "regex":
            return re.fullmatch(DATE, text) is not None
        if kind == "choice":
            return text in CHOICES
        if kind == "force_answer":
            return bool(text == job["expect"])
        return bool(text.strip())
    except (ValueError, jsonschema.ValidationError):
        return False


async def _one(client: Any, job: dict[str, Any], started: float) -> dict[str, Any]:
    import openai

    stamps: list[float] = []
    pieces: list[str] = []
    error: str | None = None
    try:
        stream = await client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": job["prompt"]}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            **job["extra"],
        )
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    stamps.append(time.perf_counter())
                    pieces.append(choice.delta.content)
    except openai.APIError as e:
        error = str(e)
    text = "".join(pieces)
    hostile = job["kind"].startswith("hostile")
    ok = (error is not None) if hostile else (error is None and _check(job, text))
    return {
        "kind": job["kind"],
        "ok": ok,
        "error": error,
        "text": text,
        "ttft_s": (stamps[0] - started) if stamps else None,
        "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "chunks": len(stamps),
        "end_s": time.perf_counter() - started,
    }


async def _phase(base: str, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    import openai

    async with openai.AsyncOpenAI(
        base_url=base + "/v1", api_key="none", max_retries=0, timeout=600
    ) as client:
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(_one(client, job, started) for job in jobs))
        wall = time.perf_counter() - started
    return {"wall_s": wall, "outcomes": outcomes}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _summary(phase: dict[str, Any], tokens: int, skip: tuple[int, ...] = ()) -> dict[str, float]:
    good = [
        o for i, o in enumerate(phase["outcomes"]) if not o["kind"].startswith("hostile") and i not in skip
    ]
    ttft = [o["ttft_s"] for o in good if o["ttft_s"] is not None]
    gaps = [g for o in good for g in o["gaps_s"]]
    return {
        "requests_per_s": len(phase["outcomes"]) / phase["wall_s"],
        "tokens_per_s": tokens / phase["wall_s"],
        "ttft_p50_us": _pct(ttft, 0.5) * 1e6,
        "ttft_p99_us": _pct(ttft, 0.99) * 1e6,
        "token_p50_us": _pct(gaps, 0.5) * 1e6,
        "token_p99_us": _pct(gaps, 0.99) * 1e6,
    }


def _server_tokens(base: str) -> float:
    import httpx2

    text = httpx2.get(base + "/metrics", timeout=30).text
    match = re.search(r"^wasmshare_generated_tokens_total ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def run(quick: bool = False) -> list[dict[str, Any]]:
    rounds = 1 if quick else ROUNDS
    with tempfile.TemporaryDirectory(prefix="wasmshare-bench-serve-") as tmp:
        server = _Server(Path(tmp))
        try:
            from transformers import AutoTokenizer  # noqa: F401  (the tokenizer comes from the server's model)

            from wasmshare.llm.models import load_model

            tokenizer = load_model("smollm2-135m").tokenizer
            forced_text = " The answer is forty-two."
            forced_ids = tokenizer.encode(forced_text, add_special_tokens=False)
            ids = {
                name: server.upload(name)
                for name in ("force_answer", "boost_words", "hostile_controller", "hostile_host_calls")
            }
            sleeper_upload = server.upload_status(WASI_SLEEPER.read_bytes())
            warm = _workload(True, ids, forced_text, forced_ids)
            asyncio.run(
                _phase(server.base, [warm[0], warm[8], warm[16], warm[22]])
            )  # compile the constraints once
            summaries: dict[str, list[dict[str, float]]] = {
                "plain": [],
                "mixed": [],
                "mixed_30": [],
                "attacked": [],
            }
            checks: list[dict[str, Any]] = []
            for _ in range(rounds):
                for name in ("plain", "mixed", "attacked"):
                    jobs = (
                        _attacked(ids, forced_text, forced_ids)
                        if name == "attacked"
                        else _workload(name == "mixed", ids, forced_text, forced_ids)
                    )
                    before = _server_tokens(server.base)
                    phase = asyncio.run(_phase(server.base, jobs))
                    tokens = int(_server_tokens(server.base) - before)
                    summaries[name].append(_summary(phase, tokens))
                    if name == "mixed":
                        summaries["mixed_30"].append(_summary(phase, tokens, skip=ATTACKED))
                    checks.append(
                        {
                            "phase": name,
                            "failed": [
                                {"kind": o["kind"], "text": o["text"][:80], "error": o["error"]}
                                for o in phase["outcomes"]
                                if not o["ok"]
                            ],
                            "hostile_errors": [
                                o["error"] for o in phase["outcomes"] if o["kind"].startswith("hostile")
                            ],
                        }
                    )
            alive = server.healthy()
        finally:
            server.close()

    def med(name: str, key: str) -> float:
        return statistics.median(s[key] for s in summaries[name])

    failed = sum(len(c["failed"]) for c in checks)
    extra = {
        "requests": CONCURRENCY,
        "rounds": rounds,
        "max_tokens": MAX_TOKENS,
        "server_max_concurrent": MAX_CONCURRENT,
        "server_alive_after": alive,
        "well_behaved_failures": failed,
    }
    rows = []
    for key, label in (
        ("ttft_p50_us", "time to first token p50"),
        ("ttft_p99_us", "time to first token p99"),
        ("token_p50_us", "per-token latency p50"),
        ("token_p99_us", "per-token latency p99"),
    ):
        ours, base = med("mixed", key), med("plain", key)
        rows.append(
            {
                "case": f"32 streams, {label}",
                "ours_us": round(ours, 1),
                "baseline": "same load, unconstrained",
                "baseline_us": round(base, 1),
                "ratio": round(base / ours, 3) if ours else float("inf"),
            }
        )
    rps_ours, rps_base = med("mixed", "requests_per_s"), med("plain", "requests_per_s")
    rows.append(
        {
            "case": "32 streams, wall time per request (1 / requests/s)",
            "ours_us": round(1e6 / rps_ours, 1),
            "baseline": "same load, unconstrained",
            "baseline_us": round(1e6 / rps_base, 1),
            "ratio": round(rps_ours / rps_base, 3),
            "requests_per_s_ours": round(rps_ours, 2),
            "requests_per_s_baseline": round(rps_base, 2),
            "tokens_per_s_ours": round(med("mixed", "tokens_per_s"), 1),
            "tokens_per_s_baseline": round(med("plain", "tokens_per_s"), 1),
            **extra,
        }
    )
    ours, base = med("attacked", "token_p50_us"), med("mixed_30", "token_p50_us")
    rows.append(
        {
            "case": "30 streams beside a sleeper and an endless backtracker, per-token latency p50",
            "ours_us": round(ours, 1),
            "baseline": "the same 30 streams in the mixed load",
            "baseline_us": round(base, 1),
            "ratio": round(base / ours, 3) if ours else float("inf"),
            "sleeper_upload_status": sleeper_upload[0],
            "sleeper_upload_error": sleeper_upload[1],
            "wall_per_request_us": round(1e6 / med("attacked", "requests_per_s"), 1),
        }
    )
    rows[-2]["detail_checks"] = checks
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    last, attacked = rows[-2], rows[-1]
    hostile_ok = all(
        len(c["hostile_errors"]) == 2 and all(c["hostile_errors"])
        for c in last["detail_checks"]
        if c["phase"] == "mixed"
    )
    new_errors = [e for c in last["detail_checks"] if c["phase"] == "attacked" for e in c["hostile_errors"]]
    new_ok = bool(new_errors) and all(
        e and ("deadline" in e or "limit is" in e or "trapped" in e) for e in new_errors
    )
    return [
        {
            "target": "the WASI sleeper is refused at upload",
            "met": attacked["sleeper_upload_status"] == 400,
            "value": attacked["sleeper_upload_status"],
        },
        {
            "target": "the sleeper and the backtracker end their own requests (deadline, work bound)",
            "met": new_ok,
            "value": new_errors[:4],
        },
        {
            "target": "beside them, the other streams' per-token p50 within 1.1x",
            "met": attacked["ratio"] >= 1 / 1.1,
            "value": attacked["ratio"],
            "timing": True,
        },
        {
            "target": "every well-behaved request completes with valid output",
            "met": last["well_behaved_failures"] == 0,
            "value": last["well_behaved_failures"],
        },
        {
            "target": "each hostile controller ends its own request with an error",
            "met": hostile_ok,
            "value": hostile_ok,
        },
        {
            "target": "the server stays up",
            "met": bool(last["server_alive_after"]),
            "value": last["server_alive_after"],
        },
    ]


def main(argv: list[str] | None = None) -> int:
    return _common.bench_main(NAME, __doc__, argv, lambda quick: run(quick=quick), targets)


if __name__ == "__main__":
    raise SystemExit(main())
