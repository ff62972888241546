"""Importance (docs/methods.md §5.1, 5.2, 5.5): chunked per-example Fisher == float64 closed form
and a per-sample loop, Monte-Carlo true Fisher within 5%, MAS closed form, LLaVA batches cut into
samples (packed rows, shared image slots), 8-device sharding, files and their errors."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_tune.importance import fisher, store as importance_store
from mllm_tune import pytree as select
from mllm_tune.tuning.selective import spider
from tests.helpers.env import cpu_env
from tests.helpers.tiny_models import IMAGE_TOKEN, leaves_matching, tiny_llava, tiny_lm
from tests.helpers.train import ROOT

D, C = 5, 4


def linear_softmax(variables, ex):
  """One example {"x": (D,), "y": ()} of p = softmax(x W): logits (1, C), target, weight 1."""
  z = ex["x"] @ variables["params"]["head"]["kernel"]
  return z[None], ex["y"][None], jnp.ones((1,), jnp.float32)


def _problem(n: int, seed: int = 0):
  rng = np.random.RandomState(seed)
  w = rng.randn(D, C).astype(np.float32)
  ex = {"x": rng.randn(n, D).astype(np.float32), "y": rng.randint(0, C, n).astype(np.int32)}
  variables = {"params": {"head": {"kernel": jnp.asarray(w)}}, "adapters": {}}
  leaves = {"params": {"head": {"kernel": True}}, "adapters": {}}
  return w, ex, variables, leaves


def _probs64(w, x):
  z = x.astype(np.float64) @ w.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def test_empirical_fisher_in_chunks_matches_float64_closed_form_not_batch_squared():
  w, ex, variables, leaves = _problem(11)
  got = fisher.importance(linear_softmax, variables, leaves, ex, chunk=3, chunks_per_call=2)
  g = ex["x"].astype(np.float64)[:, :, None] * (np.eye(C)[ex["y"]] - _probs64(w, ex["x"]))[
      :, None, :]  # d_W log p(y|x) = x (y - p)^T per sample
  ref = np.mean(g ** 2, axis=0)
  np.testing.assert_allclose(np.asarray(got["params/head/kernel"]), ref, rtol=1e-5, atol=1e-7)
  batch_squared = np.square(g.mean(0))  # the classic bug: square of a batch-mean gradient
  assert np.abs(batch_squared - ref).max() > 0.1 * ref.max()


def test_true_fisher_monte_carlo_within_5_percent_of_closed_form():
  w, ex, variables, leaves = _problem(40000, seed=1)
  got = fisher.importance(linear_softmax, variables, leaves, ex, kind="true", chunk=2000,
                          rng=jax.random.key(3))["params/head/kernel"]
  p = _probs64(w, ex["x"])  # E_y[(1[y=k] - p_k)^2] = p_k (1 - p_k)
  ref = np.mean(ex["x"].astype(np.float64)[:, :, None] ** 2 * (p * (1 - p))[:, None, :], 0)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=0.05)
  emp = fisher.importance(linear_softmax, variables, leaves, ex, chunk=2000)
  assert np.abs(np.asarray(emp["params/head/kernel"]) - ref).max() > 0.05 * ref.max()


def test_mas_importance_matches_linear_closed_form():
  w, ex, variables, leaves = _problem(7)
  got = fisher.importance(linear_softmax, variables, leaves, ex, kind="mas", chunk=4)
  z = ex["x"].astype(np.float64) @ w.astype(np.float64)  # d_W ||z||^2 = 2 x z^T
  ref = np.mean(np.abs(2 * ex["x"][:, :, None] * z[:, None, :]), 0)
  np.testing.assert_allclose(np.asarray(got["params/head/kernel"]), ref, rtol=1e-5, atol=1e-6)


def _loop_fisher(model, params, samples, leaf_paths):
  """Reference: one jax.grad (w.r.t. the leaves asked for) per sample, each sample fed alone
  as its own batch."""
  flat = select.flatten(params)
  wanted = {p[len("params/"):]: flat[p[len("params/"):]] for p in leaf_paths}

  def logp(w, s):
    p = select.unflatten({**flat, **w})
    logits = model.apply({"params": p}, s["input_ids"][None],
                         pixel_values=s.get("pixel_values"))[0, :-1]
    lp = jax.nn.log_softmax(logits, -1)
    picked = jnp.take_along_axis(lp, s["input_ids"][1:, None], -1)[:, 0]
    return jnp.sum(picked * s["loss_mask"][1:])
  grad = jax.jit(jax.grad(logp))
  grads = [grad(wanted, s) for s in samples]
  return {p: np.mean([np.square(np.asarray(g[p[7:]], np.float64)) for g in grads], 0)
          for p in leaf_paths}


def test_llava_batch_cut_into_samples_matches_per_sample_loop():
  model, params, _ = tiny_llava()
  per = model.config.image_seq_len
  rng = np.random.RandomState(1)
  img = lambda: rng.randn(28, 28, 3).astype(np.float32)
  a = np.r_[1, [IMAGE_TOKEN] * per, rng.randint(2, 60, 4)]          # 1 image
  b = np.r_[1, rng.randint(2, 60, 5)]                               # text only
  c = np.r_[1, [IMAGE_TOKEN] * per, 7, [IMAGE_TOKEN] * per, 8, 9]   # 2 images
  t = 2 * per + 12
  ids, seg = np.zeros((2, t), np.int32), np.zeros((2, t), np.int32)
  ids[0, :len(a)], ids[0, len(a):len(a) + len(b)] = a, b            # row 0 packs a and b
  seg[0, :len(a)], seg[0, len(a):len(a) + len(b)] = 1, 2
  ids[1, :len(c)], seg[1, :len(c)] = c, 1
  ids[0, len(a) + len(b):len(a) + len(b) + per] = IMAGE_TOKEN       # dummy slot in padding
  pos = np.zeros_like(ids)
  for r in range(2):
    for s in (1, 2):
      pos[r, seg[r] == s] = np.arange((seg[r] == s).sum())
  loss = ((seg > 0) & (ids != IMAGE_TOKEN)).astype(np.int32)
  px = np.stack([img(), np.zeros((28, 28, 3), np.float32), img(), img()])  # row-major slots
  batch = {"input_ids": ids, "attention_mask": (seg > 0).astype(np.int32), "segment_ids": seg,
           "positions": pos, "loss_mask": loss, "pixel_values": px,
           "image_valid": np.array([1, 0, 1, 1])}
  pattern = r"llm/layers/attn/q_proj/kernel|projector/linear_1/kernel|vision/.*fc1/kernel"
  leaves = leaves_matching(params, pattern)
  got, n = fisher.fisher_from_batches(model, {"params": params, "adapters": {}}, leaves,
                                      [batch], chunk=2)
  assert n == 3
  mk = lambda x, imgs: {"input_ids": x.astype(np.int32), "loss_mask": (
      x != IMAGE_TOKEN).astype(np.int32), **({"pixel_values": imgs} if imgs is not None else {})}
  samples = [mk(a, px[:1]), mk(b, None), mk(c, px[2:])]
  for s in samples:
    s["loss_mask"][0] = 0
  ref = _loop_fisher(model, params, samples, sorted(got))
  assert sorted(got) == sorted("params/" + p for p, m in select.flatten(leaves["params"]).items()
                               if m)
  for p in got:
    np.testing.assert_allclose(np.asarray(got[p]), ref[p], rtol=1e-5, atol=1e-6 * ref[p].max(),
                               err_msg=p)


def test_text_model_chunked_fisher_equals_per_sample_loop():
  model, params, batch = tiny_lm()
  batch = {**batch, "loss_mask": np.ones_like(batch["input_ids"])}
  batch["loss_mask"][:, :4] = 0  # prompt
  leaves = leaves_matching(params, r"llm/layers/mlp/.*")
  got, _ = fisher.fisher_from_batches(model, {"params": params, "adapters": {}}, leaves,
                                      [batch], chunk=2)
  samples = [{"input_ids": batch["input_ids"][i], "loss_mask": batch["loss_mask"][i]}
             for i in range(2)]
  ref = _loop_fisher(model, params, samples, sorted(got))
  for p in got:
    np.testing.assert_allclose(np.asarray(got[p]), ref[p], rtol=1e-5, atol=1e-6 * ref[p].max(),
                               err_msg=p)


SHARD_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from mllm_tune.train import sharding as shard_lib
    from mllm_tune.importance import fisher
    from mllm_tune import pytree as select
    from tests.helpers.tiny_models import leaves_matching, tiny_lm
    assert jax.device_count() == 8
    model, params, batch = tiny_lm()
    rng = np.random.RandomState(0)
    ids = rng.randint(1, 60, size=(16, 10)).astype(np.int32)
    b = {{"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}}
    leaves = leaves_matching(params, r"llm/layers/(attn|mlp)/.*kernel|llm/embed/embedding")
    one, _ = fisher.fisher_from_batches(model, {{"params": params, "adapters": {{}}}}, leaves, [b],
                                        chunk=8)
    out = {{}}
    for name, shape in {{"data_fsdp_tensor": (2, 2, 2)}}.items():
      mesh = shard_lib.make_mesh(*shape)
      sfn = shard_lib.sharding_fn(mesh)
      sharded = jax.tree_util.tree_map_with_path(
          lambda p, x: jax.device_put(x, sfn("/".join(k.key for k in p), x.shape)), params)
      got, _ = fisher.fisher_from_batches(model, {{"params": sharded, "adapters": {{}}}}, leaves,
                                          [b], chunk=8, mesh=mesh)
      q = got["params/llm/layers/attn/q_proj/kernel"]
      out[name] = {{"err": max(float(np.max(np.abs(np.asarray(got[p]) - np.asarray(one[p])))
                                     / np.max(np.asarray(one[p]))) for p in one),
                    "n_shards": len({{str(s.index) for s in q.addressable_shards}})}}
    print("RESULT" + json.dumps(out))
""")


