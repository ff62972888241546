"""Generation: beam search vs transformers, greedy/sampling/beam consistency, sampling filters,
shape buckets, stop tokens and stop strings, bad input."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mllm_tune as mt
from mllm_tune.eval import generate as gen
from mllm_tune.eval.sampling import filter_logits, sample_tokens
from tests.helpers import hf_tiny

ROWS = [[1, 5, 6, 7], [1, 40, 41, 42, 43, 44], [1, 9]]
# End tokens for which the tiny model's beams finish at different steps (asserted in the tests).
EOS = [83, 28]
NEW = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  # torch's intra-op threads fight XLA's for the CPU: HF generate on this model goes from
  # seconds to milliseconds with one thread
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  hf_model = hf_tiny.llama()
  d = str(tmp_path_factory.mktemp("llama"))
  hf_model.save_pretrained(d)
  model, params = mt.load_pretrained(d)
  ids, mask = hf_tiny.padded_batch(ROWS, "left")
  yield hf_model, model, params, ids, mask
  torch.set_num_threads(threads)


def _hf_beams(hf_model, ids, mask, early_stopping, length_penalty, k=3):
  with torch.no_grad():
    out = hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            max_new_tokens=NEW, do_sample=False, num_beams=k,
                            early_stopping=early_stopping, length_penalty=length_penalty,
                            eos_token_id=EOS, pad_token_id=0, num_return_sequences=k,
                            output_scores=True, return_dict_in_generate=True)
  seqs = out.sequences[:, ids.shape[1]:].numpy().reshape(len(ids), k, -1)
  return seqs, out.sequences_scores.numpy().reshape(len(ids), k)


def _length(row) -> int:
  """Tokens up to and including the first end token."""
  return next((i + 1 for i, tok in enumerate(row) if tok in EOS), len(row))


def test_beam_search_matches_hf(tiny):
  """All three HF early_stopping modes (True, False, "never") and two length penalties: the K
  finished hypotheses, their order and their scores."""
  hf_model, model, params, ids, mask = tiny
  refs = {}
  for early_stopping in (True, False, "never"):
    for lp in (1.0, 2.0):
      ref, ref_scores = _hf_beams(hf_model, ids, mask, early_stopping, lp)
      refs[early_stopping, lp] = ref
      seqs, scores = gen.beam_search(model, params, ids, mask, max_new_tokens=NEW,
                                     eos_token_id=EOS, num_beams=3, length_penalty=lp,
                                     early_stopping=early_stopping)
      seqs = np.asarray(seqs)
      assert seqs.shape == (3, 3, NEW)
      for b in range(3):
        for k in range(3):
          n = _length(ref[b, k])
          np.testing.assert_array_equal(seqs[b, k, :n], ref[b, k, :n])
          assert (seqs[b, k, n:] == 0).all()
      np.testing.assert_allclose(np.asarray(scores), ref_scores, atol=1e-5, rtol=0)
  best = np.asarray(mt.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=EOS,
                                num_beams=3, length_penalty=2.0, early_stopping="never"))
  np.testing.assert_array_equal(best, seqs[:, 0])
  # the checks above are only as strong as the cases: hypotheses end at several different steps,
  # early_stopping=True ends the search first, and each mode changes some result
  assert len({_length(r) for r in refs[True, 1.0].reshape(9, -1)}) > 2
  assert refs[True, 1.0].shape[-1] < NEW
  assert refs[True, 1.0].shape != refs[False, 1.0].shape
  assert not np.array_equal(refs[False, 1.0], refs["never", 1.0])
  assert not np.array_equal(refs["never", 1.0], refs["never", 2.0])


def test_decoding_through_the_scanned_stack_gives_the_same_tokens(tiny):
  """`decode_per_layer=False` (no per-layer weight copies; cache stacked (L, ...)) decodes
  through the scanned layers: HF's beams and the default path's greedy tokens again."""
  hf_model, model, params, ids, mask = tiny
  from mllm_tune.models.config import with_runtime
  stacked = model.clone(config=with_runtime(model.config, decode_per_layer=False))
  ref, ref_scores = _hf_beams(hf_model, ids, mask, False, 1.0)
  seqs, scores = gen.beam_search(stacked, params, ids, mask, max_new_tokens=NEW,
                                 eos_token_id=EOS, num_beams=3, early_stopping=False)
  for b in range(3):
    for k in range(3):
      n = _length(ref[b, k])
      np.testing.assert_array_equal(np.asarray(seqs)[b, k, :n], ref[b, k, :n])
  np.testing.assert_allclose(np.asarray(scores), ref_scores, atol=1e-5, rtol=0)
  greedy = lambda m: np.asarray(mt.generate(m, params, ids, mask, max_new_tokens=NEW,
                                            eos_token_id=EOS))
  np.testing.assert_array_equal(greedy(stacked), greedy(model))


def test_beam_with_one_beam_is_greedy(tiny):
  _, model, params, ids, mask = tiny
  greedy = np.asarray(mt.generate(model, params, ids, mask, max_new_tokens=NEW,
                                  eos_token_id=EOS))
  assert (greedy == 0).any() and (greedy != 0).all(axis=1).sum() < 3  # some rows ended early
  seqs, _ = gen.beam_search(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=EOS,
                            num_beams=1, early_stopping=True)
  np.testing.assert_array_equal(np.asarray(seqs)[:, 0], greedy)
  # stop_token_ids are end tokens too: the same set split differently gives the same output
  split = mt.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=EOS[1],
                      stop_token_ids={EOS[0]})
  np.testing.assert_array_equal(np.asarray(split), greedy)


def test_sampling_limits_and_determinism(tiny):
  _, model, params, ids, mask = tiny
  greedy = np.asarray(mt.generate(model, params, ids, mask, max_new_tokens=NEW))
  key = jax.random.key(3)
  sample = lambda **kw: np.asarray(mt.generate(model, params, ids, mask, max_new_tokens=NEW,
                                               do_sample=True, **kw))
  np.testing.assert_array_equal(sample(rng=key, temperature=1e-4), greedy)
  np.testing.assert_array_equal(sample(rng=key, temperature=0.0), greedy)
  np.testing.assert_array_equal(sample(rng=key, top_k=1, temperature=1.5), greedy)
  hot = sample(rng=key, temperature=1.5)
  np.testing.assert_array_equal(sample(rng=key, temperature=1.5), hot)
  assert not np.array_equal(hot, greedy)
  assert not np.array_equal(sample(rng=jax.random.key(4), temperature=1.5), hot)


def test_filter_logits_matches_hf_warpers():
  from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                      TopKLogitsWarper, TopPLogitsWarper)
  logits = np.random.RandomState(0).randn(6, 50).astype(np.float32) * 2
  for temp, k, p in [(1.0, 0, 0.9), (0.7, 5, 1.0), (1.3, 10, 0.6), (1.0, 3, 0.95),
                     (2.0, 0, 0.3)]:
    ref = torch.tensor(logits)
    ref = TemperatureLogitsWarper(temp)(None, ref)
    if k:
      ref = TopKLogitsWarper(k)(None, ref)
    if p < 1:
      ref = TopPLogitsWarper(p)(None, ref)
    ref = ref.numpy()
    ours = np.asarray(filter_logits(jnp.asarray(logits), temp, k, p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    kept = ~np.isinf(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)
    assert (~kept).any()


def test_top_p_keeps_the_nucleus():
  probs = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (1), 0.3 (3), 0.15 (2), 0.05 (0)
  logits = jnp.asarray(np.log(probs)[None], jnp.float32)
  for top_p, nucleus in [(0.4, {1}), (0.7, {1, 3}), (0.85, {1, 2, 3}), (1.0, {0, 1, 2, 3})]:
    kept = np.isfinite(np.asarray(filter_logits(logits, 1.0, 0, top_p))[0])
    assert set(np.flatnonzero(kept)) == nucleus, top_p
  # draws come from the renormalized nucleus only: 0.5 / 0.8 and 0.3 / 0.8
  draws = np.asarray(sample_tokens(jax.random.key(0), jnp.repeat(logits, 4000, axis=0),
                                   1.0, 0, 0.7))
  assert set(np.unique(draws)) == {1, 3}
  assert abs(np.mean(draws == 1) - 0.625) < 0.03
  # top-k first, then top-p on the renormalized top-k
  kept = np.isfinite(np.asarray(filter_logits(logits, 1.0, 2, 0.9))[0])
  assert set(np.flatnonzero(kept)) == {1, 3}


def test_sampling_follows_the_softmax():
  logits = jnp.asarray(np.log([[0.1, 0.6, 0.3]]), jnp.float32)
  draws = np.asarray(sample_tokens(jax.random.key(1), jnp.repeat(logits, 6000, axis=0)))
  np.testing.assert_allclose(np.bincount(draws, minlength=3) / 6000, [0.1, 0.6, 0.3], atol=0.02)
  cold = np.asarray(sample_tokens(jax.random.key(1), jnp.repeat(logits, 6000, axis=0), 0.5))
  np.testing.assert_allclose(np.bincount(cold, minlength=3) / 6000, [0.01 / 0.46, 0.36 / 0.46,
                                                                     0.09 / 0.46], atol=0.02)


def test_next_bucket():
  assert [gen.next_bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]
  assert gen.next_bucket(5, floor=4) == 8 and gen.next_bucket(5, floor=None) == 5
  with pytest.raises(ValueError, match="floor"):
    gen.next_bucket(5, floor=0)


def test_buckets_compile_once_and_do_not_change_results(tiny):
  _, model, params, _, _ = tiny
  batches = [hf_tiny.padded_batch([r[:n] for r in ROWS], "right")
             for n in (2, 4, 6)]
  gen.generate(model, params, *batches[0], max_new_tokens=NEW)  # may compile this bucket
  before = gen._sample_loop._cache_size()
  outs = [np.asarray(gen.generate(model, params, ids, mask, max_new_tokens=new))
          for (ids, mask), new in zip(batches, (NEW, 5, 16))]
  assert gen._sample_loop._cache_size() == before  # prompts 2..6 and 5..16 new: one bucket
  assert [o.shape for o in outs] == [(3, NEW), (3, 5), (3, 16)]
  # bucket padding (prompt 6 -> 16 columns, 12 -> 16 new tokens) leaves greedy == HF greedy
  hf_model = tiny[0]
  for (ids, mask), new, out in zip(batches, (NEW, 5, 16), outs):
    np.testing.assert_array_equal(out, hf_tiny.hf_generate(hf_model, *gen.left_pad(ids, mask),
                                                           max_new_tokens=new))


def test_stop_strings_are_applied_to_decoded_text(tiny):
  _, model, params, ids, mask = tiny
  decode = lambda toks: " ".join(f"t{t}" for t in toks)
  greedy = np.asarray(mt.generate(model, params, ids, mask, max_new_tokens=NEW))
  stop = f" t{greedy[0, 2]} "  # row 0's third token
  texts = gen.generate_text(model, params, ids, mask, max_new_tokens=NEW, decode=decode,
                            stop_strings=[stop, "never-there"])
  full = [decode(r) for r in greedy.tolist()]
  assert texts[0] == full[0][:full[0].index(stop)] and len(texts[0]) < len(full[0])
  for t, f in zip(texts[1:], full[1:]):
    assert t == (f[:f.index(stop)] if stop in f else f)
  # end tokens cut before decoding; the earliest of several stop strings wins
  assert gen.decode_generated(np.array([[5, 6, 7, 2, 9]]), decode, stop_token_ids=[2]) == [
      "t5 t6 t7"]
  assert gen.decode_generated(np.array([[5, 6, 7]]), decode, [" t7", "t6"]) == ["t5 "]
  assert gen.truncate_at_stop_strings("abc</s>def", ["</s>"]) == "abc"
  with pytest.raises(TypeError):
    gen.truncate_at_stop_strings("abc", "b")
  with pytest.raises(ValueError, match="non-empty"):
    gen.truncate_at_stop_strings("abc", [""])


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2.5), "num_beams"),
    (dict(do_sample=True, rng=jax.random.key(0), top_p=0.0), "top_p"),
    (dict(do_sample=True, rng=jax.random.key(0), top_p=1.5), "top_p"),
    (dict(do_sample=True, rng=jax.random.key(0), top_k=-1), "top_k"),
    (dict(do_sample=True, rng=jax.random.key(0), temperature=-0.5), "temperature"),
    (dict(do_sample=True), "rng"),
    (dict(temperature=0.7), "do_sample"),
    (dict(do_sample=True, rng=jax.random.key(0), num_beams=2), "beam sampling"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=251), "max_position_embeddings"),
    (dict(eos_token_id=-3), "token ids"),
    (dict(bucket_floor=0), "floor"),
])
def test_bad_arguments_raise(tiny, kwargs, match):
  _, model, params, ids, mask = tiny
  with pytest.raises(ValueError, match=match):
    mt.generate(model, params, ids, mask, **kwargs)


def test_bad_prompts_raise(tiny):
  _, model, params, ids, mask = tiny
  with pytest.raises(ValueError, match="max_position_embeddings"):
    mt.generate(model, params, np.ones((1, 300), np.int32), max_new_tokens=1)
  with pytest.raises(ValueError, match="no real tokens"):
    mt.generate(model, params, ids, np.concatenate([mask[:1] * 0, mask[1:]]))
  with pytest.raises(ValueError, match="shape"):
    mt.generate(model, params, ids, mask[:, 1:])
  with pytest.raises(ValueError, match="text-only"):
    mt.generate(model, params, ids, mask, np.zeros((1, 28, 28, 3), np.float32))


def test_llava_beam_search_with_images_matches_hf(tmp_path):
  """The prompt (with images) is prefilled once per row and its cache repeated for the beams;
  HF instead repeats the inputs. Same hypotheses."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    hf_model = hf_tiny.clip_llama()
    hf_model.save_pretrained(str(tmp_path))
    model, params = mt.load_pretrained(str(tmp_path))
    img = hf_tiny.image_tokens(model.config.image_seq_len, 1)
    ids, mask = hf_tiny.padded_batch([[1, 5] + img + [7, 8], [1, 20, 21], [1, 3] + img + [4]],
                                     "left")
    px = np.random.RandomState(0).randn(2, 28, 28, 3).astype(np.float32)
    with torch.no_grad():
      ref = hf_model.generate(
          input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
          pixel_values=torch.tensor(px.transpose(0, 3, 1, 2).copy()), max_new_tokens=8,
          do_sample=False, num_beams=2, early_stopping=True, pad_token_id=0,
          eos_token_id=2, num_return_sequences=2)[:, ids.shape[1]:].numpy()
  finally:
    torch.set_num_threads(threads)
  seqs, _ = gen.beam_search(model, params, ids, mask, px, max_new_tokens=8, eos_token_id=2,
                            num_beams=2)
  seqs = np.asarray(seqs).reshape(6, 8)
  for ours, theirs in zip(seqs, ref):
    n = next((i + 1 for i, tok in enumerate(theirs) if tok == 2), len(theirs))
    np.testing.assert_array_equal(ours[:n], theirs[:n])
  assert len({tuple(r) for r in seqs}) > 3  # a non-degenerate case: rows and beams differ


