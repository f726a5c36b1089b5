"""Self-distillation data stages: growth in place and resumption (no engine:
the target's answers and prompts come from deterministic stand-ins)."""

from __future__ import annotations

import json

import pytest

from flexdraft_vllm.training import data

from project_paths import PACKAGE


def fake_synth(llm, first, n, seed):
    # candidate j depends only on (seed, j), like the real one; every 5th is a duplicate
    return [(j, f"prompt {seed}-{j % 5 if j % 5 == 0 else j}") for j in range(first, first + n)]


def answer(part):
    return [None if "-3" in p else {"prompt_ids": [len(p)], "response_ids": [1, 2, 3, 4], "p": p} for p in part]


def test_prompts_grow_to_what_one_run_would_make(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "synthesize_prompts", fake_synth)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    whole = data._extend_prompts(one, 40, None, 7, lambda: None)
    data._extend_prompts(two, 15, None, 7, lambda: None)
    grown = data._extend_prompts(two, 40, None, 7, lambda: None)
    assert grown == whole and len(whole) == 40 and len(set(whole)) == 40
    assert data._extend_prompts(two, 10, None, 7, lambda: None) == whole  # never shrinks


def test_extra_prompts_follow_the_base_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "synthesize_prompts", fake_synth)
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"prompt": f"def f{i}(): ..."}) + "\n" for i in range(6)))
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    whole = data._extend_prompts(one, 20, None, 7, lambda: None, str(extra), 4)
    base = data._extend_prompts(two, 20, None, 7, lambda: None)
    grown = data._extend_prompts(two, 20, None, 7, lambda: None, str(extra), 4)
    assert grown == whole == base + [f"def f{i}(): ..." for i in range(4)]  # made at once = grown in steps
    assert data._extend_prompts(two, 20, None, 7, lambda: None, str(extra), 6)[-2:] == ["def f4(): ...", "def f5(): ..."]
    # An earlier round's config (fewer or no extras) rerun on the grown work_dir
    # would train on prompts it does not name: refused, with the way out.
    for jsonl, limit in ((None, 0), (str(extra), 4)):
        with pytest.raises(ValueError, match="holds 6 extra prompts that this config does not name.*fresh work_dir"):
            data._extend_prompts(two, 20, None, 7, lambda: None, jsonl, limit)
    assert data._extend_prompts(two, 20, None, 7, lambda: None, str(extra), 0) == whole + ["def f4(): ...", "def f5(): ..."]
    with pytest.raises(ValueError, match="would grow the base prompts"):  # answers follow the file's order
        data._extend_prompts(two, 30, None, 7, lambda: None)


def test_extra_prompts_from_several_files_keep_an_earlier_rounds_prefix(tmp_path, monkeypatch):
    """A later round appends a second file of extras (round 6: stdlib code, then
    everyday chat): the earlier round's extras stay a prefix, so the work_dir
    grows in place; one count per file, duplicates across files dropped."""
    monkeypatch.setattr(data, "synthesize_prompts", fake_synth)
    code, chat = tmp_path / "code.jsonl", tmp_path / "chat.jsonl"
    code.write_text("".join(json.dumps({"prompt": f"def f{i}(): ..."}) + "\n" for i in range(6)))
    chat.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def f1(): ...", "Hi?", "Why?", "How?"]))
    assert data.extra_prompt_list([str(code), str(chat)], [3, 0]) == ["def f0(): ...", "def f1(): ...",
                                                                      "def f2(): ...", "Hi?", "Why?", "How?"]
    assert data.extra_prompt_list([str(code), str(chat)], [2, 2]) == ["def f0(): ...", "def f1(): ...", "Hi?"]
    with pytest.raises(ValueError, match=r"one count per extra_prompts_jsonl file"):
        data.extra_prompt_list([str(code), str(chat)], [3])
    work = tmp_path / "work.jsonl"
    earlier = data._extend_prompts(work, 10, None, 7, lambda: None, str(code), 3)
    later = data._extend_prompts(work, 10, None, 7, lambda: None, [str(code), str(chat)], [3, 2])
    assert later == earlier + ["Hi?"]  # the chat file's first 2: "def f1(): ..." (already named) and "Hi?"
    with pytest.raises(ValueError, match="holds 4 extra prompts that this config does not name"):
        data._extend_prompts(work, 10, None, 7, lambda: None, [str(chat), str(code)], [2, 3])  # another order
    # round 7: the last file's count raised grows the work_dir in place ...
    assert data._extend_prompts(work, 10, None, 7, lambda: None, [str(code), str(chat)], [3, 4]) == later + ["Why?",
                                                                                                          "How?"]
    # ... an earlier file's would put its new prompts before ones already answered: refused
    with pytest.raises(ValueError, match="does not name"):
        data._extend_prompts(work, 10, None, 7, lambda: None, [str(code), str(chat)], [4, 4])


