"""LLM-as-judge and the OpenAI-compatible LM.

Judge logic is checked with scripted judges (an ``lm.LM`` whose ``generate_until`` answers from the
prompt it is shown): the swap rule (a judge that always names the first position never yields a win),
strict verdict parsing, rating clamping, and agreement / Cohen's kappa on a confusion matrix computed by
hand. ``OpenAILM`` is checked against a live ``lmforge serve`` with a tiny model (greedy text equals the
engine's, stop strings, log-likelihoods equal the model's own) and against stub HTTP servers (503 then
200, 429, 404, a refused connection, an endpoint without log-probabilities).
"""
import argparse
import http.server
import json
import re
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("httpx")

from lmforge.evaluate import judge as J  # noqa: E402
from lmforge.evaluate import lm  # noqa: E402
from lmforge.evaluate.openai_lm import OpenAILM, OpenAIError  # noqa: E402

GREEDY = {"until": [], "max_gen_toks": 12, "temperature": 0.0, "do_sample": False}


# ---- scripted judges ------------------------------------------------------------------------------

class Scripted(lm.LM):
    """A judge answering each prompt with ``fn(prompt)``; records every generate_until call."""

    name = "scripted"

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []

    def generate_until(self, requests):
        self.calls.append(list(requests))
        return [self.fn(c) for c, _ in requests]


def shown(prompt):
    """(answer shown as A, answer shown as B) of a pairwise prompt."""
    m = re.search(r"### Answer A\n(.*?)\n\n### Answer B\n(.*?)\n\n", prompt, re.S)
    return m.group(1), m.group(2)


def prefers_good(prompt):  # a fair judge: names the position of the answer that says "good"
    a, b = shown(prompt)
    return "Reasons.\n[[A]]" if "good" in a and "good" not in b else "[[B]]" if "good" in b and "good" not in a \
        else "Equal.\n[[C]]"


def test_position_biased_judge_never_wins():
    j = Scripted(lambda p: "A is shown first, so: [[A]]")
    items = [{"question": f"q{k}", "answer_a": f"a{k}", "answer_b": f"b{k}"} for k in range(6)]
    r = J.judge_many(j, items, mode="pairwise")
    assert len(j.calls) == 1 and len(j.calls[0]) == 12  # every prompt in one call, both orders per item
    assert all(x["winner"] == "tie" and x["consistent"] is False and x["flipped"] for x in r["items"])
    assert all(x["preferred"] == ["A", "B"] for x in r["items"])
    s = r["summary"]
    assert (s["wins_a"], s["wins_b"], s["ties"], s["inconsistent"], s["unparsed_items"]) == (0, 0, 0, 6, 0)
    assert s["flip_rate"] == 1.0 and s["first_position_rate"] == 1.0 and s["win_rate_a"] == 0.5
    assert s["flip_rate_ci"] == [1.0, 1.0] and s["win_rate_a_ci"] == [0.5, 0.5]
    # the second prompt of each item shows the answers swapped
    assert shown(j.calls[0][0][0]) == ("a0", "b0") and shown(j.calls[0][1][0]) == ("b0", "a0")


def test_a_fair_judges_win_survives_the_swap():
    j = Scripted(prefers_good)
    assert J.pairwise(j, "q", "good answer", "bad answer")["winner"] == "A"
    r = J.pairwise(j, "q", "bad answer", "good answer")
    assert r["winner"] == "B" and r["consistent"] and not r["flipped"] and r["verdicts"] == ["B", "A"]
    assert J.pairwise(j, "q", "good one", "good two")["winner"] == "tie"
    items = [{"question": "q", "answer_a": "good", "answer_b": "bad"}] * 3 + \
            [{"question": "q", "answer_a": "bad", "answer_b": "good"}]
    s = J.judge_many(j, items)["summary"]
    assert (s["wins_a"], s["wins_b"], s["inconsistent"], s["flip_rate"]) == (3, 1, 0, 0.0)
    assert s["first_position_rate"] == 0.5 and s["win_rate_a"] == 0.75