def test_sharded_over_8_devices_gives_the_same_fisher():
  res = subprocess.run([sys.executable, "-c", SHARD_SCRIPT.format(root=ROOT)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=cpu_env(8))
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.split("RESULT")[1])
  for name, r in out.items():
    assert r["err"] < 1e-5, (name, r)
    assert r["n_shards"] > 1, (name, r)  # the Fisher is sharded like its parameter


def _save(path, scores, model):
  importance_store.save_importance(str(path), scores, kind="empirical", model_config=model.config,
                         base_fingerprint="abc", base_path="tiny:0", num_examples=4)


def test_file_roundtrip_and_errors_name_the_file_and_leaf(tmp_path):
  model, params, _ = tiny_lm()
  flat = select.flatten(params)
  shapes = {"params/" + p: x.shape for p, x in flat.items()}
  key = "params/llm/layers/mlp/up_proj/kernel"
  scores = {key: jnp.abs(flat["llm/layers/mlp/up_proj/kernel"])}
  _save(tmp_path / "ok", scores, model)
  back, meta = importance_store.load_importance(str(tmp_path / "ok"), expect_shapes=shapes,
                                      model_config=model.config, base_fingerprint="abc")
  np.testing.assert_array_equal(np.asarray(back[key]), np.asarray(scores[key]))
  assert meta["num_examples"] == 4 and meta["leaves"][key]["shape"] == [2, 32, 48]
  with pytest.raises(fisher.ImportanceError, match=r"ok/importance.json: leaf "
                                                   r"'params/llm/layers/mlp/up_proj/kernel' has "
                                                   r"shape \(2, 32, 48\) in the file but"):
    importance_store.load_importance(str(tmp_path / "ok"), expect_shapes={key: (2, 32, 64)})
  with pytest.raises(fisher.ImportanceError, match=r"ok/importance.json: leaf 'params/llm/lay"
                                                   r"ers/mlp/up_proj/kernel' is not a param"):
    importance_store.load_importance(str(tmp_path / "ok"), expect_shapes={})
  other, _, _ = tiny_llava()
  with pytest.raises(fisher.ImportanceError, match=r"ok/importance.json: computed for a model "
                                                   r"with config hash .*another architecture"):
    importance_store.load_importance(str(tmp_path / "ok"), model_config=other.config)
  with pytest.raises(fisher.ImportanceError, match=r"ok/importance.json: computed on base "
                                                   r"'tiny:0' \(fingerprint abc\)"):
    importance_store.load_importance(str(tmp_path / "ok"), base_fingerprint="xyz")
  with pytest.raises(fisher.ImportanceError, match=r"/nan: leaf '.*up_proj/kernel' holds 1 "
                                                   r"NaN/Inf"):
    _save(tmp_path / "nan", {key: scores[key].at[0, 0, 0].set(jnp.nan)}, model)
  _save(tmp_path / "nan", scores, model)  # a file corrupted after it was written
  import orbax.checkpoint as ocp
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(str(tmp_path / "nan" / "tensors"), select.unflatten(
      {key: scores[key].at[1, 2, 3].set(jnp.nan)}), force=True)
  ckptr.wait_until_finished()
  with pytest.raises(fisher.ImportanceError, match=r"nan/importance.json: leaf "
                                                   r"'params/llm/layers/mlp/up_proj/kernel' "
                                                   r"holds 1 NaN/Inf entries"):
    importance_store.load_importance(str(tmp_path / "nan"))
  with pytest.raises(fisher.ImportanceError, match="no importance.json"):
    importance_store.load_importance(str(tmp_path))


