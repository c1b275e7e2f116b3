"""Post-training preprocessing: chat templates with assistant-only labels, prompt/completion
masks, preference pairs and KTO rewards, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.preprocess.post_training import chat_main, mask_main
from megatron.tokenizer.tokenizer import build_tokenizer

# A ChatML-style template, as found in tokenizer_config.json files.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CHATS = [
    {"messages": [{"role": "user", "content": "What is a list?"},
                  {"role": "assistant", "content": "A mutable sequence."},
                  {"role": "user", "content": "And a tuple?"},
                  {"role": "assistant", "content": "An immutable one."}], "label": True},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Define pass."},
                  {"role": "assistant", "content": "A statement that does nothing."}],
     "label": False},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, bpe_files) -> Path:
    d = Path(bpe_files["tokenizer_json"]).parent
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|endoftext|>"}))
    return d


def _write(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_chat_template_labels_only_assistant_turns(tmp_path, tok_dir):
    src = _write(tmp_path / "chat.jsonl", CHATS)
    prefix = str(tmp_path / "out" / "sft")
    rc = chat_main(["--input", src, "--output-prefix", prefix, "--tokenizer-path", str(tok_dir),
                    "--append-eod", "--reward-key", "label"])
    assert rc == 0
    tokens = MMapIndexedDataset(f"{prefix}_messages_document")
    labels = MMapIndexedDataset(f"{prefix}_messages_label_document")
    rewards = MMapIndexedDataset(f"{prefix}_messages_reward_document")
    assert len(tokens) == len(labels) == 2
    assert [int(rewards[i][0]) for i in range(2)] == [1, -1]
    tok = build_tokenizer("HFTokenizer", str(tok_dir / "tokenizer.json"))
    for i, chat in enumerate(CHATS):
        t, lab = tokens[i].astype(np.int64), labels[i].astype(np.int64)
        assert len(t) == len(lab)
        trained = lab != -100
        assert np.array_equal(lab[trained], t[trained])
        trained_text = tok.detokenize(t[trained].tolist())
        untrained_text = tok.detokenize(t[~trained].tolist())
        for m in chat["messages"]:
            if m["role"] == "assistant":
                assert m["content"] in trained_text and m["content"] not in untrained_text
            else:
                assert m["content"] in untrained_text and m["content"] not in trained_text
        # the whole transcript is the template's rendering
        rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                           for m in chat["messages"])
        assert tok.detokenize(t[:-1].tolist()) == rendered

    # --only-last trains only the final assistant turn
    rc = chat_main(["--input", src, "--output-prefix", str(tmp_path / "last"),
                    "--tokenizer-path", str(tok_dir), "--only-last"])
    assert rc == 0
    t = MMapIndexedDataset(str(tmp_path / "last_messages_document"))[0].astype(np.int64)
    lab = MMapIndexedDataset(str(tmp_path / "last_messages_label_document"))[0]
    text = tok.detokenize(t[lab != -100].tolist())
    assert "An immutable one." in text and "A mutable sequence." not in text


def test_template_file_and_preference_pairs(tmp_path, tok_dir):
    template = tmp_path / "t.jinja"
    template.write_text(CHATML)
    pairs = [{"chosen": c["messages"], "rejected": c["messages"][:-1] + [
        {"role": "assistant", "content": "No idea."}]} for c in CHATS]
    src = _write(tmp_path / "pairs.jsonl", pairs)
    rc = chat_main(["--input", src, "--output-prefix", str(tmp_path / "dpo"),
                    "--vocab-file", str(tok_dir / "tokenizer.json"), "--chat-template",
                    str(template), "--jsonl-keys", "chosen", "rejected"])
    assert rc == 0
    chosen = MMapIndexedDataset(str(tmp_path / "dpo_chosen_document"))
    rejected = MMapIndexedDataset(str(tmp_path / "dpo_rejected_document"))
    assert len(chosen) == len(rejected) == 2
    assert not np.array_equal(chosen[0], rejected[0])


def test_prompt_completion_masks(tmp_path, tok_dir):
    records = [{"prompt": "Question: what is 2+2?\nAnswer:", "chosen": " four",
                "rejected": " five"}]
    src = _write(tmp_path / "pc.jsonl", records)
    rc = mask_main(["--input", src, "--output-prefix", str(tmp_path / "pc"), "--vocab-file",
                    str(tok_dir / "tokenizer.json"), "--completion-keys", "chosen", "rejected",
                    "--append-eod"])
    assert rc == 0
    tok = build_tokenizer("HFTokenizer", str(tok_dir / "tokenizer.json"))
    n_prompt = len(tok.tokenize(records[0]["prompt"]))
    for key in ("chosen", "rejected"):
        t = MMapIndexedDataset(str(tmp_path / f"pc_{key}_document"))[0].astype(np.int64)
        lab = MMapIndexedDataset(str(tmp_path / f"pc_{key}_label_document"))[0]
        assert (lab[:n_prompt] == -100).all()
        assert np.array_equal(lab[n_prompt:], t[n_prompt:])
        assert tok.detokenize(t[n_prompt:-1].tolist()) == records[0][key]


def test_for_rm_labels_only_the_end_of_document(tmp_path, tok_dir):
    src = _write(tmp_path / "chat.jsonl", CHATS)
    rc = chat_main(["--input", src, "--output-prefix", str(tmp_path / "rm"), "--tokenizer-path",
                    str(tok_dir), "--for-rm"])
    assert rc == 0
    tok = build_tokenizer("HFTokenizer", str(tok_dir / "tokenizer.json"))
    texts = MMapIndexedDataset(str(tmp_path / "rm_messages_document"))
    labels = MMapIndexedDataset(str(tmp_path / "rm_messages_label_document"))
    for i in range(len(CHATS)):
        t, lab = texts[i].astype(np.int64), labels[i].astype(np.int64)
        assert t[-1] == tok.eod and lab[-1] == tok.eod  # appended without --append-eod
        assert (lab[:-1] == -100).all() and len(lab) == len(t)


def test_bad_input_one_line(tmp_path, tok_dir, capsys):
    src = _write(tmp_path / "bad.jsonl", [CHATS[0], {"messages": "not a list"}])
    rc = chat_main(["--input", src, "--output-prefix", str(tmp_path / "bad"),
                    "--tokenizer-path", str(tok_dir)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "bad.jsonl:2" in err and "messages" in err
    assert not (tmp_path / "bad_messages_document.idx").exists()  # nothing half-written
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    rc = chat_main(["--input", src, "--output-prefix", str(tmp_path / "b2"), "--vocab-file",
                    str(tok_dir / "tokenizer.json"), "--chat-template", str(broken)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "broken.jinja" in err and len(err.splitlines()) == 1