def test_eos_and_pad_default_to_the_checkpoints_generation_config(tmp_path):
  """A generation_config.json with its own eos (two ids, no pad): `mt.generate` without eos /
  pad arguments stops and pads as HF `generate` does reading that file (pad = first eos);
  explicit arguments win; save_pretrained writes the file back."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    hf_model = hf_tiny.llama()
    ids, mask = hf_tiny.padded_batch(ROWS, "left")
    with torch.no_grad():
      free = hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                               max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[:, ids.shape[1]:].numpy()
    eos = [int(free[0, 2]), int(free[1, 4])]  # tokens rows 0 and 1 emit early
    assert eos[0] not in free[0, :2] and 2 not in free
    hf_model.generation_config.eos_token_id = eos
    hf_model.generation_config.pad_token_id = None
    hf_model.save_pretrained(str(tmp_path))
    with torch.no_grad():
      ref = hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                              max_new_tokens=NEW, do_sample=False)[:, ids.shape[1]:].numpy()
  finally:
    torch.set_num_threads(threads)
  model, params = mt.load_pretrained(str(tmp_path))
  ours = np.asarray(mt.generate(model, params, ids, mask, max_new_tokens=NEW))
  assert ref.shape[1] < NEW  # HF stopped early: every row hit an end token
  np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
  assert (ours[:, ref.shape[1]:] == eos[0]).all()
  assert (ours[0, 3:] == eos[0]).all()  # row 0 ended at its third token, padded with eos[0]
  texts = gen.generate_text(model, params, ids, mask, decode=lambda t: ",".join(map(str, t)),
                            max_new_tokens=NEW)
  assert texts[0] == ",".join(map(str, free[0, :2]))
  # explicit arguments win over the file (99: a token the model never emits here)
  assert 99 not in free
  np.testing.assert_array_equal(
      mt.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=99,
                  pad_token_id=0), free)
  out = tmp_path / "written"
  mt.save_pretrained(str(out), model, params)
  assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos
