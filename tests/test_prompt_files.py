import json

import pytest
from transformers import AutoTokenizer

from engine.prompt_files import chat_prompt_ids, read_prompt_records
from models import DEFAULT_MODEL_DIR

USER_HI = [{"role": "user", "content": "hi"}]


def test_jsonl_and_json_records(tmp_path):
    records = [{"prompt": "x = "}, {"text": "def g():"}, {"messages": USER_HI}, "bare"]
    lines = tmp_path / "p.jsonl"
    lines.write_text("\n\n".join(json.dumps(r) for r in records) + "\n")  # blank lines are skipped
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(records))
    expected = ["x = ", "def g():", USER_HI, "bare"]
    assert read_prompt_records(lines) == read_prompt_records(listed) == expected


def test_sharegpt_conversations_keep_the_turns_before_the_first_answer(tmp_path):
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                      {"from": "human", "value": "more"}]},
        {"id": "b", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "why?"}]},
    ]))
    assert read_prompt_records(sharegpt) == [USER_HI, [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "why?"}]]


def test_records_as_real_files_hold_them(tmp_path):
    """A fine-tuning set's messages end at the first answer (the model is to write it); content parts join by lines;
    ShareGPT dumps that say role/content; a byte-order mark; an upper-case suffix; JSON that is not, named."""
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    answered = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts},
                             {"role": "assistant", "content": "ab"}, {"role": "user", "content": "more"}]}
    sharegpt = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "P.JSONL"
    path.write_text("\ufeff" + json.dumps(answered) + "\n" + json.dumps(sharegpt) + "\n", encoding="utf-8")
    assert read_prompt_records(path) == [[{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "a\nb"}], USER_HI]
    (tmp_path / "bad.json").write_text("")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        read_prompt_records(tmp_path / "bad.json")


def test_sharegpt_conversations_with_no_question_are_skipped_and_counted(tmp_path):
    sharegpt = tmp_path / "sharegpt.json"  # as its dumps hold some: the model first, empty, a blank question
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "unasked"}]}, {"conversations": []},
                                    {"conversations": [{"from": "human", "value": " "}]},
                                    {"conversations": [{"from": "human", "value": "hi"}]}]))
    with pytest.warns(UserWarning, match="skipped 3 ShareGPT conversations"):
        assert read_prompt_records(sharegpt) == [USER_HI]


@pytest.mark.parametrize("record", [{"prompt": " "}, {"completion": "x"}, [1, 2], 3, {"messages": "hi"}])
def test_a_record_without_a_prompt_is_named(tmp_path, record):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="record 2 holds no prompt"):
        read_prompt_records(path)


def test_a_json_file_must_hold_a_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(ValueError, match="a JSON list of records"):
        read_prompt_records(path)


def test_chat_prompt_ids_hold_the_templates_bos_once():
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)  # it adds BOS to text, and its template writes one
    bos = tokenizer.bos_token_id
    ids = chat_prompt_ids(tokenizer, "hi")
    assert ids == chat_prompt_ids(tokenizer, USER_HI) and ids.count(bos) == 1 and ids[0] == bos
    assert tokenizer.decode(ids[1:]) == "### user\nhi\n### assistant\n"
    # OpenAI's content parts and developer role, as the server (and vLLM's LLM.chat) take them: not a list's repr
    parts = [{"role": "developer", "content": "be brief"},
             {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]
    want = "### system\nbe brief\n### user\nhi\nthere\n### assistant\n"
    assert tokenizer.decode(chat_prompt_ids(tokenizer, parts)[1:]) == want
    with pytest.raises(ValueError, match="content parts of type 'image_url' are not supported"):
        chat_prompt_ids(tokenizer, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    tokenizer.chat_template = None
    assert chat_prompt_ids(tokenizer, "def f():") == tokenizer("def f():")["input_ids"]  # the text as it is
    with pytest.raises(ValueError, match="need a chat template"):
        chat_prompt_ids(tokenizer, USER_HI)
