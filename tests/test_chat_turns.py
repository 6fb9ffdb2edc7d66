"""One chat format: a streaming session, a /v1/chat request and a training sample write the same turns, as the
checkpoint's chat template renders them (Processor.chat_spans / Processor.turns), whatever that template is."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from infinitevl.defaults import default_model_folder
from infinitevl.engine.session import StreamSession
from infinitevl.model import InfiniteVLForConditionalGeneration as Model
from infinitevl.processing.processor import Processor
from infinitevl.serving.prompts import TextBudget, chat_prompt
from infinitevl.serving.schemas import ChatCompletionRequest
from infinitevl.training.data import IGNORE, DataOptions, chat_sample

# A template that is not ChatML: roles in brackets, no newlines, no default system prompt
OTHER_TEMPLATE = (
    "{% for m in messages %}<|im_start|>[{{ m['role'] }}] "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in c %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>[assistant] {% endif %}"
)
SYSTEM, QUESTION, ANSWER, FOLLOW_UP = "Watch closely.", "Which digit <|im_end|> was shown?", "Seven.", "And before?"


@pytest.fixture(scope="module")
def model():
    return Model.from_pretrained(default_model_folder())


@pytest.fixture(params=["shipped", "other"])
def processor(request):
    processor = Processor.from_pretrained(default_model_folder())
    if request.param == "other":
        processor.tokenizer.chat_template = OTHER_TEMPLATE
    return processor


def session_feed(model, processor, monkeypatch) -> list[int]:
    """The ids a new session feeds for SYSTEM then QUESTION (up to its answer)."""
    fed: list[int] = []
    monkeypatch.setattr(StreamSession, "_feed_ids", lambda self, ids: fed.extend(ids))
    monkeypatch.setattr(StreamSession, "_refresh", lambda self: None)
    session = StreamSession(model, processor, system_prompt=SYSTEM)
    return fed + session.question_ids(QUESTION)


def chat_request_ids(processor) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    request = ChatCompletionRequest.model_validate({"model": "infinitevl", "messages": messages})
    prompt = chat_prompt(SimpleNamespace(processor=processor), None, TextBudget(100_000, 1), request)
    return prompt.input_ids[0].tolist()


def test_a_session_question_renders_as_a_chat_request(model, processor, monkeypatch):
    assert session_feed(model, processor, monkeypatch) == chat_request_ids(processor)


def test_a_training_sample_renders_as_a_chat_request_and_a_session(model, processor, monkeypatch, tmp_path):
    record = {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ANSWER},
            {"role": "user", "content": FOLLOW_UP},
            {"role": "assistant", "content": ANSWER},
        ]
    }
    sample = chat_sample(json.loads(json.dumps(record)), processor, DataOptions(), tmp_path)
    ids, labels = sample.input_ids, sample.labels
    asked = chat_request_ids(processor)
    assert ids[: len(asked)] == asked == session_feed(model, processor, monkeypatch)
    # then the answer, the end of its turn and the next question, as a session commits them
    answer = processor.tokenize_text(ANSWER)
    turns = processor.turns
    follow = answer + turns.answer_end + processor.tokenize_text(FOLLOW_UP) + turns.question_end
    assert ids[len(asked) : len(asked) + len(follow)] == follow
    # the whole sample is the template's rendering; labels: the answers and their end-of-turn token only
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    assert ids == processor.chat_ids(messages, add_generation_prompt=False)
    learned = [t for t, label in zip(ids, labels) if label != IGNORE]
    eos = processor.tokenizer.eos_token_id
    assert learned == (answer + [eos]) * 2


def test_the_other_template_is_really_followed(processor):
    """The two templates differ where it matters: the session's opening and turn ends are not ChatML's here."""
    turns = processor.turns
    chatml = processor.tokenize("<|im_end|>\n<|im_start|>assistant\n")
    is_other = processor.tokenizer.chat_template == OTHER_TEMPLATE
    assert (turns.question_end != chatml) == is_other
    if is_other:
        assert turns.question_end == processor.tokenize("<|im_end|><|im_start|>[assistant] ")
        assert turns.opening(processor, None) == processor.tokenize("<|im_start|>[user] ")
