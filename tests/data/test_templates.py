"""Chat templates (templates.py): list-style templates (llava-hf, OneVision) render LLaVA records
with ids and loss masks equal to transformers' `apply_chat_template` on list-style messages;
templates that fit neither style are refused naming them; where a directory keeps its template."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mllm_tune.data.conversation import ChatTokenizer
from mllm_tune.data.errors import DataError
from mllm_tune.data.templates import load_tokenizer, to_list_contents
from tests.helpers.data import LLAVA15_HF, chatml_tokenizer, llama_tokenizer, turns

IMAGE_ID, PER_IMAGE = 3, 5

# OneVision-style (ChatML, images first, list contents), without generation tags: our own
# assistant spans apply; OV_LIST_GEN is the same template with them (transformers' mask).
OV_LIST = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
OV_LIST_GEN = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _text(t):
  return {"type": "text", "text": t}


IMAGE = {"type": "image"}
# (LLaVA turns, number of images, the same conversation as list-style messages written by hand)
CASES = {
    "one_image_multi_turn": (
        turns("<image>\nWhat is in the image?", "A cat sitting on a red mat.",
              "What color is the mat?", "It is red."), 1,
        [{"role": "user", "content": [IMAGE, _text("What is in the image?")]},
         {"role": "assistant", "content": [_text("A cat sitting on a red mat.")]},
         {"role": "user", "content": [_text("What color is the mat?")]},
         {"role": "assistant", "content": [_text("It is red.")]}]),
    "two_images_system": (
        turns("Compare <image> and <image>.", "The first shows a beach.", system="Be brief."), 2,
        [{"role": "system", "content": [_text("Be brief.")]},
         {"role": "user", "content": [_text("Compare"), IMAGE, _text("and"), IMAGE, _text(".")]},
         {"role": "assistant", "content": [_text("The first shows a beach.")]}]),
    "text_only": (
        turns("Tell me a joke.", "Why 7 8 9? Because 7 ate 9!"), 0,
        [{"role": "user", "content": [_text("Tell me a joke.")]},
         {"role": "assistant", "content": [_text("Why 7 8 9? Because 7 ate 9!")]}]),
}
TEMPLATES = {  # name: (tokenizer factory with the template as its own, reference template)
    "llava15_hf": (lambda: llama_tokenizer(LLAVA15_HF), LLAVA15_HF),
    "onevision_style": (lambda: chatml_tokenizer(OV_LIST), OV_LIST_GEN),
}


def hf_list_reference(tok, template, messages):
  """transformers on list-style messages, `<image>` expanded afterwards (LlavaProcessor's way)."""
  out = tok.apply_chat_template(messages, chat_template=template, tokenize=True,
                                return_dict=True, return_assistant_tokens_mask=True)
  ids, mask = np.asarray(out["input_ids"]), np.asarray(out["assistant_masks"])
  reps = np.where(ids == IMAGE_ID, PER_IMAGE, 1)
  return np.repeat(ids, reps), np.repeat(np.where(ids == IMAGE_ID, 0, mask), reps)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_list_style_templates_equal_transformers_on_list_messages(name, case):
  make, ref_template = TEMPLATES[name]
  tok = make()
  conv, n_images, list_messages = CASES[case]
  chat = ChatTokenizer(tok, IMAGE_ID, PER_IMAGE)  # the tokenizer's own (list-style) template
  assert chat.content_style == "list"
  ours = chat.encode(conv, n_images)
  ref_ids, ref_mask = hf_list_reference(tok, ref_template, list_messages)
  np.testing.assert_array_equal(ours.input_ids, ref_ids)
  np.testing.assert_array_equal(ours.loss_mask, ref_mask)
  assert np.sum(ours.input_ids == IMAGE_ID) == n_images * PER_IMAGE
  assert ours.loss_mask.sum() > 0
  # the generation prompt is the template's, on the turns before the last answer
  prompt = chat.encode_prompt(conv, n_images)
  ref_prompt = tok.apply_chat_template(list_messages[:-1], chat_template=ref_template,
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
  ref_prompt = np.repeat(ref_prompt, np.where(np.asarray(ref_prompt) == IMAGE_ID, PER_IMAGE, 1))
  np.testing.assert_array_equal(prompt, ref_prompt)


def test_string_templates_keep_string_contents():
  assert ChatTokenizer(chatml_tokenizer(), IMAGE_ID, PER_IMAGE, "chatml").content_style == "string"
  assert ChatTokenizer(llama_tokenizer(), IMAGE_ID, PER_IMAGE,
                       "vicuna_v1").content_style == "string"


def test_to_list_contents_puts_an_image_item_per_placeholder_in_order():
  msgs = [{"role": "user", "content": "<image>\nLeft <image> right\n<image>"},
          {"role": "assistant", "content": "  verbatim  "}]
  assert to_list_contents(msgs, "<image>") == [
      {"role": "user", "content": [IMAGE, _text("Left"), IMAGE, _text("right"), IMAGE]},
      {"role": "assistant", "content": [_text("  verbatim  ")]}]


def test_a_template_that_fits_neither_style_is_refused_naming_it_and_the_fix():
  drops_text = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
  with pytest.raises(DataError, match=r"chat template: the Jinja template given as data.template "
                     r"cannot render LLaVA conversations \(with string contents it drops the "
                     r"text of the user and assistant turn; with list contents it drops .*\): "
                     r"set one .*--config.data.template=vicuna_v1") as e:
    ChatTokenizer(chatml_tokenizer(), IMAGE_ID, PER_IMAGE, drops_text)
  assert e.value.fatal
  other_token = LLAVA15_HF.replace("'<image>\n'", "'<|image|>\n'")
  with pytest.raises(DataError, match=r"the tokenizer's own chat_template .* with list contents it "
                                      r"writes 0 <image> for 1 image\(s\)"):
    ChatTokenizer(llama_tokenizer(other_token), IMAGE_ID, PER_IMAGE)


def test_processor_chat_template_files_are_read_when_the_tokenizer_has_none(tmp_path):
  """llava-hf directories keep the template beside the processor: `chat_template.json` (older
  transformers) or `chat_template.jinja`."""
  llama_tokenizer().save_pretrained(tmp_path)
  (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA15_HF}))
  assert load_tokenizer(str(tmp_path)).chat_template == LLAVA15_HF
  (tmp_path / "chat_template.jinja").write_text(OV_LIST)
  assert load_tokenizer(str(tmp_path)).chat_template == OV_LIST


def test_missing_tokenizer_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no tokenizer files \(one of \['tokenizer.json'"):
    load_tokenizer(str(tmp_path))
