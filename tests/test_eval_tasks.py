"""task: loading YAML / JSONL / directories, lm-eval's request strings, few-shot, and bad input."""
import json
from pathlib import Path

import pytest

from lmforge.evaluate import task as T
from lmforge.evaluate.task import TaskError, load_task, load_tasks

DATA = Path(__file__).parent / "data" / "eval"


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _mc_yaml(tmp_path, docs, extra="", choice='"{{choices}}"', target="label"):
    _write(tmp_path, "d.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    return _write(tmp_path, "t.yaml", f"""task: t
dataset_path: json
dataset_kwargs: {{data_files: {{test: d.jsonl}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_target: {target}
doc_to_choice: {choice}
{extra}""")


# ---------------------------------------------------------------- loading

def test_load_directory_yaml_and_jsonl():
    tasks = {t.name: t for t in load_task(DATA)}
    assert set(tasks) == {"local_mc", "local_rolling", "local_addition", "inline_mc", "local_code", "local_wino"}
    mc = tasks["local_mc"]
    assert mc.output_type == "multiple_choice" and [m for m, _ in mc.metrics] == ["acc", "acc_norm", "acc_bytes"]
    assert len(mc.docs("test")) == 8 and len(mc.docs("train")) == 5
    inline = tasks["inline_mc"]
    assert len(inline.docs("test")) == 4 and len(inline.docs("dev")) == 3
    assert "split" not in inline.docs("test")[0]
    assert inline.split_for("test") == "test" and inline.split_for("dev") == "dev"


def test_requests_zero_shot_as_lm_eval_builds_them():
    mc = load_task(DATA / "mc.yaml")[0]
    drs = mc.requests("test")
    d0 = drs[0]
    assert d0.prompt == "Question: What colour is the sky on a clear day?\nAnswer:"
    assert [r.args for r in d0.requests] == [(d0.prompt, " blue"), (d0.prompt, " green"),
                                             (d0.prompt, " bright red"), (d0.prompt, " a plaid pattern")]
    assert [r.idx for r in d0.requests] == [0, 1, 2, 3] and d0.target == 0
    roll = load_task(DATA / "rolling.yaml")[0].requests("test")
    assert roll[1].requests[0].args == ("All the world's a stage, and all the men and women merely players.",)
    gen = load_task(DATA / "gen.yaml")[0]
    g = gen.requests("test", num_fewshot=0, limit=2)
    assert len(g) == 2
    ctx, kw = g[0].requests[0].args
    d = gen.docs("test")[0]
    assert ctx == f"Q: What is {d['a']} + {d['b']}?\nA:" and kw["until"] == ["\n"] and kw["max_gen_toks"] == 8


def test_fewshot_context_joined_as_lm_eval():
    gen = load_task(DATA / "gen.yaml")[0]
    train = gen.docs("train")
    drs = gen.requests("test")  # num_fewshot: 2 from the YAML
    ctx = drs[0].prompt
    blocks = ctx.split("\n\n")
    assert len(blocks) == 3  # two examples, then the question
    for b in blocks[:2]:
        q, a = b.rsplit("\nA: ", 1)
        assert any(q == f"Q: What is {t['a']} + {t['b']}?" and a == t["answer"] for t in train)
    assert blocks[2].endswith("\nA:")
    # the same seed gives the same examples; a different seed other ones somewhere
    assert [d.prompt for d in gen.requests("test")] == [d.prompt for d in drs]
    assert [d.prompt for d in gen.requests("test", fewshot_seed=99)] != [d.prompt for d in drs]


def test_description_gen_prefix_and_delimiters(tmp_path):
    p = _mc_yaml(tmp_path, [{"q": "Q1", "choices": ["a", "b"], "label": 1}, {"q": "Q2", "choices": ["c", "d"], "label": 0}],
                 extra='description: "Pick one.\\n"\ntarget_delimiter: "="\nfewshot_delimiter: "|"\nfewshot_split: test\nnum_fewshot: 1\n')
    t = load_task(p)[0]
    drs = t.requests("test")
    # the document itself is never its own example: each draws the other one
    assert drs[0].prompt == "Pick one.\nQ2=c|Q1"
    assert drs[1].prompt == "Pick one.\nQ1=b|Q2"
    assert drs[0].requests[1].args == ("Pick one.\nQ2=c|Q1", "=b")


def test_requests_equal_lm_eval_build_all_requests(monkeypatch):
    """The request arguments of lm-eval's own ConfigurableTask on the same YAML files, zero- and few-shot."""
    pytest.importorskip("lm_eval")
    import logging

    import yaml
    from lm_eval.api.task import ConfigurableTask

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(DATA)  # lm-eval reads data_files relative to the working directory
    logging.disable(logging.WARNING)
    files = {"local_mc": "mc.yaml", "local_addition": "gen.yaml", "local_rolling": "rolling.yaml", "local_wino": "wino.yaml"}
    try:
        for name, k, fs in (("local_mc", 0, None), ("local_mc", 3, None), ("local_addition", 2, None),
                            ("local_rolling", 0, None), ("local_mc", 2, "test"), ("local_addition", 3, "test"),
                            ("local_wino", 0, None), ("local_wino", 2, None)):
            cfg = yaml.safe_load((DATA / files[name]).read_text())
            if fs:  # examples drawn from the evaluated split itself: the document is left out of its own
                cfg["fewshot_split"] = fs
            lt = ConfigurableTask(config=cfg)
            lt.set_config("num_fewshot", k)
            lt.set_fewshot_seed(1234)
            lt.build_all_requests(limit=None, rank=0, world_size=1)
            theirs = sorted(((i.doc_id, i.idx, i.arguments) for i in lt.instances), key=lambda x: x[:2])
            mine_t = [t for t in load_task(DATA) if t.name == name][0]
            mine_t.fewshot_split = fs or mine_t.fewshot_split
            mine = [(d.doc_id, r.idx, r.args) for d in mine_t.requests("test", num_fewshot=k) for r in d.requests]
            assert mine == theirs, (name, k, fs)
    finally:
        logging.disable(logging.NOTSET)


def test_multiple_input_contexts():
    t = load_task(DATA / "wino.yaml")[0]
    d = t.requests("test", num_fewshot=0)[2]
    assert [r.args for r in d.requests] == [("Anna thanked Beth because Anna", " had helped her."),
                                            ("Anna thanked Beth because Beth", " had helped her.")]
    assert d.target == 1 and d.prompt == "Anna thanked Beth because Beth"


def _chat(messages, add_generation_prompt=True):
    out = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
    return out + ("<|assistant|>" if add_generation_prompt else "")


def test_chat_template_prompts_equal_lm_eval(monkeypatch, tmp_path):
    """lm-eval's --apply_chat_template path (single-turn few-shot, description as the system message)."""
    pytest.importorskip("lm_eval")
    import logging

    import yaml
    from lm_eval.api.task import ConfigurableTask

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(DATA)
    logging.disable(logging.WARNING)
    try:
        for fname, k, desc in (("mc.yaml", 2, "Answer the question.\n"), ("gen.yaml", 2, None), ("wino.yaml", 1, "Pick.")):
            cfg = yaml.safe_load((DATA / fname).read_text())
            if desc:
                cfg["description"] = desc
            lt = ConfigurableTask(config=dict(cfg))
            lt.set_config("num_fewshot", k)
            lt.set_fewshot_seed(1234)
            lt.build_all_requests(limit=None, rank=0, world_size=1, apply_chat_template=True, chat_template=_chat)
            theirs = sorted(((i.doc_id, i.idx, i.arguments) for i in lt.instances), key=lambda x: x[:2])
            p = tmp_path / fname
            p.write_text(yaml.safe_dump(cfg))
            mine_t = load_task(p)[0]
            mine = [(d.doc_id, r.idx, r.args) for d in mine_t.requests("test", num_fewshot=k, chat=_chat) for r in d.requests]
            assert mine == theirs, fname
            assert mine[0][2][0].startswith("<|system|>" if desc else "<|user|>")
    finally:
        logging.disable(logging.NOTSET)


def test_repeats_get_a_seed_each():
    code = load_task(DATA / "code.yaml")[0]
    drs = code.requests("test")
    assert len(drs[0].requests) == 5
    assert [r.args[1]["seed"] for r in drs[0].requests] == [0, 1, 2, 3, 4]
    assert [r.idx for r in drs[0].requests] == [0, 1, 2, 3, 4]


def test_target_forms(tmp_path):
    # target as the text of a choice, as a template rendering a digit, as a literal list
    docs = [{"q": "x", "choices": ["no", "yes"], "label": "yes"}]
    assert load_task(_mc_yaml(tmp_path, docs))[0].requests("test")[0].target == 1
    docs = [{"q": "x", "choices": ["no", "yes"], "label": 1}]
    assert load_task(_mc_yaml(tmp_path, docs, target='"{{label}}"'))[0].requests("test")[0].target == 1
    docs = [{"q": "x", "label": 0}]
    t = load_task(_mc_yaml(tmp_path, docs, choice='["red", "blue"]'))[0]
    assert t.requests("test")[0].choices == ["red", "blue"]


def test_generator_docs_through_builtin(monkeypatch, tmp_path):
    calls = []

    def generate(name, split, n=None, data_dir=None, **kw):
        calls.append((name, split, data_dir, kw))
        base = {"train": 0, "dev": 100, "private": 200}[split]
        return [{"a": base + i, "b": 1, "answer": str(base + i + 1)} for i in range(4)]

    import lmforge.evaluate.builtin as builtin  # patched on the module itself: task.py reaches it as an attribute

    monkeypatch.setattr(builtin, "generate", generate)
    p = _write(tmp_path, "g.yaml", 'task: add\ngenerator: addition\ngenerator_kwargs: {digits: 3}\n'
                                   'doc_to_text: "{{a}}+{{b}}="\ndoc_to_target: "{{answer}}"\nnum_fewshot: 1\n')
    t = load_task(p)[0]
    assert (t.test_split, t.validation_split, t.fewshot_split) == ("private", "dev", "train")
    drs = t.requests(t.split_for("test"), data_dir="DD")
    assert drs[0].prompt.endswith("200+1=") and drs[0].target == "201"
    assert ("addition", "private", "DD", {"digits": 3}) in calls and ("addition", "train", "DD", {"digits": 3}) in calls


def test_load_tasks_by_name_include_path_and_path(tmp_path):
    ts = load_tasks(["local_mc", str(DATA / "rolling.yaml")], include_path=DATA)
    assert [t.name for t in ts] == ["local_mc", "local_rolling"]
    with pytest.raises(TaskError, match="unknown task 'local_mcc'.*did you mean 'local_mc'"):
        load_tasks(["local_mcc"], include_path=DATA)


def test_data_files_relative_to_the_yaml_else_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    _write(tmp_path / "data", "d.jsonl", json.dumps({"q": "a", "choices": ["x", "y"], "label": 1}) + "\n")
    (tmp_path / "tasks").mkdir()
    p = _write(tmp_path / "tasks", "t.yaml", "task: t\ndocs: {test: data/d.jsonl}\noutput_type: multiple_choice\n"
                                            "doc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: label\n")
    with pytest.raises(TaskError, match="data file not found"):
        load_task(p)[0].docs("test")
    monkeypatch.chdir(tmp_path)  # lm-eval's way: relative to where it runs
    assert load_task(p)[0].docs("test")[0]["label"] == 1


def test_include_merges(tmp_path):
    _write(tmp_path, "d.jsonl", json.dumps({"q": "a", "choices": ["x", "y"], "label": 0}) + "\n")
    _write(tmp_path, "_base_yaml", "dataset_path: json\ndataset_kwargs: {data_files: {test: d.jsonl}}\n"
                                   "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
                                   "doc_to_choice: choices\ndoc_to_target: label\n")
    p = _write(tmp_path, "t.yaml", "include: _base_yaml\ntask: child\ntarget_delimiter: ':'\n")
    t = load_task(p)[0]
    assert t.name == "child" and t.requests("test")[0].requests[0].args == ("a", ":x")


# ---------------------------------------------------------------- bad input

def test_missing_required_fields(tmp_path):
    p = _write(tmp_path, "t.yaml", "output_type: multiple_choice\n")
    with pytest.raises(TaskError, match=r"t\.yaml: missing required field 'task'"):
        load_task(p)
    p = _write(tmp_path, "t.yaml", "task: a\ndocs: {test: d.jsonl}\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_target: l\n")
    with pytest.raises(TaskError, match=r"t\.yaml: task 'a': missing required field 'doc_to_choice'"):
        load_task(p)
    p = _write(tmp_path, "t.yaml", "task: a\noutput_type: generate_until\ndoc_to_text: q\ndoc_to_target: l\n")
    with pytest.raises(TaskError, match="no documents"):
        load_task(p)


def test_unknown_field_in_template_names_file_line_and_field(tmp_path):
    docs = [{"q": "x", "choices": ["a", "b"], "label": 0}, {"qq": "y", "choices": ["a", "b"], "label": 0}]
    _write(tmp_path, "d.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    p = _write(tmp_path, "t.yaml", "task: t\ndocs: {test: d.jsonl}\noutput_type: multiple_choice\n"
                                   "doc_to_text: 'Question: {{question}}'\ndoc_to_choice: choices\ndoc_to_target: label\n")
    t = load_task(p)[0]
    with pytest.raises(TaskError, match=r"d\.jsonl:1: task 't': doc_to_text: .*'question' is undefined.*fields: choices, label, q"):
        t.requests("test")


def test_bare_name_that_is_no_field(tmp_path):
    t = load_task(_mc_yaml(tmp_path, [{"q": "x", "choices": ["a", "b"], "label": 0}], target="lable"))[0]
    with pytest.raises(TaskError, match=r"d\.jsonl:1: .*doc_to_target: 'lable' is not a field .*did you mean 'label'"):
        t.docs("test")


def test_choice_list_of_one_and_target_outside(tmp_path):
    t = load_task(_mc_yaml(tmp_path, [{"q": "x", "choices": ["a", "b"], "label": 0},
                                      {"q": "x", "choices": ["only"], "label": 0}]))[0]
    with pytest.raises(TaskError, match=r"d\.jsonl:2: .*doc_to_choice: a choice list of 1"):
        t.docs("test")
    t = load_task(_mc_yaml(tmp_path, [{"q": "x", "choices": ["a", "b"], "label": 2}]))[0]
    with pytest.raises(TaskError, match=r"d\.jsonl:1: .*target index 2 is outside the 2 choices"):
        t.docs("test")
    t = load_task(_mc_yaml(tmp_path, [{"q": "x", "choices": ["a", "b"], "label": "c"}]))[0]
    with pytest.raises(TaskError, match=r"d\.jsonl:1: .*target 'c' is not among the choices"):
        t.docs("test")


def test_malformed_jsonl_line_error_or_counted_skip(tmp_path):
    good = json.dumps({"q": "x", "choices": ["a", "b"], "label": 0})
    p = _mc_yaml(tmp_path, [])
    _write(tmp_path, "d.jsonl", f"{good}\n{{not json\n{good}\n")  # line 2 is not JSON
    with pytest.raises(TaskError, match=r"d\.jsonl:2: malformed JSON line"):
        load_task(p)[0].docs("test")
    t = load_task(p, skip_bad=True)[0]
    assert len(t.docs("test")) == 2 and t.skipped["test"] == 1
    # a JSONL task file: the error names the task file and its line
    q = _write(tmp_path, "task.jsonl", '{"task": "j", "output_type": "multiple_choice", "doc_to_text": "q", '
                                       '"doc_to_choice": "choices", "doc_to_target": "label"}\n' + f"{good}\n[1, 2\n")
    with pytest.raises(TaskError, match=r"task\.jsonl:3: malformed JSON line"):
        load_task(q)
    t = load_task(q, skip_bad=True)[0]
    assert len(t.docs("test")) == 1 and t.skipped["test"] == 1


def test_bad_documents_skipped_when_asked(tmp_path):
    p = _mc_yaml(tmp_path, [{"q": "x", "choices": ["a", "b"], "label": 0}, {"q": "x", "choices": ["a"], "label": 0},
                            {"q": "x", "choices": ["a", "b"], "label": 9}])
    t = load_task(p, skip_bad=True)[0]
    assert len(t.docs("test")) == 1 and t.skipped["test"] == 2


def test_unknown_output_type_metric_and_key_suggest(tmp_path):
    base = "task: a\ndocs: {test: d.jsonl}\ndoc_to_text: q\ndoc_to_target: l\n"
    with pytest.raises(TaskError, match=r"t\.yaml: task 'a': field 'output_type': unknown 'multiple_choise' \(did you mean 'multiple_choice'\?\)"):
        load_task(_write(tmp_path, "t.yaml", base + "output_type: multiple_choise\n"))
    with pytest.raises(ValueError, match=r"metric_list\[0\]\.metric: unknown metric 'exact_mach' \(did you mean 'exact_match'\?\)"):
        load_task(_write(tmp_path, "t.yaml", base + "metric_list: [{metric: exact_mach}]\n"))
    with pytest.raises(TaskError, match=r"unknown field 'doc_to_txt' \(did you mean 'doc_to_text'\?\)"):
        load_task(_write(tmp_path, "t.yaml", base + "doc_to_txt: x\n"))
    with pytest.raises(TaskError, match="does not apply to output_type 'generate_until'"):
        load_task(_write(tmp_path, "t.yaml", base + "metric_list: [{metric: acc_norm}]\n"))
    with pytest.raises(TaskError, match="needs a 'code' field"):
        load_task(_write(tmp_path, "t.yaml", base + "metric_list: [{metric: pass@1}]\n"))
    with pytest.raises(TaskError, match="exact_match has no option"):
        load_task(_write(tmp_path, "t.yaml", base + "metric_list: [{metric: exact_match, ignore_kase: true}]\n"))
    with pytest.raises(TaskError, match="Python functions in task files are not supported"):
        load_task(_write(tmp_path, "t.yaml", base + "process_docs: !function utils.process\n"))
    with pytest.raises(TaskError, match="group files"):
        load_task(_write(tmp_path, "t.yaml", "group: g\ntask: [a, b]\n"))
    with pytest.raises(TaskError, match=r"t\.yaml:2: not valid YAML"):
        load_task(_write(tmp_path, "t.yaml", "task: a\n  bad: [\n"))
    with pytest.raises(TaskError, match="lmforge reads local files only"):
        load_task(_write(tmp_path, "t.yaml", "task: a\ndataset_path: hellaswag\ndoc_to_text: q\ndoc_to_target: l\n"))
    with pytest.raises(TaskError, match="bad template"):
        load_task(_write(tmp_path, "t.yaml", base.replace("doc_to_text: q", "doc_to_text: '{{q'") ))


def test_bad_template_list_literal_and_missing_file(tmp_path):
    t = load_task(_mc_yaml(tmp_path, [{"q": "x", "c": "a b", "label": 0}], choice='"{{c}}"'))[0]
    with pytest.raises(TaskError, match="not a list literal"):
        t.docs("test")
    p = _write(tmp_path, "t.yaml", "task: a\ndocs: {test: missing.jsonl}\ndoc_to_text: q\ndoc_to_target: l\n")
    with pytest.raises(TaskError, match=r"missing\.jsonl: data file not found"):
        load_task(p)[0].docs("test")
    with pytest.raises(TaskError, match="task file not found"):
        load_task(tmp_path / "nope.yaml")
