"""Prepared VQA sets (vqa_sets.py): generation prompts are what a user sends at inference (the
turns before the answer + the chat template's generation prompt, as transformers renders them),
never the training row cut before its answer; anyres prompts carry the tables of their own
image-token positions (equal to the transformers processor's inputs)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import mllm_tune as mt
from mllm_tune.data.conversation import VICUNA_V1, ChatTokenizer, to_messages
from mllm_tune.data.images import ImageSpec
from mllm_tune.data.pipeline import SamplePreparer
from mllm_tune.eval import vqa_sets
from tests.helpers import anyres_tiny as at
from tests.helpers.data import image_bytes, llama_tokenizer, turns

IMAGE_ID, PER_IMAGE = 3, 4


def _records(answers, sizes=None):
  return [{"conversations": turns("<image>\nWhat is shown?", a), "answer": a,
           "images": [image_bytes(*(sizes[i] if sizes else (20, 16)), seed=i)],
           "where": f"rec {i}"} for i, a in enumerate(answers)]


def test_prompts_do_not_leak_how_the_answer_tokenizes():
  """Vicuna with a Llama-style tokenizer: "yes" and "42" have no "▁y" / "▁4" tokens, so the
  training row holds a lone "▁" before them; the prompt must end at "ASSISTANT:" all the same,
  as transformers renders it with add_generation_prompt=True."""
  tok = llama_tokenizer()
  prep = SamplePreparer(ChatTokenizer(tok, IMAGE_ID, PER_IMAGE, "vicuna_v1"),
                        ImageSpec.clip(28), 256)
  answers = ["yes", "42", "blue", "two"]
  recs = _records(answers)
  a = vqa_sets.prepare(recs, prep)
  leaked = 0
  for i, rec in enumerate(recs):
    head = [{"role": m["role"], "content": m["content"].replace("<image>", "<image>" * PER_IMAGE)}
            for m in to_messages(rec["conversations"])[:-1]]
    ref = tok.apply_chat_template(head, chat_template=VICUNA_V1, add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    np.testing.assert_array_equal(a.prompt_ids[i, :a.prompt_len[i]], ref)
    cut = a.input_ids[i, :np.flatnonzero(a.loss_mask[i])[0]]  # the row before its answer
    leaked += not np.array_equal(cut, ref)
    assert tok.convert_ids_to_tokens(ref[-1:]) == ["T:"]
  assert leaked == 2  # "yes" and "42": the cut would end with a lone "▁"
  ids, mask, images = a.prompts(np.array([0, 2]), ImageSpec.clip(28))
  assert mask.sum(1).tolist() == a.prompt_len[[0, 2]].tolist()
  np.testing.assert_array_equal(ids[0, :a.prompt_len[0]], a.prompt_ids[0, :a.prompt_len[0]])
  assert images["pixel_values"].shape == (2, 28, 28, 3)


def test_sets_prepared_without_prompts_refuse_to_give_them():
  prep = SamplePreparer(ChatTokenizer(llama_tokenizer(), IMAGE_ID, PER_IMAGE, "vicuna_v1"),
                        ImageSpec.clip(28), 256)
  a = vqa_sets.prepare(_records(["yes"]), prep, prompts=False)
  assert a.prompt_ids is None
  with pytest.raises(ValueError, match="prepared without generation prompts"):
    a.prompts(np.array([0]), ImageSpec.clip(28))


# A ChatML template whose generation prompt adds a system turn first: the prompt's image tokens
# then sit elsewhere than in the training row, so its tables must be its own. (Not
# prefix-stable, so it marks its answers with generation tags.)
SHIFTED = ("{% if add_generation_prompt %}{{ '<|im_start|>system\\nAnswer in one word.<|im_end|>"
           "\\n' }}{% endif %}{% for message in messages %}{% if message['role'] == 'assistant' %}"
           "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
           "{% endgeneration %}{{ '\\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + "
           "message['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_anyres_prompts_equal_the_transformers_processor_inputs(tmp_path):
  d, _, proc = at.model_dir(str(tmp_path), "llava_onevision", template=SHIFTED)
  model, _ = mt.load_pretrained(d)
  prep = SamplePreparer.from_pretrained(d, model.config, 512)
  sizes = [(50, 30), (20, 60), (28, 28)]
  recs = _records(["red", "a cat", "7"], sizes)
  a = vqa_sets.prepare(recs, prep)
  assert a.prompt_pack is not None
  for i, rec in enumerate(recs):
    text = proc.tokenizer.apply_chat_template(to_messages(rec["conversations"])[:-1],
                                              add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nAnswer in one word.")
    enc = proc(images=[[Image.open(io.BytesIO(rec["images"][0]))]], text=[text],
               return_tensors="np")
    ref = mt.hf_inputs(model, enc)
    ids, mask, images = a.prompts(np.array([i]), prep.image_spec)
    np.testing.assert_array_equal(ids[0], enc["input_ids"][0])
    assert mask.all()
    np.testing.assert_allclose(images["pixel_values"][:len(ref["pixel_values"])],
                               ref["pixel_values"], atol=1e-5)
    k = ref["pack_index"].shape[-1]
    for key in ("pack_index", "pack_weight"):
      np.testing.assert_array_equal(images[key][..., :k], ref[key])
      assert not images[key][..., k:].any()
    np.testing.assert_array_equal(images["pack_newline"], ref["pack_newline"])
    # the training row's tables sit elsewhere: a prompt cut from it would misread the images
    assert not np.array_equal(a.pack[1][i, :ids.shape[1]], a.prompt_pack[1][i, :ids.shape[1]])