def test_a_win_in_one_order_and_a_tie_in_the_other_is_no_win():
    # order (a, b): [[A]] (a better); order (b, a): [[C]]
    j = Scripted(lambda p: "[[A]]" if shown(p)[0] == "x" else "[[C]]")
    r = J.pairwise(j, "q", "x", "y")
    assert r["winner"] == "tie" and r["consistent"] is False and r["preferred"] == ["A", "C"]


def test_unparsed_verdicts_are_counted_never_guessed():
    j = Scripted(lambda p: "[[A]]" if shown(p)[0] == "x" else "I cannot decide.")
    r = J.pairwise(j, "q", "x", "y")
    assert r["winner"] is None and r["unparsed"] == 1 and r["consistent"] is None
    s = J.judge_many(j, [{"question": "q", "answer_a": "x", "answer_b": "y"},
                         {"question": "q", "answer_a": "z", "answer_b": "x"}])["summary"]
    assert s["unparsed_items"] == 2 and s["unparsed_verdicts"] == 2 and s["flip_rate"] is None
    assert s["wins_a"] == s["wins_b"] == 0


@pytest.mark.parametrize("text,want", [
    ("Both are fine but A is right.\n[[A]]", "A"),
    ("[[B]]", "B"),
    ("Verdict: [[C]]", "C"),
    ("[[A]] ... as I said, [[A]]", "A"),      # the same tag twice is one verdict
    ("[[A]] or maybe [[B]]", None),           # two different tags: unparsed
    ("[[a]]", None), ("[A]", None), ("[[ A ]]", None), ("A", None), ("", None), ("[[D]]", None),
])
def test_parse_verdict(text, want):
    assert J.parse_verdict(text) == want


def test_parse_correct_and_rating():
    assert J.parse_correct("checked: [[CORRECT]]") is True
    assert J.parse_correct("[[INCORRECT]]") is False
    assert J.parse_correct("[[CORRECT]] no, [[INCORRECT]]") is None and J.parse_correct("correct") is None
    assert J.parse_rating("Rating: [[7]]") == 7.0 and J.parse_rating("[[ 8.5 ]]") == 8.5
    assert J.parse_rating("[[7]] then [[8]]") is None and J.parse_rating("Rating: 7") is None
    assert J.parse_rating("[[seven]]") is None and J.parse_rating("[[7]] [[A]]") == 7.0


def test_grade_parses_and_clamps_to_the_scale():
    texts = iter(["Fine.\nRating: [[7]]", "Rating: [[12]]", "Rating: [[0]]", "no grade", "Rating: [[3]]"])
    j = Scripted(lambda p: next(texts))
    assert J.grade(j, "q", "a", rubric="be right") == {"score": 7.0, "rating": 7.0, "parsed": True,
                                                        "clamped": False, "judgment": "Fine.\nRating: [[7]]"}
    r = J.grade(j, "q", "a", rubric="be right")
    assert (r["score"], r["rating"], r["clamped"]) == (10.0, 12.0, True)
    assert J.grade(j, "q", "a", rubric="r")["score"] == 1.0
    r = J.grade(j, "q", "a", rubric="r")
    assert r["score"] is None and not r["parsed"] and not r["clamped"]
    assert J.grade(j, "q", "a", rubric="r", scale=(1, 5))["score"] == 3.0
    assert "from 1 to 5" in j.calls[-1][0][0] and "Rubric: r" in j.calls[-1][0][0]
    j2 = Scripted(lambda p: {"x": "[[2]]", "y": "[[9]]", "z": "[[10]]"}[p.split("### Answer\n")[1][0]])
    s = J.judge_many(j2, [{"question": "q", "answer": a} for a in "xyzz"], mode="grade", rubric="r",
                     scale=(1, 9))["summary"]
    assert (s["n"], s["parsed"], s["clamped"], s["mean"]) == (4, 4, 2, 7.25)
    assert s["histogram"] == {"2": 1, "9": 3}


def test_bad_input_is_named():
    j = Scripted(lambda p: "[[A]]")
    with pytest.raises(ValueError, match=r"items\[1\]: field 'answer_b'"):
        J.judge_many(j, [{"question": "q", "answer_a": "a", "answer_b": "b"}, {"question": "q", "answer_a": "a"}])
    with pytest.raises(ValueError, match="rubric"):
        J.grade(j, "q", "a", rubric="  ")
    with pytest.raises(ValueError, match="scale"):
        J.grade(j, "q", "a", rubric="r", scale=(5, 5))
    with pytest.raises(ValueError, match="mode"):
        J.judge_many(j, [], mode="vote")
    with pytest.raises(ValueError, match=r"items\[0\]: field 'label'"):
        J.agreement(j, [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"items\[0\]: field 'label' must be true or false"):
        J.judge_many(j, [{"question": "q", "answer": "a", "label": "yes"}], mode="check")
    with pytest.raises(TypeError, match="lm.LM"):
        J.pairwise(object(), "q", "a", "b")
    assert j.calls == []  # nothing was sent for a bad batch


# ---- agreement with a rule-checkable truth -----------------------------------------------------------

def test_agreement_and_kappa_on_a_hand_computed_confusion():
    # truth correct:   judged correct 4, judged incorrect 1
    # truth incorrect: judged correct 2, judged incorrect 3;  plus one unparsed verdict
    # po = 7/10; row margins .5/.5, column margins .6/.4; pe = .5*.6 + .5*.4 = .5; kappa = (.7 - .5)/.5 = .4
    plan = [(True, "[[CORRECT]]")] * 4 + [(True, "[[INCORRECT]]")] + [(False, "[[CORRECT]]")] * 2 + \
           [(False, "[[INCORRECT]]")] * 3 + [(True, "hmm")]
    items = [{"question": f"q{k}", "answer": f"a{k}", "label": lab} for k, (lab, _) in enumerate(plan)]
    says = {f"a{k}": t for k, (_, t) in enumerate(plan)}
    j = Scripted(lambda p: says[p.split("### Answer\n")[1].split("\n")[0]])
    r = J.agreement(j, items)
    assert r["n"] == 11 and r["unparsed"] == 1
    assert r["confusion"] == {"correct": {"correct": 4, "incorrect": 1}, "incorrect": {"correct": 2, "incorrect": 3}}
    assert r["agreement"] == pytest.approx(0.7) and r["cohen_kappa"] == pytest.approx(0.4)
    assert r["judged_correct_rate"] == pytest.approx(0.6) and r["true_correct_rate"] == pytest.approx(6 / 11)
    lo, hi = r["agreement_ci"]
    assert 0.0 <= lo < 0.7 < hi <= 1.0 and hi - lo > 0.2  # ten items: a wide interval
    klo, khi = r["cohen_kappa_ci"]
    assert -1.0 <= klo < 0.4 < khi <= 1.0
    assert J.agreement(j, items) == r  # seeded: the same intervals again


def test_kappa_edge_cases():
    assert J.cohen_kappa({"correct": {"correct": 5, "incorrect": 0}, "incorrect": {"correct": 0, "incorrect": 0}}) \
        is None  # one class only: chance agreement is 1
    assert J.cohen_kappa({"x": {"x": 3}, "y": {"y": 2}}) == pytest.approx(1.0)
    assert J.cohen_kappa({"x": {"y": 3}, "y": {"x": 3}}) == pytest.approx(-1.0)
    assert J.cohen_kappa({}) is None


def _adds_up(prompt):
    q = prompt.split("### Question\n")[1].split("\n")[0]
    a, b = map(int, re.findall(r"\d+", q))
    ans = int(prompt.split("### Answer\n")[1].split("\n")[0])
    return "[[CORRECT]]" if a + b == ans else "[[INCORRECT]]"


def test_agreement_on_synthetic_addition():
    items = J.addition_items(40, digits=3, seed=1)
    assert items == J.addition_items(40, digits=3, seed=1)  # deterministic
    for it in items:  # the labels are the rule's
        a, b = map(int, re.findall(r"\d+", it["question"]))
        assert it["label"] == (a + b == int(it["answer"])) and it["reference"] == str(a + b)
    assert 8 <= sum(not it["label"] for it in items) <= 32
    exact = J.agreement(Scripted(_adds_up), items)
    assert exact["agreement"] == 1.0 and exact["cohen_kappa"] == pytest.approx(1.0)
    yes = J.agreement(Scripted(lambda p: "[[CORRECT]]"), items)  # a judge that always approves
    assert yes["cohen_kappa"] == pytest.approx(0.0) and yes["agreement"] == pytest.approx(yes["true_correct_rate"])


# ---- the CLI face on runs' per-sample logs --------------------------------------------------------------

def _run(tmp, name, answers, prompts=None, exact=None):
    d = tmp / name
    (d / "samples").mkdir(parents=True)
    rows = []
    for k, ans in enumerate(answers):
        p = (prompts or {}).get(k, f"Q: What is {k} + {k}?\nA:")
        rows.append({"doc_id": k, "split": "dev", "doc": {}, "prompt": p, "target": str(2 * k),
                     "requests": [[p, {}]], "responses": [ans], "filtered": [ans.strip()],
                     "metrics": {"exact_match": float(ans.strip() == str(2 * k)) if exact is None else exact[k]},
                     "truncated": False})
    (d / "samples" / "addition.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "result.json").write_text(json.dumps({"lmforge_eval": 1, "tasks": {"addition": {
        "output_type": "generate_until", "split": "dev", "n": len(rows), "primary": "exact_match",
        "samples": "samples/addition.jsonl"}}}))
    return d