def test_everyday_prompts_are_clean_requests_apart_from_the_held_out_chat_set():
    from flexdraft_vllm.prompts import chat_prompts
    from flexdraft_vllm.training.everyday_prompts import TEMPLATES, _norm, everyday_prompts

    got = everyday_prompts()
    assert got == everyday_prompts() and len(got) == len(set(got)) > 2000  # deterministic, distinct
    assert not {_norm(p) for p in got} & {_norm(p) for p in chat_prompts()}
    assert all(p[0].isupper() and p[-1] in ".?" and "{" not in p for p in got)
    stems = [t.split("{")[0] for t, _ in TEMPLATES]
    assert {s for s in stems if any(p.startswith(s) for p in got[:300])} == set(stems)  # the head is a mix
    bundled = [json.loads(line)["prompt"] for line in (PACKAGE / "data" / "everyday_prompts.jsonl").read_text().splitlines()]
    assert bundled == got  # the committed file is what the module makes


def test_stdlib_prompts_are_documented_public_functions():
    from flexdraft_vllm.training.stdlib_prompts import INSTRUCTION, function_prompts

    src = '''
def add(a, b=1) -> int:
    """Return the sum of a and b, where b defaults to one unless given."""
    return a + b

def _private(x):
    """A private helper that should never become a prompt at all."""

def short(x):
    """Too short."""

class Box:
    def get(self, key):
        """Return the value stored under key, or raise KeyError if absent."""
'''
    got = dict(function_prompts(src))
    assert sorted(got) == ["Box.get", "add"]
    assert got["add"] == INSTRUCTION + 'def add(a, b=1) -> int:\n    """Return the sum of a and b, where b defaults to one unless given.\n    """\n'
    assert function_prompts("def broken(:\n") == []


def test_answers_resume_after_the_last_finished_chunk(tmp_path):
    seq = tmp_path / "sequences.jsonl"
    prompts = [f"q{i}" for i in range(10)]
    calls = []

    def counting(part):
        calls.append(list(part))
        return answer(part)

    rows = data.answer_prompts(prompts[:6], seq, counting, chunk=4)
    assert [len(c) for c in calls] == [4, 2] and len(rows) == 6
    # a crash inside the next chunk left a half-written line behind
    with open(seq, "a") as f:
        f.write('{"prompt_ids": [9], "respo')
    calls.clear()
    rows = data.answer_prompts(prompts, seq, counting, chunk=4)
    assert calls == [prompts[6:10]]  # only the new prompts were answered
    assert [r["p"] for r in rows] == prompts
    assert [json.loads(l)["p"] for l in seq.read_text().splitlines()] == prompts
    assert json.loads(seq.with_suffix(".progress").read_text()) == {"prompts": 10, "rows": 10}


def test_short_answers_are_dropped_but_counted_as_answered(tmp_path):
    seq = tmp_path / "sequences.jsonl"
    prompts = ["a", "b-3", "c"]
    rows = data.answer_prompts(prompts, seq, answer, chunk=2)
    assert [r["p"] for r in rows] == ["a", "c"]
    assert json.loads(seq.with_suffix(".progress").read_text()) == {"prompts": 3, "rows": 2}
    assert data.answer_prompts(prompts, seq, lambda part: pytest.fail("nothing left to answer")) == rows


@pytest.mark.parametrize("old_rows, removed", [(70, True), (64, False)])
def test_growing_removes_the_partial_kv_shard(tmp_path, old_rows, removed):
    shards = tmp_path / "kv_s20"
    shards.mkdir()
    for start in (0, 32, 64):
        (shards / f"shard_{start:06d}.pt").write_text("x")
    data.drop_stale_kv_shard(tmp_path, old_rows, shard_size=32)
    assert (shards / "shard_000064.pt").exists() != removed
    assert (shards / "shard_000032.pt").exists() and (shards / "shard_000000.pt").exists()


def test_a_finished_run_in_the_old_format_is_taken_as_complete(tmp_path, monkeypatch):
    """Work dirs from before chunked answering have no .progress: every prompt
    in prompts.jsonl was answered; growing answers only the new ones."""
    monkeypatch.setattr(data, "synthesize_prompts", fake_synth)
    old = [f"old {i}" for i in range(3)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in old))
    (tmp_path / "sequences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answer(old)))
    answered = []
    monkeypatch.setattr(data, "_llm", lambda *a, **k: object())

    class FakeLLM:
        def chat(self, chats, sp, use_tqdm=False):
            answered.extend(c[0]["content"] for c in chats)
            out = lambda: type("O", (), {"token_ids": [1, 2, 3, 4]})  # noqa: E731
            return [type("R", (), {"prompt_token_ids": [0], "outputs": [out()]}) for _ in chats]

    monkeypatch.setattr(data, "_llm", lambda *a, **k: FakeLLM())
    data.build_dataset("unused", tmp_path, num_prompts=5, seed=1)
    assert len(answered) == 2 and not set(answered) & set(old)
    assert len((tmp_path / "sequences.jsonl").read_text().splitlines()) == 5
