"""Fuzz the server from its own OpenAPI document (schemathesis) against a live server.

Knows: every operation ``/openapi.json`` lists gets a bounded number of generated
requests, schema-conforming and not (``positive`` and ``negative`` modes), and none may
get a 5xx or hang past a timeout; afterwards the server still answers ``/health``, has no
request left running and every KV block free, and serves a normal completion whose text
equals the same request's text before the fuzzing. Generated ``max_tokens`` /
``max_completion_tokens`` above 8 and ``n`` above 2 are lowered to those before sending
(the tiny model is fast, but 16 choices of a whole context each would not keep this under
a minute on 2 cores); nothing else is touched. Does not check that 4xx answers are the
right 4xx, nor that responses match the schema (test_server.py checks the answers).
"""
import pytest
from tiny_serve import get, live, post, tiny_model, wait_idle

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

EXAMPLES = 15  # per operation and mode
BLOCKS = 128
NORMAL = {"model": "fuzz", "prompt": "To be, or not", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def live_server(corpus_files):
    m, tok = tiny_model(corpus_files[0])
    with live(m, tok, model_name="fuzz", num_blocks=BLOCKS, request_timeout_s=30) as (base, _):
        code, before = post(base, "/v1/completions", NORMAL)
        assert code == 200
        yield base, before


def _bounded(body):
    if isinstance(body, dict):
        for k, cap in (("max_tokens", 8), ("max_completion_tokens", 8), ("n", 2)):
            v = body.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > cap:
                body[k] = cap
    return body


def test_schema_lists_the_api(live_server):
    base, _ = live_server
    doc = get(base, "/openapi.json")
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item if m in ("get", "post")}
    want = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
            ("GET", "/health"), ("POST", "/tokenize")}
    assert want <= ops, f"/openapi.json lacks {want - ops}"


def test_no_server_errors(live_server):
    """Each operation, positive then negative cases. (schemathesis' own pytest plugin, ``from_fixture``,
    does not run under pytest 9: it reads ``request.node._nodeid``; so hypothesis drives the strategies here.)"""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    base, _ = live_server
    api = schemathesis.openapi.from_url(base + "/openapi.json")
    ran, failures = [], []
    for result in api.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            seen = [0]

            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def one(case):
                seen[0] += 1
                case.body = _bounded(case.body)
                case.call_and_validate(checks=[not_a_server_error], timeout=30)

            try:
                one()
            except Unsatisfiable:  # nothing to break: an operation without parameters or body
                if mode is GenerationMode.POSITIVE:
                    raise
            except Exception as e:  # noqa: BLE001 - gathered, reported together below
                failures.append(f"{op.label} ({mode.value}): {type(e).__name__}: {str(e)[:2000]}")
            ran.append((op.label, mode.value, seen[0]))
    assert not failures, "\n\n".join(failures)
    # every operation really got requests, and those with a body got broken ones too
    assert all(n > 0 for _, mode, n in ran if mode == "positive"), ran
    assert sum(n for _, mode, n in ran if mode == "negative") >= 3 * EXAMPLES, ran


def test_still_serves_after_fuzzing(live_server):
    base, before = live_server
    h = wait_idle(base, BLOCKS)
    assert h["status"] == "ok" and h["running"] == h["waiting"] == h["in_flight"] == 0, h
    assert h["free_blocks"] == BLOCKS, h
    code, after = post(base, "/v1/completions", NORMAL)
    assert code == 200 and after["choices"][0]["text"] == before["choices"][0]["text"]
    assert after["usage"] == before["usage"]