def _args(*argv):
    p = argparse.ArgumentParser()
    J.add_arguments(p)
    return p.parse_args(list(argv))


def test_cli_pairwise_grade_and_agreement_on_runs(tmp_path, monkeypatch, capsys):
    a = _run(tmp_path, "a", [" 0", " 2", " 4", " 7"])   # right, right, right, wrong
    b = _run(tmp_path, "b", [" 1", " 2", " 5", " 6"])   # wrong, right, wrong, right

    def fair(prompt):  # knows the sum from the question: prefers the right answer
        q = re.search(r"What is (\d+) \+ (\d+)", prompt)
        right = str(int(q.group(1)) + int(q.group(2)))
        x, y = (s.strip() for s in shown(prompt))
        return "[[C]]" if (x == right) == (y == right) else "[[A]]" if x == right else "[[B]]"

    args = _args("pairwise", str(a), str(b), "--judge-url", "http://unused")
    assert args.fn is J.cmd
    r = J.run_cli(args, judge=Scripted(fair))
    s = r["tasks"]["addition"]["summary"]
    assert (s["wins_a"], s["wins_b"], s["ties"], s["inconsistent"]) == (2, 1, 1, 0)
    assert [x["doc_id"] for x in r["tasks"]["addition"]["items"]] == [0, 1, 2, 3]

    r = J.run_cli(_args("agreement", str(a)), judge=Scripted(_adds_up))
    s = r["tasks"]["addition"]["summary"]
    assert s["agreement"] == 1.0 and s["confusion"]["incorrect"]["incorrect"] == 1 and s["n"] == 4

    r = J.run_cli(_args("grade", str(b), "--rubric", "r", "--limit", "2", "--with-reference"),
                  judge=Scripted(lambda p: "Rating: [[4]]" if "### Reference answer\n0" in p else "Rating: [[6]]"))
    assert r["tasks"]["addition"]["summary"]["histogram"] == {"4": 1, "6": 1}

    monkeypatch.setattr(J, "make_judge", lambda a: Scripted(fair))
    assert J.cmd(_args("pairwise", str(a), str(b))) == 0
    printed = capsys.readouterr().out
    assert "addition: n 4, A wins 2, B wins 1, ties 1, flipped with the swap 0 (0.0%), unparsed 0; A's win rate " \
           "62.5% [" in printed
    monkeypatch.setattr(J, "make_judge", lambda a: Scripted(_adds_up))
    assert J.cmd(_args("agreement", str(a))) == 0
    assert "agreement 100.0% [100.0%, 100.0%], Cohen's kappa 1.000 [" in capsys.readouterr().out
    monkeypatch.undo()

    c = _run(tmp_path, "c", [" 0"] * 4, prompts={2: "another prompt"})
    with pytest.raises(ValueError, match="different prompts"):
        J.run_cli(_args("pairwise", str(a), str(c)), judge=Scripted(fair))
    d = _run(tmp_path, "d", [" 0"] * 2, exact=[0.5, 1.0])
    with pytest.raises(ValueError, match="0/1 metric"):
        J.run_cli(_args("agreement", str(d)), judge=Scripted(fair))
    with pytest.raises(ValueError, match="no result.json"):
        J.run_cli(_args("grade", str(tmp_path), "--rubric", "r"), judge=Scripted(fair))
    with pytest.raises(ValueError, match="--rubric"):
        J.run_cli(_args("grade", str(a)), judge=Scripted(fair))
    with pytest.raises(ValueError, match="--synthetic"):
        J.run_cli(_args("agreement"), judge=Scripted(fair))
    with pytest.raises(ValueError, match="--judge-url URL"):
        J.run_cli(_args("agreement", "--synthetic", "3"))
    small = Scripted(fair)
    small.max_length = 256
    with pytest.raises(ValueError, match="--max-tokens 512: the judge's context is 256 tokens"):
        J.run_cli(_args("agreement", "--synthetic", "3"), judge=small)
    assert small.calls == []
    (a / "samples" / "addition.jsonl").write_text('{"doc_id": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"addition.jsonl:2: not a JSON line"):
        J.run_cli(_args("grade", str(a), "--rubric", "r"), judge=Scripted(fair))


# ---- stub HTTP servers ------------------------------------------------------------------------------

CHAT_OK = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                                                                 "message": {"role": "assistant", "content": "hi"}}]}