def test_online_ewc_accumulates_two_stages_like_numpy():
  rng = np.random.RandomState(0)
  f1, f2, f3 = (rng.rand(3, 4).astype(np.float32) for _ in range(3))
  acc = fisher.online_update({"w": f1}, {"w": f2}, gamma=0.5)
  acc = fisher.online_update(acc, {"w": f3}, gamma=0.5)
  np.testing.assert_allclose(np.asarray(acc["w"]), 0.25 * f1 + 0.5 * f2 + f3, rtol=1e-6)
  with pytest.raises(fisher.ImportanceError, match=r"gamma must be in \(0, 1\]"):
    fisher.online_update({"w": f1}, {"w": f2}, gamma=0.0)


def test_magnitude_importances_are_spider_and_lorasculpt_ones():
  x = jnp.asarray(np.random.RandomState(0).randn(2, 6, 5), jnp.float32)
  from mllm_tune.importance import magnitude
  from mllm_tune.tuning.reparam import lorasculpt
  np.testing.assert_array_equal(magnitude.weight_magnitude(x, True), spider.importance(x, True))
  np.testing.assert_array_equal(magnitude.cmr_weight(x, 2.0), lorasculpt.cmr_weight(x, 2.0))
  w, ex, variables, leaves = _problem(6)

  def nll(v, b):
    z = b["x"] @ v["params"]["head"]["kernel"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), b["y"][:, None], -1))
  from mllm_tune.tuning.selective.grad_topk import importance_scores
  got = importance_scores(nll, variables, [ex], leaves, kind="grad_abs")
  g = jax.grad(nll)(variables, ex)["params"]["head"]["kernel"]
  np.testing.assert_allclose(got["params/head/kernel"], np.abs(g), rtol=1e-6)


PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    pid, port, root, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{{port}}", 2, pid)
    sys.path.insert(0, root)
    import numpy as np
    from jax.experimental import multihost_utils
    from mllm_tune.importance import fisher
    from mllm_tune.train import sharding as shard_lib
    from tests.helpers.tiny_models import leaves_matching, tiny_lm
    model, params, _ = tiny_lm()
    with open(sys.argv[5]) as f:
      ex = {{k: np.asarray(v, np.int32) for k, v in json.load(f).items()}}
    mine = {{k: v[:3] if pid == 0 else v[3:] for k, v in ex.items()}}  # 3 and 5 examples
    leaves = leaves_matching(params, r"llm/layers/(attn|mlp)/.*kernel")
    res = {{}}
    for name, shape, kinds in (("data4", (4, 1, 1), ("empirical", "true", "mas")),
                               ("data2_tensor2", (2, 1, 2), ("true",))):
      mesh = shard_lib.make_mesh(*shape)
      sfn = shard_lib.sharding_fn(mesh)
      sharded = jax.tree_util.tree_map_with_path(
          lambda p, x: jax.device_put(x, sfn("/".join(k.key for k in p), x.shape)), params)
      for kind in kinds:
        got = fisher.importance(fisher.lm_logits_fn(model), {{"params": sharded, "adapters": {{}}}},
                                leaves, mine, kind, chunk=3, rng=jax.random.key(5), mesh=mesh)
        res[name + " " + kind] = {{p: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                                   .tolist() for p, x in got.items()}}
    def error_of(fn):
      try:
        fn()
      except fisher.ImportanceError as e:
        return str(e)
    no_answers = dict(ex, loss_mask=np.zeros_like(ex["loss_mask"]))
    res["error_no_samples"] = error_of(lambda: fisher.collect_examples(
        [no_answers if pid == 1 else ex], 8))
    res["error_tensor_only"] = error_of(lambda: fisher.importance(
        fisher.lm_logits_fn(model), {{"params": params, "adapters": {{}}}}, leaves, mine,
        mesh=shard_lib.make_mesh(1, 1, 4)))
    from mllm_tune.train import penalty_setup  # a file process 1 cannot see (unshared disks)
    saved = sys.argv[6] + ("" if pid == 0 else "_elsewhere")
    try:
      res["unshared_file"] = sorted(penalty_setup.load_on_every_process(saved))
    except Exception as e:
      res["unshared_file"] = f"{{type(e).__name__}}: {{e}}"
    with open(out_path % pid, "w") as f:
      json.dump(res, f)
