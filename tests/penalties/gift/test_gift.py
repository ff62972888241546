"""GIFT (docs/methods.md §5.3): loss terms vs float64 NumPy replicas, AWC importance, the two-pass
gradient of a GIFT step on a tiny CLIP, and the synthetic image-caption sources."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as tF
from PIL import Image

from mllm_tune.data.errors import DataError
from mllm_tune.data.offline_render import SHAPES, nearest_color
from mllm_tune.data.synthetic_pairs import (PairDirectory, ProceduralPairs, batch_indices,
                                            collate_pairs, make_pair_source, shape_class)
from mllm_tune.models.clip import CLIP, CLIPConfig, CLIPTextConfig, clip_param_shapes
from mllm_tune.models.config import VisionConfig
from mllm_tune.penalties import gift

RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------- NumPy replicas
def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kd(zs, zt, t):
  """T^2 [H(softmax(Zt/T), softmax(Zs/T)) + transposes], H = -mean_rows sum p log q."""
  total = 0.0
  for s, r in ((zs, zt), (zs.T, zt.T)):
    p = np.exp(np_log_softmax(r / t))
    total += -np.mean(np.sum(p * np_log_softmax(s / t), axis=1)) * t * t
  return total


def np_ita(zs, labels, eps):
  b = len(labels)
  y = np.array([[float(labels[i] == labels[j]) for j in range(b)] for i in range(b)])
  y = y / y.sum(1, keepdims=True)
  y = (1 - eps) * y + eps / b
  return sum(-np.mean(np.sum(y * np_log_softmax(z), axis=1)) for z in (zs, zs.T))


def _logits(seed, shape, scale=3.0):
  return np.random.RandomState(seed).randn(*shape) * scale


def test_contrastive_distillation_matches_numpy_and_gift_code():
  zs, zt = _logits(0, (6, 5)), _logits(1, (6, 5))
  ours = float(gift.contrastive_distillation(jnp.float32(zs), jnp.float32(zt), 2.0))
  np.testing.assert_allclose(ours, np_kd(zs, zt, 2.0), rtol=RTOL, atol=ATOL)
  # the released `distillation(t, s, T)` = cross_entropy(s / T, softmax(t / T)) * T^2, twice
  ts, tt = torch.tensor(zs), torch.tensor(zt)
  ref = sum(tF.cross_entropy(s / 2, tF.softmax(t / 2, dim=1)) * 4
            for s, t in ((ts, tt), (ts.T, tt.T)))
  np.testing.assert_allclose(ours, float(ref), rtol=RTOL)
  assert abs(ours - np_kd(zs, zt, 1.0)) > 0.1  # the temperature matters


def test_image_text_alignment_matches_numpy_and_torch_label_smoothing():
  zs, labels = _logits(2, (6, 6)), np.array([0, 1, 0, 2, 1, 0])
  ours = float(gift.image_text_alignment(jnp.float32(zs), jnp.asarray(labels), 0.2))
  np.testing.assert_allclose(ours, np_ita(zs, labels, 0.2), rtol=RTOL, atol=ATOL)
  y = gift.label_targets(jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(y).sum(1), 1.0, rtol=1e-6)
  assert float(y[0, 2]) == pytest.approx(1 / 3) and float(y[0, 1]) == 0.0
  t = torch.tensor(np.asarray(y, np.float64))
  ref = sum(tF.cross_entropy(torch.tensor(z), t, label_smoothing=0.2) for z in (zs, zs.T))
  np.testing.assert_allclose(ours, float(ref), rtol=RTOL)  # torch's soft-target smoothing
  assert abs(ours - np_ita(zs, labels, 0.0)) > 1e-2
  with pytest.raises(ValueError, match="caption j belongs to image j"):
    gift.image_text_alignment(jnp.zeros((3, 4)), jnp.arange(3))


def test_classification_loss_is_torch_label_smoothed_ce():
  z, labels = _logits(3, (5, 4)), np.array([0, 3, 1, 1, 2])
  ours = float(gift.classification_loss(jnp.float32(z), jnp.asarray(labels), 0.2))
  ref = tF.cross_entropy(torch.tensor(z), torch.tensor(labels), label_smoothing=0.2)
  np.testing.assert_allclose(ours, float(ref), rtol=RTOL)


def _grad_tree(seed=0):
  rng = np.random.RandomState(seed)
  g = {"vision": {"layers": {"fc": rng.randn(3, 4, 5) * np.array([1, 10, 0.1])[:, None, None]}},
       "text": {"layers": {"attn": rng.randn(2, 6)}},
       "visual_projection": {"kernel": rng.randn(4, 5)},
       "logit_scale": np.float64(0.7), "unused": np.zeros(3)}
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)


def test_awc_importance_is_normalised_per_logical_tensor():
  g = _grad_tree()
  f = gift.awc_importance(g)
  vis = np.asarray(f["vision"]["layers"]["fc"])
  np.testing.assert_allclose(vis.mean(axis=(1, 2)), 1.0, rtol=1e-5)  # each layer, not the stack
  np.testing.assert_allclose(np.asarray(f["text"]["layers"]["attn"]).mean(1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(f["visual_projection"]["kernel"]).mean(), 1.0, rtol=1e-5)
  g64 = np.asarray(g["vision"]["layers"]["fc"], np.float64)
  want = g64 ** 2 / (g64 ** 2).mean(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(vis, want, rtol=RTOL, atol=ATOL)
  assert float(f["logit_scale"]) == pytest.approx(gift.EXCLUDED_IMPORTANCE)  # excluded
  np.testing.assert_allclose(np.asarray(f["unused"]), gift.EXCLUDED_IMPORTANCE)  # no gradient


def test_awc_penalty_value_and_gradient_match_numpy():
  g = _grad_tree(1)
  f = gift.awc_importance(g)
  rng = np.random.RandomState(4)
  theta = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), jnp.float32), g)
  ref = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), jnp.float32), g)
  lam = 0.7
  val = float(gift.awc_penalty(theta, ref, f, lam))
  leaves = [(np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(c, np.float64))
            for a, b, c in zip(*(jax.tree.leaves(t) for t in (theta, ref, f)))]
  np.testing.assert_allclose(val, lam * sum(np.sum(c * (a - b) ** 2) for a, b, c in leaves),
                             rtol=RTOL, atol=ATOL)
  grad = jax.grad(gift.awc_penalty)(theta, ref, f, lam)
  for gl, (a, b, c) in zip(jax.tree.leaves(grad), leaves):
    np.testing.assert_allclose(np.asarray(gl), 2 * lam * c * (a - b), rtol=RTOL, atol=ATOL)


def test_mllm_token_distillation_and_caption_nll_match_numpy():
  s, t = _logits(5, (2, 5, 7)), _logits(6, (2, 5, 7))
  ids = np.random.RandomState(7).randint(0, 7, (2, 5))
  mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
  kd = float(gift.token_distillation(jnp.float32(s), jnp.float32(t), jnp.asarray(mask), 2.0))
  nll = float(gift.caption_nll(jnp.float32(s), jnp.asarray(ids), jnp.asarray(mask)))
  kls, nlls = [], []
  for b, i in zip(*np.nonzero(mask)):  # target i is predicted from position i - 1
    lp, lq = np_log_softmax(t[b, i - 1] / 2), np_log_softmax(s[b, i - 1] / 2)
    kls.append(4 * np.sum(np.exp(lp) * (lp - lq)))
    nlls.append(-np_log_softmax(s[b, i - 1])[ids[b, i]])
  np.testing.assert_allclose(kd, np.mean(kls), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(nll, np.mean(nlls), rtol=RTOL, atol=ATOL)
  same = lambda z: gift.token_distillation(z, jnp.float32(t), jnp.asarray(mask))
  assert float(same(jnp.float32(t))) == pytest.approx(0.0, abs=1e-6)
  assert float(jnp.max(jnp.abs(jax.grad(same)(jnp.float32(t))))) < 1e-6
  total, terms = gift.mllm_aux_loss(jnp.float32(s), jnp.float32(t), jnp.asarray(ids),
                                    jnp.asarray(mask), gift.GiftHparams())
  np.testing.assert_allclose(float(total), kd + 0.25 * nll, rtol=RTOL)


# ----------------------------------------------------------------------------- the GIFT step
def _tiny_clip() -> CLIP:
  return CLIP(CLIPConfig(
      vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          image_size=28, patch_size=14),
      text=CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, max_position_embeddings=8, eos_token_id=49),
      projection_dim=16))


def _batches():
  rng = np.random.RandomState(0)
  caps = rng.randint(2, 49, (6, 8))
  lengths = np.array([5, 8, 3, 6, 4, 7])
  for i, n in enumerate(lengths):
    caps[i, n - 1], caps[i, n:] = 49, 0
  synth = {"pixel_values": rng.randn(6, 28, 28, 3).astype(np.float32), "input_ids": caps,
           "attention_mask": (np.arange(8)[None] < lengths[:, None]).astype(np.int32),
           "labels": np.array([0, 1, 0, 2, 1, 3])}
  cls = rng.randint(2, 49, (3, 8))
  cls[:, 5], cls[:, 6:] = 49, 0
  task = {"pixel_values": rng.randn(4, 28, 28, 3).astype(np.float32),
          "labels": np.array([0, 2, 1, 2]), "class_ids": cls, "class_mask": (cls > 0).astype(np.int32)}
  return task, synth


def _random_params(model, seed: int, scale: float) -> dict:
  """N(0, scale) params, norm scales around 1 (no jitted init: compiling it costs seconds)."""
  rng = np.random.RandomState(seed)
  shapes = clip_param_shapes(model)
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  out = [jnp.asarray(rng.randn(*s.shape) * scale + ("scale" in jax.tree_util.keystr(k)),
                     jnp.float32) for k, s in flat]
  return jax.tree.unflatten(jax.tree.structure(shapes), out)


def _is_key_bias(path) -> bool:
  return "k_proj" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path)


def test_gift_step_gradient_is_aux_plus_task_and_awc():
  """One jitted GIFT step (SGD) moves params by -lr (g_aux + grad L_CE + grad L_AWC), composed
  here from the separately tested terms; the teacher is the task-start model."""
  model = _tiny_clip()
  hp = gift.GiftHparams()
  ref = _random_params(model, 0, 0.1)
  drift = _random_params(model, 1, 0.05)
  # A key bias has an exactly-zero true gradient (softmax shift invariance), so its F is
  # rounding noise: keep it at the reference, where the AWC term vanishes whatever F is.
  params = jax.tree_util.tree_map_with_path(
      lambda k, r, d: r if _is_key_bias(k) else r + d - ("scale" in jax.tree_util.keystr(k)),
      ref, drift)
  task, synth = _batches()
  lr = 1e-2
  step = gift.make_gift_step(model, hp, optax.sgd(lr))

  def reference(p):  # composed here from the separately tested terms
    logits = lambda q, b: model.apply({"params": q}, b["pixel_values"], b["input_ids"],
                                      b["attention_mask"]).logits_per_image
    z_t = logits(ref, synth)
    aux = lambda q: (gift.contrastive_distillation(logits(q, synth), z_t, 2.0)
                     + 0.25 * gift.image_text_alignment(logits(q, synth), synth["labels"], 0.2))
    g_aux = jax.grad(aux)(p)
    f = gift.awc_importance(g_aux)
    ce = lambda q: gift.classification_loss(model.apply(
        {"params": q}, task["pixel_values"], task["class_ids"],
        task["class_mask"]).logits_per_image, task["labels"], 0.2)
    g_ce = jax.grad(ce)(p)
    g_awc = jax.grad(lambda q: gift.awc_penalty(q, ref, f, 1.0))(p)
    return g_aux, g_ce, g_awc, f

  # one compilation for both (XLA shares their common forward passes)
  both = jax.jit(lambda p: (step(p, optax.sgd(lr).init(p), gift.init_awc_state(p), ref, ref,
                                 task, synth), reference(p)))
  (new_params, _, state, metrics), (g_aux, g_ce, g_awc, f) = both(params)
  norm = lambda t: float(optax.tree.norm({k: v for k, v in t.items() if k != "logit_scale"}))
  assert min(norm(g_aux), norm(g_ce), norm(g_awc)) > 1e-2  # every pass contributes
  want = jax.tree.map(lambda a, b, c: a + b + c, g_aux, g_ce, g_awc)
  want["logit_scale"] = jnp.zeros(())  # frozen, as in the released code
  np.testing.assert_array_equal(np.asarray(new_params["logit_scale"]),
                                np.asarray(params["logit_scale"]))
  for path, got, p, w in zip(jax.tree_util.tree_flatten_with_path(new_params)[0],
                             jax.tree.leaves(new_params), jax.tree.leaves(params),
                             jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(p - lr * w), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path[0]))
  assert float(jnp.max(jnp.abs(want["vision"]["post_norm"]["scale"]))) > 0  # pooled path trains
  for (k, a), b in zip(jax.tree_util.tree_flatten_with_path(state.importance)[0],
                       jax.tree.leaves(f)):
    if not _is_key_bias(k):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  assert int(state.count) == 1 and {"kd", "ita", "task", "awc"} <= set(metrics)


def test_static_awc_running_mean_then_frozen_without_aux_pass():
  """Toy closed form: aux = sum c w^2, task = sum d w; K = 2."""
  c, d = np.array([1.0, 2.0, 0.5, 3.0]), np.array([0.3, -0.2, 0.1, 0.4])
  hp = gift.GiftHparams(static_awc=2, awc_weight=0.5)
  aux = lambda p: (jnp.sum(jnp.float32(c) * p["w"] ** 2), {"kd": jnp.sum(p["w"])})
  task = lambda p: (jnp.sum(jnp.float32(d) * p["w"]) + 0 * p["logit_scale"], {})
  run = jax.jit(lambda p, s: gift.gift_gradients(aux, task, p, ref, s, hp))
  ref = {"w": jnp.float32([0.1, 0.2, -0.3, 0.4]), "logit_scale": jnp.float32(2.0)}
  p = {"w": jnp.float32([0.5, -0.4, 0.2, 1.0]), "logit_scale": jnp.float32(2.0)}
  state, fs = gift.init_awc_state(p), []
  for t in range(4):
    w = np.asarray(p["w"], np.float64)
    g_aux = 2 * c * w
    f_new = g_aux ** 2 / np.mean(g_aux ** 2)
    if t < 2:
      fs.append(f_new)
    f = np.mean(fs, axis=0)  # running mean of the first K, then frozen
    want = (g_aux if t < 2 else 0) + d + 2 * 0.5 * f * (w - np.asarray(ref["w"]))
    grads, state, metrics = run(p, state)
    np.testing.assert_allclose(np.asarray(grads["w"]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.importance["w"]), f, rtol=1e-5)
    assert float(grads["logit_scale"]) == 0.0
    assert (float(metrics["aux"]) == 0.0) == (t >= 2)
    p = {"w": p["w"] - 0.1 * grads["w"], "logit_scale": p["logit_scale"]}
  assert not np.allclose(fs[0], fs[1])  # the mean really averaged two different F


def test_config_builds_hparams():
  from configs.methods import gift as gift_cfg
  c = gift_cfg.get_config()
  hp = gift.GiftHparams.from_config(c)
  assert hp == gift.GiftHparams(2.0, 1.0, 0.25, 0.2, 1.0, 0, ("logit_scale",))
  assert c.learning_rate == 1e-5 and c.iterations == 1000 and c.weight_decay == 0.0


# ----------------------------------------------------------------------------- synthetic pairs
def _write_dir(root, lines, images):
  os.makedirs(root, exist_ok=True)
  for name, px in images.items():
    Image.fromarray(px).save(os.path.join(root, name))
  with open(os.path.join(root, "captions.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")


def test_pair_directory_round_trip(tmp_path):
  rng = np.random.RandomState(0)
  imgs = {f"{i}.png": rng.randint(0, 256, (8, 8, 3)).astype(np.uint8) for i in range(3)}
  recs = [{"image": "0.png", "caption": "a photo of a cat", "label": "cat"},
          {"image": "1.png", "caption": "a photo of a dog", "label": "dog"},
          {"image": "2.png", "caption": "another cat", "label": "cat"}]
  _write_dir(str(tmp_path), [json.dumps(r) for r in recs], imgs)
  src = make_pair_source("directory", str(tmp_path))
  assert len(src) == 3 and src.label_names == ("cat", "dog")
  for i, r in enumerate(recs):
    pair = src[i]
    np.testing.assert_array_equal(pair.pixels, imgs[f"{i}.png"])
    assert pair.caption == r["caption"]
  batch = collate_pairs([src[i] for i in range(3)])
  assert batch["pixels"].shape == (3, 8, 8, 3) and batch["labels"].tolist() == [0, 1, 0]
  _write_dir(str(tmp_path / "ints"), [json.dumps({**r, "label": k}) for r, k in
                                      zip(recs, [4, 1, 4])], imgs)
  assert [PairDirectory(str(tmp_path / "ints"))[i].label for i in range(3)] == [4, 1, 4]


def test_pair_directory_bad_input_names_the_place(tmp_path):
  px = {"a.png": np.zeros((4, 4, 3), np.uint8)}
  good = json.dumps({"image": "a.png", "caption": "x", "label": 0})
  _write_dir(str(tmp_path / "j"), [good, '{"image": "a.png", "caption": '], px)
  with pytest.raises(DataError, match=r"captions\.jsonl:2: malformed JSON"):
    PairDirectory(str(tmp_path / "j"))
  _write_dir(str(tmp_path / "m"), [good, json.dumps({"image": "gone.png", "caption": "y",
                                                     "label": 1})], px)
  with pytest.raises(DataError, match=r"captions\.jsonl:2: image file not found: .*gone\.png"):
    PairDirectory(str(tmp_path / "m"))
  _write_dir(str(tmp_path / "l"), [json.dumps({"image": "a.png", "caption": "y",
                                               "label": 1.5})], px)
  with pytest.raises(DataError, match=r"captions\.jsonl:1: field 'label'"):
    PairDirectory(str(tmp_path / "l"))
  _write_dir(str(tmp_path / "c"), [good], px)
  with open(tmp_path / "c" / "a.png", "wb") as f:
    f.write(b"not a png")
  src = PairDirectory(str(tmp_path / "c"))
  with pytest.raises(DataError, match=r"a\.png.*cannot decode image"):
    src[0]


def test_procedural_pairs_caption_and_label_describe_the_pixels():
  src = ProceduralPairs(num=12, split="train", seed=3, image_size=32)
  assert make_pair_source("procedural", num=12, seed=3)[5].caption == src[5].caption
  for i in range(12):
    pair = src[i]
    _, color, kind = pair.caption.split()
    assert kind in SHAPES and pair.label == shape_class(color, kind)
    assert src.label_names[pair.label] == f"{color} {kind}"
    # the most common non-background colour of the image is the captioned one
    px = pair.pixels.reshape(-1, 3)
    bg = px[0]
    ink = px[np.any(px != bg, axis=1)]
    assert nearest_color(np.median(ink, axis=0)) == color
  np.testing.assert_array_equal(src[4].pixels, ProceduralPairs(12, "train", 3, 32)[4].pixels)
  assert len({src[i].label for i in range(12)}) > 3
  with pytest.raises(ValueError, match="kind='nope'"):
    make_pair_source("nope")


def test_batch_indices_cover_each_epoch():
  first = np.concatenate([batch_indices(10, 5, seed=1, step=s) for s in (0, 1)])
  assert sorted(first.tolist()) == list(range(10))
  np.testing.assert_array_equal(batch_indices(10, 5, 1, 1), batch_indices(10, 5, 1, 1))
  wrap = batch_indices(10, 4, seed=1, step=2)  # slots 8..11: end of epoch 0, start of epoch 1
  assert len(wrap) == 4
  with pytest.raises(ValueError):
    batch_indices(3, 4, 0, 0)