class Stub:
    """A loopback HTTP server answering the n-th request with ``script[n]`` (status, body, headers); the last
    entry repeats. Records (method, path, body) of every request."""

    def __init__(self, script):
        self.script, self.seen = list(script), []
        stub = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self):
                n = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                stub.seen.append((self.command, self.path, body))
                status, out, headers = stub.script[min(len(stub.seen), len(stub.script)) - 1]
                data = json.dumps(out).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub():
    made = []

    def make(*script):
        s = Stub(script)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def test_retries_on_503_then_succeeds(stub):
    s = stub((503, {"error": {"message": "busy"}}, {"Retry-After": "0"}), (503, {}, {}), (200, CHAT_OK, {}))
    m = OpenAILM(s.url, "m", backoff_s=0.01, max_retries=2)
    t = time.perf_counter()
    assert m.generate_until([("hello", GREEDY)]) == ["hi"]
    assert time.perf_counter() - t < 5
    posts = [x for x in s.seen if x[0] == "POST"]
    assert len(posts) == 3 and m.stats["retries"] == 2
    assert posts[0][1] == "/v1/chat/completions"
    body = posts[0][2]
    assert body["messages"] == [{"role": "user", "content": "hello"}] and body["max_tokens"] == 12
    assert body["temperature"] == 0.0 and "stop" not in body and body["model"] == "m"


def test_429_is_retried_and_a_last_failure_names_url_and_status(stub):
    s = stub((429, {"error": {"message": "slow down"}}, {}), (200, CHAT_OK, {}))
    assert OpenAILM(s.url, "m", backoff_s=0.01).generate_until([("x", {})]) == ["hi"]
    s = stub((503, {"error": {"message": "overloaded"}}, {}))
    m = OpenAILM(s.url + "/v1", "m", backoff_s=0.01, max_retries=1)
    with pytest.raises(OpenAIError, match=r"/v1/chat/completions: HTTP 503 after 2 attempts: overloaded") as e:
        m.generate_until([("x", {})])
    assert e.value.status == 503 and s.url in str(e.value) and len(s.seen) == 2


def test_404_is_not_retried(stub):
    s = stub((404, {"error": {"message": "The model 'm' does not exist"}}, {}))
    m = OpenAILM(s.url, "m", backoff_s=0.01, max_retries=3)
    with pytest.raises(OpenAIError, match=r"POST http://127\.0\.0\.1:\d+/v1/chat/completions: HTTP 404: The model"):
        m.generate_until([("x", {})])
    assert len(s.seen) == 1


