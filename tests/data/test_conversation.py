"""Conversations -> tokens: ids and loss masks equal transformers' apply_chat_template."""
from __future__ import annotations

import numpy as np
import pytest

from mllm_tune.data.conversation import (CHATML, VICUNA_SYSTEM, ChatTokenizer, overlap_mask,
                                         to_messages)
from mllm_tune.data.errors import DataError
from tests.helpers.data import (CHATML_GEN, LLAMA2, LLAMA2_GEN, VICUNA_GEN,
                                chatml_tokenizer, hf_reference, llama_tokenizer, turns)

IMAGE_ID, PER_IMAGE = 3, 5  # `<image>` is token 3 of both test tokenizers

CONVERSATIONS = {
    "one_image_multi_turn": (turns("<image>\nWhat is in the image?", "A cat sitting on a red mat.",
                                   "What color is the mat?", "  It is red. "), 1),
    "two_images_system": (turns("Compare <image> and <image>.", "The first shows a beach.",
                                system="Be brief."), 2),
    "text_only": (turns("Tell me a joke about numbers.", "Why 7 8 9? Because 7 ate 9!",
                        "Another one", "Sure, here you go: 0123."), 0),
    "image_in_later_turn": (turns("Hello!", "Hello, how are you today?",
                                  "Describe <image> in detail.", "Two dogs playing in the park."),
                            1),
}

# (tokenizer factory, template passed to ChatTokenizer, reference template with generation tags)
TEMPLATES = {
    "chatml_builtin": (chatml_tokenizer, "chatml", CHATML_GEN),
    "vicuna_v1_builtin": (llama_tokenizer, "vicuna_v1", VICUNA_GEN),
    "tokenizer_own_template": (lambda: llama_tokenizer(LLAMA2), None, LLAMA2_GEN),
    "tokenizer_own_generation_tags": (lambda: chatml_tokenizer(CHATML_GEN), None, CHATML_GEN),
}


@pytest.fixture(scope="module")
def tokenizers():
  return {name: make() for name, (make, _, _) in TEMPLATES.items()}


@pytest.mark.parametrize("conv_name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
def test_ids_and_loss_mask_equal_transformers(tokenizers, template_name, conv_name):
  _, template, gen_template = TEMPLATES[template_name]
  tok = tokenizers[template_name]
  conv, n_images = CONVERSATIONS[conv_name]
  ours = ChatTokenizer(tok, IMAGE_ID, PER_IMAGE, template).encode(conv, n_images)
  ref_ids, ref_mask = hf_reference(tok, gen_template, conv, PER_IMAGE)
  np.testing.assert_array_equal(ours.input_ids, ref_ids)
  np.testing.assert_array_equal(ours.loss_mask, ref_mask)
  np.testing.assert_array_equal(ours.positions, np.arange(len(ref_ids)))
  # the targets are exactly the assistant replies, each closed by its end-of-turn token
  eos = tok.eos_token
  replies = [m["content"] for m in to_messages(conv) if m["role"] == "assistant"]
  target_text = tok.decode(ours.input_ids[ours.loss_mask == 1])
  assert target_text.count(eos) == len(replies)
  for reply in replies:
    assert reply.strip() in target_text
  # image slots: runs of PER_IMAGE image tokens starting at image_starts, none of them targets
  assert len(ours.image_starts) == n_images
  for s in ours.image_starts:
    assert np.all(ours.input_ids[s:s + PER_IMAGE] == IMAGE_ID)
  assert np.sum(ours.input_ids == IMAGE_ID) == n_images * PER_IMAGE
  assert not np.any(ours.loss_mask[ours.input_ids == IMAGE_ID])


def test_builtin_vicuna_v1_renders_like_llava_conv_vicuna_v1():
  """LLaVA's `Conversation.get_prompt` for SeparatorStyle.TWO (sep ' ', sep2 '</s>')."""
  conv = turns("<image>\nWhat is in the image?", "A cat.", "And the mat?", "It is red.")
  seps, llava = [" ", "</s>"], VICUNA_SYSTEM + " "
  for i, m in enumerate(conv):
    llava += ("USER" if m["from"] == "human" else "ASSISTANT") + ": " + m["value"] + seps[i % 2]
  chat = ChatTokenizer(llama_tokenizer(), IMAGE_ID, PER_IMAGE, "vicuna_v1")
  assert chat.render(to_messages(conv)) == "<s>" + llava
  assert chat.render(to_messages(conv[:3]), add_generation_prompt=True).endswith(
      "USER: And the mat? ASSISTANT:")


def test_builtin_chatml_matches_qwen2_format():
  chat = ChatTokenizer(chatml_tokenizer(), IMAGE_ID, PER_IMAGE, "chatml")
  text = chat.render(to_messages(turns("<image>\nHi", "Hello!")))
  assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\n<image>\nHi<|im_end|>\n<|im_start|>assistant\n"
                  "Hello!<|im_end|>\n")
  assert chat.template == CHATML


def test_image_token_id_may_differ_from_the_placeholder_token():
  tok = chatml_tokenizer()
  conv = turns("<image>\nWhat is in the image?", "A cat.")
  out = ChatTokenizer(tok, 319, PER_IMAGE, "chatml").encode(conv, 1)
  ref_ids, ref_mask = hf_reference(tok, CHATML_GEN, conv, PER_IMAGE)
  np.testing.assert_array_equal(out.input_ids, np.where(ref_ids == IMAGE_ID, 319, ref_ids))
  np.testing.assert_array_equal(out.loss_mask, ref_mask)


def test_overlap_mask_marks_tokens_touching_a_span():
  offsets = [(0, 3), (3, 5), (5, 9), (9, 10), (10, 14)]
  np.testing.assert_array_equal(overlap_mask(offsets, [(4, 9), (13, 20)]), [0, 1, 1, 0, 1])


# ----------------------------------------------------------------------------- bad input
def test_empty_assistant_turn_is_reported_with_record_and_turn():
  chat = ChatTokenizer(chatml_tokenizer(), IMAGE_ID, PER_IMAGE, "chatml")
  with pytest.raises(DataError, match=r"data.json record 7 \(id=x\): conversations\[3\] \(gpt\) "
                                      r"is an empty assistant turn") as e:
    chat.encode(turns("Hi", "Hello", "More?", "   "), 0, "data.json record 7 (id=x)")
  assert e.value.reason == "empty_turn"


def test_image_count_mismatch_names_both_counts():
  chat = ChatTokenizer(chatml_tokenizer(), IMAGE_ID, PER_IMAGE, "chatml")
  with pytest.raises(DataError, match=r"rec 1: 2 <image> placeholder\(s\) in the conversation "
                                      r"but 1 image\(s\)") as e:
    chat.encode(turns("<image> <image> hi", "ok"), 1, "rec 1")
  assert e.value.reason == "image_count"
  with pytest.raises(DataError, match=r"0 <image> placeholder\(s\) .* but 1 image"):
    chat.encode(turns("hi", "ok"), 1, "rec 2")


def test_unknown_role_and_missing_assistant_are_reported():
  chat = ChatTokenizer(chatml_tokenizer(), IMAGE_ID, PER_IMAGE, "chatml")
  with pytest.raises(DataError, match=r"r: conversations\[1\].from = 'bot' is not one of"):
    chat.encode([{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}], 0, "r")
  with pytest.raises(DataError, match="no assistant turn"):
    chat.encode([{"from": "human", "value": "hi"}], 0, "r")


def test_missing_chat_template_lists_the_builtins():
  with pytest.raises(ValueError, match=r"no chat_template: pass template= one of \['chatml', "
                                       r"'qwen2', 'vicuna_v1'\]"):
    ChatTokenizer(chatml_tokenizer(), IMAGE_ID, PER_IMAGE)


def test_placeholder_is_added_when_the_tokenizer_lacks_it():
  tok = chatml_tokenizer()
  chat = ChatTokenizer(tok, IMAGE_ID, PER_IMAGE, "chatml", image_placeholder="<img>")
  assert chat.placeholder_id == len(tok) - 1
  out = chat.encode(turns("<img>\nWhat is it?", "A cat."), 1)
  assert np.sum(out.input_ids == IMAGE_ID) == PER_IMAGE


def test_a_template_that_rejects_the_conversation_is_a_data_error():
  strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
            "{% endif %}{{ m['content'] + eos_token }}{% endfor %}")
  chat = ChatTokenizer(chatml_tokenizer(), IMAGE_ID, PER_IMAGE, strict)
  with pytest.raises(DataError, match=r"rec 9: the chat template \(the Jinja template given as "
                                      r"data.template\) rejects the conversation "
                                      r"\(.*Conversation roles must alternate.*"
                                      r"--config.data.template=vicuna_v1") as e:
    chat.encode(turns("hi", "hello", "more") + turns("again", "ok")[:1], 0, "rec 9")
  assert e.value.reason == "template"