""")


def _examples(n: int = 8, t: int = 10) -> dict:
  rng = np.random.RandomState(3)
  ids = rng.randint(1, 60, size=(n, t))
  loss = (np.arange(t)[None] >= rng.randint(2, 6, size=(n, 1))).astype(np.int32)
  ones = np.ones((n, t), np.int32)
  return {"input_ids": ids.tolist(), "attention_mask": ones.tolist(),
          "positions": np.broadcast_to(np.arange(t), (n, t)).tolist(),
          "segment_ids": ones.tolist(), "loss_mask": loss.tolist()}


def test_importance_over_two_processes_with_uneven_counts_equals_the_weighted_mean(tmp_path):
  """`fisher.importance` in two jax.distributed processes (2 CPU devices each) holding 3 and 5
  examples, on a data-parallel mesh (and one with tensor parallelism inside each process, kind
  "true"): for every kind it is the count-weighted mean of each process's own one-process
  importance (kind "true" with that process's folded key), so padding, the keys and the total count are right.
  A process without samples fails on both processes with its reason (no hang); a mesh whose
  batch axes do not span the processes is refused; an importance file that only process 0 can
  read makes both raise."""
  import socket
  from tests.helpers.tiny_models import leaves_matching, tiny_lm
  ex = _examples()
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with open(tmp_path / "examples.json", "w") as f:
    json.dump(ex, f)
  env = cpu_env(2)
  out = str(tmp_path / "out%d.json")
  saved = str(tmp_path / "importance")
  importance_store.save_importance(saved, {"params/w": np.ones((2, 3), np.float32)},
                                   kind="empirical")
  procs = [subprocess.Popen([sys.executable, "-c", PROCESS_SCRIPT.format(), str(i), str(port),
                             ROOT, out, str(tmp_path / "examples.json"), saved], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  errs = [p.communicate(timeout=600)[1] for p in procs]
  assert all(p.returncode == 0 for p in procs), errs[0][-3000:] + errs[1][-3000:]
  res = [json.load(open(out % i)) for i in range(2)]
  model, params, _ = tiny_lm()
  leaves = leaves_matching(params, r"llm/layers/(attn|mlp)/.*kernel")
  arrays = {k: np.asarray(v, np.int32) for k, v in ex.items()}
  parts = [{k: v[:3] for k, v in arrays.items()}, {k: v[3:] for k, v in arrays.items()}]
  for kind in ("empirical", "true", "mas"):
    own = [fisher.importance(fisher.lm_logits_fn(model), {"params": params, "adapters": {}},
                             leaves, part, kind, chunk=3,
                             rng=jax.random.fold_in(jax.random.key(5), p))
           for p, part in enumerate(parts)]
    for name in ("data4", "data2_tensor2") if kind == "true" else ("data4",):
      got = res[0][f"{name} {kind}"]
      assert got == res[1][f"{name} {kind}"] and set(got) == set(own[0])
      for p in got:
        want = (3 * np.asarray(own[0][p]) + 5 * np.asarray(own[1][p])) / 8
        np.testing.assert_allclose(np.asarray(got[p]), want, rtol=1e-4,
                                   atol=1e-6 * np.abs(want).max(), err_msg=f"{name} {kind} {p}")
  # the process without samples raises its own error, the other one names it
  assert "process 1: ImportanceError: no sample with answer tokens" in res[0]["error_no_samples"]
  assert "no sample with answer tokens in this process" in res[1]["error_no_samples"]
  assert all("batch axes" in r["error_tensor_only"] for r in res)
  # an importance file only process 0 sees: both raise (no hang), the other naming process 1
  assert res[0]["unshared_file"].startswith(f"ImportanceError: importance file {saved}: "
                                            "process 1: ")
  assert f"{saved}_elsewhere" in res[1]["unshared_file"]