def test_connection_refused_is_a_clear_error():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    m = OpenAILM(f"http://127.0.0.1:{port}", "m", chat=False, backoff_s=0.01, max_retries=1)  # asks nothing yet
    with pytest.raises(OpenAIError, match=rf"127\.0\.0\.1:{port}/v1/completions: could not get an answer after 2 "
                                          r"attempt\(s\): ConnectError") as e:
        m.generate_until([("x", {})])
    assert e.value.status is None
    with pytest.raises(ValueError, match="base_url must be an http"):
        OpenAILM("localhost:8000", "m")


def test_model_discovery_and_stop_cut_client_side(stub):
    two = {"data": [{"id": "a"}, {"id": "b"}]}
    with pytest.raises(ValueError, match=r"lists \['a', 'b'\]; name one"):
        OpenAILM(stub((200, two, {})).url, None)
    s = stub((200, {"data": [{"id": "only", "max_model_len": 77}]}, {}),
             (200, {"choices": [{"text": "one. two; three"}]}, {}))
    m = OpenAILM(s.url, None, chat=False, max_stop=1)
    assert m.model == "only" and m.max_length == 77
    # the server ignored the stop strings (and got only the first of them): the text is cut here anyway
    assert m.generate_until([("p", {"until": ["three", ";"], "max_gen_toks": 5})]) == ["one. two"]
    assert s.seen[-1][2]["stop"] == ["three"] and s.seen[-1][2]["prompt"] == "p"
    m.generate_until([("p", {})])
    assert s.seen[-1][2]["max_tokens"] == 256 and "stop" not in s.seen[-1][2]  # lm-eval's default length
    n = len(s.seen)
    with pytest.raises(ValueError, match="unknown gen_kwargs key 'max_length'"):
        m.generate_until([("p", {"max_length": 3})])
    assert len(s.seen) == n


def test_an_endpoint_without_logprobs_cannot_score(stub):
    s = stub((200, {"choices": [{"text": "a b", "logprobs": None}]}, {}))
    with pytest.raises(NotImplementedError, match="cannot score log-likelihoods.*no echoed prompt log-prob"):
        OpenAILM(s.url, "m").loglikelihood([("a", " b")])
    s = stub((400, {"error": {"message": "echo is not supported"}}, {}))
    with pytest.raises(NotImplementedError, match="cannot score log-likelihoods.*echo is not supported"):
        OpenAILM(s.url, "m").loglikelihood_rolling(["a b"])
    with pytest.raises(OpenAIError, match=r"/tokenize: HTTP 400"):  # token ids asked for, and no /tokenize
        OpenAILM(s.url, "m", scoring="tokens").loglikelihood([("a", " b")])
    with pytest.raises(ValueError, match="scoring must be one of"):
        OpenAILM(s.url, "m", scoring="ids")


def _echoed(tokens):
    """A completions answer echoing ``tokens``: (text, offset, logprob, top logprob) each."""
    return {"choices": [{"text": "".join(t for t, *_ in tokens), "logprobs": {
        "tokens": [t for t, *_ in tokens], "text_offset": [o for _, o, _, _ in tokens],
        "token_logprobs": [lp for _, _, lp, _ in tokens],
        "top_logprobs": [None if lp is None else {"?": top} for _, _, lp, top in tokens]}}]}


def test_the_continuation_is_split_by_text_offsets(stub):
    # "a bcd" as <bos> | a | ' ' | bc | d, then one generated token; d is not its position's top token
    toks = [("", 0, None, None), ("a", 0, -1.0, -1.0), (" ", 1, -2.0, -2.0), ("bc", 2, -3.0, -3.0),
            ("d", 4, -4.0, -0.5), ("x", 5, -9.0, -9.0)]
    s = stub((200, _echoed(toks), {}))
    m = OpenAILM(s.url, "m", chat=False)
    got = m.loglikelihood([("a ", "bcd"), ("a b", "cd"), ("a", " bcd"), ("a bc", "d"), ("", "a bcd")])
    # the context's trailing space moves to the continuation; "bc" straddles "a b" | "cd" and is the continuation's
    assert got == [(-9.0, False), (-7.0, False), (-9.0, False), (-4.0, False), (-10.0, False)]
    assert m.loglikelihood_rolling(["a bcd"]) == [-10.0]
    body = s.seen[-1][2]
    assert body["echo"] is True and body["logprobs"] == 1 and body["prompt"] == "a bcd"
    s = stub((200, _echoed([(t, o, lp, lp) for t, o, lp, _ in toks[:4]]), {}))
    assert OpenAILM(s.url, "m").loglikelihood([("a", " bc")]) == [(-5.0, True)]
    toks_nobos = [("a", 0, None, None)] + toks[2:]  # no BOS: the first token has no log-probability
    s = stub((200, _echoed(toks_nobos), {}))
    with pytest.raises(ValueError, match="no log-probability for the first token"):
        OpenAILM(s.url, "m").loglikelihood_rolling(["a bcd"])
    assert OpenAILM(s.url, "m").loglikelihood([("a", " bcd")]) == [(-9.0, False)]


# ---- against a live lmforge serve ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory, corpus_files):
    """(base URL, engine-backed ``infer.llm.LM`` on the same weights, model, tokenizer, spec, model dir)."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from tiny_serve import live, tiny_model

    from lmforge.infer.llm import LM as Generator
    from lmforge.model import load, load_tokens, save

    d = tmp_path_factory.mktemp("judge") / "tiny"
    m, tok = tiny_model(corpus_files[0], ctx=1024)  # room for a judge's prompt
    save(m, d, tokenizer=tok)
    m, tok = load(d)
    spec = load_tokens(d, tok)
    with live(m, tok, tokens=spec, model_name="tiny", num_blocks=128) as (base, _):
        yield base, Generator(m, tok, spec, num_blocks=128), m, tok, spec, d


PROMPTS = ["To be, or not", "ROMEO:", "What light through", "First Citizen:\nBefore we"]


def test_greedy_text_equals_the_engines(served):
    base, gen, *_ = served
    with OpenAILM(base, "tiny", chat=False, concurrency=3) as m:
        assert m.max_length == 1024
        got = m.generate_until([(p, GREEDY) for p in PROMPTS])
    want = [gen.generate(p, max_tokens=12, temperature=0).text for p in PROMPTS]
    assert got == want and len(set(got)) == len(got) and all(got)
    with OpenAILM(base, None, chat=True) as m:
        got = m.generate_until([(p, GREEDY) for p in PROMPTS])
    want = [gen.chat([{"role": "user", "content": p}], max_tokens=12, temperature=0).text for p in PROMPTS]
    assert got == want and len(set(got)) == len(got)


def test_stop_strings_are_honoured(served):
    base, gen, *_ = served
    m = OpenAILM(base, "tiny", chat=False)
    checked = 0
    for p in PROMPTS:
        full = gen.generate(p, max_tokens=12, temperature=0).text
        words = [w for w in re.findall(r"[A-Za-z]{2,}", full) if full.index(w) > 0]
        if not words:
            continue
        stop = words[0]
        got = m.generate_until([(p, {**GREEDY, "until": [stop]})])[0]
        assert got == full[:full.index(stop)] and stop not in got
        checked += 1
    assert checked >= 1, "no greedy output had a word to stop at"


def test_sampling_with_a_seed_repeats(served):
    base, *_ = served
    m = OpenAILM(base, "tiny", chat=False)
    kw = {"until": [], "max_gen_toks": 10, "temperature": 1.0, "do_sample": True, "seed": 7}
    a, b, c = m.generate_until([("ROMEO:", kw), ("ROMEO:", kw), ("ROMEO:", {**kw, "seed": 8})])
    assert a == b and a != c


def test_loglikelihood_equals_the_models_own(served, corpus_texts):
    from lmforge.evaluate.local import LocalLM

    base, gen, model, tok, spec, _ = served
    m = OpenAILM(base, "tiny", chat=False)  # scoring "auto": lmforge serve has /tokenize, so token ids
    local = LocalLM(model, tok, tokens=spec)

    def ref(ctx, cont):  # lm-eval's rule on the model itself
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        c = spec.encode_prompt(tok, ctx)
        ids = c + spec.encode_prompt(tok, ctx + cont)[len(c):]  # lm-eval feeds context_enc + continuation_enc
        k = len(c)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)[k - 1:-1]
        tgt = torch.tensor(ids[k:])
        return lp.gather(1, tgt[:, None]).sum().item(), bool((lp.argmax(-1) == tgt).all())

    # a greedy continuation: the model's own first token after "ROMEO:" (when it decodes to whole characters)
    ctx_ids = spec.encode_prompt(tok, "ROMEO:")
    with torch.no_grad():
        first = int(model(torch.tensor([ctx_ids]))[0, -1].argmax())
    greedy_text = tok.decode([first])
    pairs = [("To be, or", " not to be"), ("ROMEO: ", "Hello"), ("", "First Citizen"), ("caf", "\u00e9 au lait"),
             ("ROMEO:", greedy_text), ("Speak.\n", "\nFirst Citizen:")]
    got = m.loglikelihood(pairs)
    assert m._use_ids is True
    for (ctx, cont), (lp, greedy), (llp, lgreedy) in zip(pairs, got, local.loglikelihood(pairs)):
        want_lp, want_greedy = ref(ctx, cont)
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy, (ctx, cont)
        assert lp == pytest.approx(llp, abs=1e-4) and greedy == lgreedy, (ctx, cont)
    if spec.encode_prompt(tok, "ROMEO:" + greedy_text) == ctx_ids + [first]:
        assert got[4][1] is True
    # by text offsets (an endpoint without /tokenize): the same wherever the tokens break at the context's end
    off = OpenAILM(base, "tiny", chat=False, scoring="offsets").loglikelihood(pairs[:4])
    assert [x[0] for x in off] == pytest.approx([x[0] for x in got[:4]], abs=1e-4)
    # rolling: a text past the context in lm-eval's windows, as LocalLM windows it (one token less: the one
    # generated, and the window's last token sent)
    long_text = corpus_texts[0][:6000]
    assert len(tok.encode(long_text)) > 1200
    short = LocalLM(model, tok, tokens=spec, max_length=m.max_length - 2)
    rolled = m.loglikelihood_rolling(["First Citizen", long_text])
    assert rolled[0] == pytest.approx(got[2][0], abs=1e-4)
    assert rolled == pytest.approx(short.loglikelihood_rolling(["First Citizen", long_text]), abs=1e-3)


def test_wrong_model_name_on_lmforge_serve_is_a_404(served):
    base, *_ = served
    with pytest.raises(OpenAIError, match=r"HTTP 404: The model 'nope' does not exist") as e:
        OpenAILM(base, "nope", max_retries=2, backoff_s=0.01).generate_until([("x", GREEDY)])
    assert e.value.status == 404


def test_a_local_judge_and_the_served_chat_agree(served):
    from lmforge.evaluate.local import LocalLM

    base, _, _, _, _, d = served
    local = LocalLM.from_checkpoint(d)
    remote = OpenAILM(base, "tiny", chat=True)
    items = [{"question": p, "answer_a": "yes", "answer_b": "no"} for p in PROMPTS[:2]]
    kw = {"max_gen_toks": 8}
    texts = [x["judgments"] for x in J.judge_many(local, items, gen_kwargs=kw)["items"]]
    assert texts == [x["judgments"] for x in J.judge_many(remote, items, gen_kwargs=kw)["items"]]
    assert len({t for pair in texts for t in pair}) == 4  # the prompts differ, so do the texts
    # the tiny model writes no verdict tags: every verdict is unparsed, counted, and no winner is invented
    r = J.judge_many(remote, [{"question": "q", "answer_a": "x", "answer_b": "y"}], gen_kwargs={"max_gen_toks": 8})
    assert r["summary"]["unparsed_verdicts"] == 2 and r["items"][0]["winner"] is None


def test_cli_cmd_against_lmforge_serve(served, capsys, tmp_path):
    base, *_ = served
    out = tmp_path / "j.json"
    rc = J.cmd(_args("agreement", "--synthetic", "3", "--judge-url", base, "--max-tokens", "4", "--json",
                     "--out", str(out)))
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    s = printed["tasks"]["addition_3d_synthetic"]["summary"]
    assert s["n"] == 3 and s["unparsed"] == 3 and s["agreement"] is None and printed["judge"] == f"tiny@{base}/v1"
    assert json.loads(out.read_text()) == printed
