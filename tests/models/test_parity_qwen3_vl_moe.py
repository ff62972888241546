"""Qwen3-VL-MoE against transformers: the router, logits, gradients of every weight kind,
greedy generation, checkpoints both ways in both expert orientations (transformers 5's and the
hub's) and PEFT, on the padded three-row batch of `tests/helpers/qwen3_vl_tiny.py` (a row of two
images of different grids, a one-image row, a text-only row)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mllm_tune as mt
from mllm_tune.checkpoints.safetensors_io import CheckpointError
from mllm_tune.models.config import ConfigError, config_from_dict, config_from_hf, config_to_dict
from mllm_tune.models.moe import route, routed_experts
from mllm_tune.tuning.api import MethodError
from mllm_tune.tuning.peft import peft_adapter
from tests.helpers import qwen3_vl_tiny as q3
from tests.helpers import qwen_vl_tiny as qt
from tests.helpers.hf_parity import (assert_same_tensors, check_peft_lora_both_ways,
                                     safetensors_tensors)

ATOL = 1e-4
SIDES = ["right", "left", "right"]
MLP0 = "model.language_model.layers.0.mlp."


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  """(transformers model, its saved directory, our model, params)."""
  hf_model = q3.qwen3_vl_moe()
  d = str(tmp_path_factory.mktemp("qwen3_vl_moe") / "hf")
  hf_model.save_pretrained(d)
  return hf_model, d, *mt.load_pretrained(d)


def test_router_and_experts_match_transformers_block(loaded):
  """`route` + `routed_experts` on 64 random rows equal transformers' sparse MoE block (its
  router's top-k ids and renormalised weights, and the per-expert loop's output)."""
  hf_model, _, model, params = loaded
  block = hf_model.model.language_model.layers[1].mlp
  x = np.random.RandomState(0).randn(64, 32).astype(np.float32)
  with torch.no_grad():
    _, ref_w, ref_i = block.gate(torch.tensor(x))
    ref_y = block(torch.tensor(x)[None])[0].numpy()
  mlp = jax.tree.map(lambda a: a[1], params["llm"]["layers"]["mlp"])
  w, i = route(jnp.asarray(x) @ mlp["router"]["kernel"], 2)
  np.testing.assert_array_equal(np.asarray(i), ref_i.numpy())
  np.testing.assert_allclose(np.asarray(w), ref_w.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)
  y = routed_experts(jnp.asarray(x), w, i, mlp["experts_gate_up"], mlp["experts_down"], "silu")
  np.testing.assert_allclose(np.asarray(y), ref_y, atol=1e-5)
  assert len(np.unique(np.asarray(i))) == 6  # every expert is used by some row


def test_logits_and_gradients_match_transformers(loaded):
  hf_model, _, model, params = loaded
  c = model.config
  assert c.model_type == "qwen3_vl_moe" and c.hf_layout == "v5"
  assert (c.llm.num_experts, c.llm.num_experts_per_tok, c.llm.moe_intermediate_size) == (6, 2, 24)
  mlp = params["llm"]["layers"]["mlp"]
  assert mlp["experts_gate_up"].shape == (3, 6, 32, 48) and mlp["experts_down"].shape == (3, 6, 24,
                                                                                         32)
  enc = q3.batch(SIDES)
  kw = mt.hf_inputs(model, enc)
  real = enc["attention_mask"].astype(bool)
  fwd = jax.jit(lambda p: model.apply({"params": p}, **kw))  # one compile for both calls
  ours = np.asarray(fwd(params))
  np.testing.assert_allclose(ours[real], qt.hf_logits(hf_model, enc)[real], atol=ATOL, rtol=0)
  # the routing matters: the same experts in another order give other logits
  perm = {**mlp, "experts_down": mlp["experts_down"][:, ::-1]}
  other = np.asarray(fwd({**params, "llm": {**params["llm"], "layers": {
      **params["llm"]["layers"], "mlp": perm}}}))
  assert np.abs(other - ours)[real].max() > 1e-3

  # gradients of a next-token loss at the real tokens: router, experts, attention, vision
  labels = np.where(real, np.roll(enc["input_ids"], -1, axis=1), -100)
  labels[:, -1] = -100

  def loss(p):
    logp = jax.nn.log_softmax(model.apply({"params": p}, **kw), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.asarray(np.maximum(labels, 0))[..., None], -1)[..., 0]
    return -jnp.sum(jnp.where(labels >= 0, picked, 0.0)) / np.sum(labels >= 0)

  grads = jax.jit(jax.grad(loss))(params)
  hf_model.zero_grad()
  logits = hf_model(**qt.torch_inputs(enc)).logits
  torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(labels).flatten(),
                                    ignore_index=-100).backward()
  lm = hf_model.model.language_model.layers[2]
  g = jax.tree.map(lambda a: np.asarray(a[2]), grads["llm"]["layers"])
  pairs = [(g["mlp"]["router"]["kernel"], lm.mlp.gate.weight.grad.numpy().T),
           (g["mlp"]["experts_gate_up"], lm.mlp.experts.gate_up_proj.grad.numpy().swapaxes(1, 2)),
           (g["mlp"]["experts_down"], lm.mlp.experts.down_proj.grad.numpy().swapaxes(1, 2)),
           (g["attn"]["q_proj"]["kernel"], lm.self_attn.q_proj.weight.grad.numpy().T),
           (np.asarray(grads["vision"]["patch_embed"]["bias"]),
            hf_model.model.visual.patch_embed.proj.bias.grad.numpy())]
  for ours_g, ref_g in pairs:
    assert np.abs(ref_g).max() > 1e-4
    np.testing.assert_allclose(ours_g, ref_g, atol=2e-5 * max(1.0, np.abs(ref_g).max()))


def test_greedy_generation_matches_hf_generate(loaded):
  hf_model, _, model, params = loaded
  enc = q3.batch(SIDES)
  ours = np.asarray(mt.generate(model, params, **mt.hf_inputs(model, enc), max_new_tokens=20,
                                eos_token_id=[]))
  left = q3.batch("left")
  with torch.no_grad():
    ref = hf_model.generate(**qt.torch_inputs(left), max_new_tokens=20, do_sample=False,
                            num_beams=1, pad_token_id=0, eos_token_id=None)
  np.testing.assert_array_equal(ours, ref[:, left["input_ids"].shape[1]:].numpy())
  assert all(len(set(row)) > 2 for row in ours.tolist())


def _hub_files(src: str, dst: str) -> None:
  """`src` with its expert tensors in the hub's orientation ((E, D, 2F), (E, F, D))."""
  os.makedirs(dst)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  save_file({k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v
             for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"),
            metadata={"format": "pt"})
  for name in os.listdir(src):
    if name.endswith(".json"):
      with open(os.path.join(src, name)) as f, open(os.path.join(dst, name), "w") as g:
        g.write(f.read())


def test_checkpoints_both_ways_in_both_expert_layouts(loaded, tmp_path):
  hf_model, src, model, params = loaded
  dst = str(tmp_path / "dst")
  mt.save_pretrained(dst, model, params, max_shard_size="40KB")
  assert_same_tensors(safetensors_tensors(src), safetensors_tensors(dst))
  with open(os.path.join(dst, "config.json")) as f:
    text = json.load(f)["text_config"]
  assert (text["num_local_experts"], text["num_experts"], text["moe_intermediate_size"]) == (
      6, 6, 24)
  back, info = type(hf_model).from_pretrained(dst, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  enc = q3.batch("right")
  ref = qt.hf_logits(type(hf_model).from_pretrained(src).eval(), enc)
  np.testing.assert_array_equal(qt.hf_logits(back.eval(), enc), ref)
  # the hub's orientation: read as such (transformers transposes it too), written back as such
  hub = str(tmp_path / "hub")
  _hub_files(src, hub)
  assert safetensors_tensors(hub)[MLP0 + "experts.gate_up_proj"].shape == (6, 32, 48)
  model_h, params_h = mt.load_pretrained(hub)
  assert model_h.config.hf_layout == "hub_experts"
  for a, b in zip(jax.tree.leaves(params_h), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same weights as read
  np.testing.assert_allclose(qt.hf_logits(type(hf_model).from_pretrained(hub).eval(), enc), ref,
                             atol=1e-6)
  again = str(tmp_path / "hub_again")
  mt.save_pretrained(again, model_h, params_h)
  assert_same_tensors(safetensors_tensors(hub), safetensors_tensors(again))
  # an expert tensor of the wrong shape names the file and tensor
  bad = str(tmp_path / "bad")
  _hub_files(src, bad)
  tensors = load_file(os.path.join(bad, "model.safetensors"))
  tensors[MLP0 + "experts.down_proj"] = tensors[MLP0 + "experts.down_proj"][:, :, :20].contiguous()
  save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*experts.down_proj'"):
    mt.load_pretrained(bad)


def test_configs_round_trip_and_errors(loaded):
  hf_model = loaded[0]
  saved = hf_model.config.to_dict()
  cfg = config_from_hf(saved)
  # transformers writes the text config's own tie flag (True) but ties on the top-level one
  assert saved["text_config"]["tie_word_embeddings"] and not saved["tie_word_embeddings"]
  assert not cfg.llm.tie_word_embeddings and "lm_head" in loaded[3]["llm"]
  assert not hf_model.config.tie_word_embeddings
  assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
  hub_text = {k: v for k, v in saved["text_config"].items() if k != "num_local_experts"}
  hub = config_from_hf(dict(saved, text_config=dict(hub_text, num_experts=6)))
  assert hub.llm == cfg.llm
  bare = dict(saved, text_config={k: v for k, v in saved["text_config"].items()
                                  if k not in ("num_local_experts", "num_experts_per_tok",
                                               "moe_intermediate_size", "head_dim")})
  bare["text_config"]["hidden_size"] = 64  # head_dim 16 = the M-RoPE sections' 2 x 8
  bare["vision_config"] = dict(saved["vision_config"], out_hidden_size=64)
  llm = config_from_hf(bare).llm  # transformers' Qwen3VLMoeTextConfig defaults
  assert (llm.num_experts, llm.num_experts_per_tok, llm.moe_intermediate_size) == (60, 4, 1408)
  assert llm.head_dim == 64 // 4  # None there: hidden / heads
  with pytest.raises(ConfigError, match="num_experts 7 and num_local_experts 6"):
    config_from_hf(dict(saved, text_config=dict(saved["text_config"], num_experts=7)))
  for field, value in (("decoder_sparse_step", 2), ("mlp_only_layers", [1])):
    with pytest.raises(ConfigError, match=f"text_config.*{field}"):
      config_from_hf(dict(saved, text_config=dict(saved["text_config"], **{field: value})))
  with pytest.raises(ConfigError, match="config.json:text_config: num_experts_per_tok 7"):
    config_from_hf(dict(saved, text_config=dict(saved["text_config"], num_experts_per_tok=7)))
  dense = dict(saved, model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"])
  with pytest.raises(ConfigError, match="'qwen3_vl_moe'"):
    config_from_hf(dense)


def test_peft_lora_both_ways_with_logit_parity(loaded, tmp_path):
  """PEFT LoRA on the LLM's q / v, the vision blocks' fused qkv and, through
  `target_parameters`, per expert on both expert stacks (peft nests the two wrappers of one
  module: gate_up's factors sit under `experts.base_layer.`), both ways; merging the imported
  adapters into the weights gives the same logits."""
  _, base_dir, model, params = loaded
  method, variables = check_peft_lora_both_ways(
      q3.qwen3_vl_moe(), base_dir, model, params, q3.batch(SIDES), qt.hf_logits,
      q3.qwen3_vl_moe, tmp_path,
      target_modules=r".*(language_model.*\.(q_proj|v_proj)|visual.*\.qkv)",
      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
  assert {f"llm/layers_1/mlp/experts_{n}" for n in ("gate_up", "down")} <= set(method.targets)
  kw = mt.hf_inputs(model, q3.batch(SIDES))
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(np.asarray(apply({"params": method.merge(variables)}, **kw)),
                             np.asarray(apply(variables, **kw)), atol=1e-5)
  # peft's ParamWrapper has no dropout or DoRA: refused, with the stacks named
  with pytest.raises(MethodError, match="experts_down.*only plain LoRA"):
    mt.tuning.get("dora", targets=r"llm/layers_\d+/mlp/experts_down").init_variables(
        jax.random.key(0), params)
  drop = mt.tuning.get("lora", rank=2, dropout=0.1, targets=r"llm/layers_0/mlp/experts_down")
  with pytest.raises(MethodError, match=r"experts.down_proj, ...\) with dropout 0.1"):
    peft_adapter(model, drop, drop.init_variables(jax.random.key(0), params))
  # our LoRA can reach the router (a Linear here); transformers' router is no nn.Linear
  method = mt.tuning.get("lora", rank=2, targets=r"llm/layers_\d+/mlp/router")
  variables = method.init_variables(jax.random.key(0), params)
  with pytest.raises(MethodError, match="router is not an nn.Linear in transformers"):
    peft_adapter(model, method, variables)


def test_experts_only_lora_with_a_rank_pattern_exports_to_peft(loaded, tmp_path):
  """LoRA on the expert stacks only, one layer's down stack at a larger rank (`rank_pattern`,
  written as peft's per-parameter pattern): peft loads the export onto a fresh transformers
  model (no target_modules) with our logits, and importing it back gives them again. Broad
  regexes keep meaning Linear modules (a stack is reached only by a pattern naming `experts`),
  and a stack both LoRA-wrapped and trained in full is refused at export."""
  from peft import PeftModel
  from mllm_tune.tuning.peft import export_peft, import_peft
  from tests.helpers.peft_ref import randomize
  _, base_dir, model, params = loaded
  down1 = r"llm/layers_1/mlp/experts_down"
  method = mt.tuning.get("lora", rank=2, alpha=4, rank_pattern=((down1, 3),),
                         targets=r"llm/layers_\d+/mlp/experts_(gate_up|down)")
  v = method.init_variables(jax.random.key(0), params)
  v = {**v, "adapters": randomize(v["adapters"], ("lora_b",))}
  enc = q3.batch(SIDES)
  kw, real = mt.hf_inputs(model, enc), enc["attention_mask"].astype(bool)
  apply = jax.jit(model.apply)
  ours = np.asarray(apply(v, **kw))
  out = str(tmp_path / "experts")
  export_peft(out, model, method, v, base_model_name_or_path=base_dir)
  with open(os.path.join(out, "adapter_config.json")) as f:
    cfg = json.load(f)
  assert cfg["target_modules"] == [] and len(cfg["target_parameters"]) == 6
  assert cfg["rank_pattern"] == {r"model\.language_model\.layers\.1\.mlp\.experts\.down_proj": 3}
  peft_model = PeftModel.from_pretrained(q3.qwen3_vl_moe(), out).eval()
  np.testing.assert_allclose(qt.hf_logits(peft_model, enc)[real], ours[real], atol=ATOL)
  back, bv = import_peft(out, model, params)
  assert back.rank_pattern == (("llm/layers_1/mlp/experts_down", 3),)
  np.testing.assert_allclose(np.asarray(apply(bv, **kw))[real], ours[real], atol=1e-5)
  broad = mt.tuning.get("dora", targets=r"llm/.*").layout(params)
  assert broad and not any("experts" in p for p in broad)
  both = mt.tuning.compose(
      mt.tuning.get("lora", rank=2, targets=r"llm/layers_\d+/mlp/experts_gate_up"),
      mt.tuning.get("freeze", targets=r"llm/layers_\d+/mlp/experts_down"))
  with pytest.raises(MethodError, match="carry LoRA and are also trained in full"):
    peft_adapter(model, both, both.init_variables(jax.random.key(0), params))


def test_expert_tensors_are_sharded_by_expert_and_over_the_model_width(loaded):
  """The sharding rules place the stacked experts' E axis on `expert` (expert parallelism) and
  their D axis on `fsdp` (gate/up columns whole)."""
  from mllm_tune.train.sharding import make_mesh, spec_for
  mesh = make_mesh(data=1, fsdp=1, tensor=1)
  mlp = loaded[3]["llm"]["layers"]["mlp"]
  assert tuple(spec_for("llm/layers/mlp/experts_gate_up", mlp["experts_gate_up"].shape,
                        mesh)) == (None, "expert", "fsdp", None)
  assert tuple(spec_for("llm/layers/mlp/experts_down", mlp["experts_down"].shape,
                        mesh)) == (None, "expert", None, "fsdp")
  # per-expert LoRA factors follow their stack: by expert, A over its input width, B over its
  # output's
  from mllm_tune import pytree
  from mllm_tune.train.sharding import state_shardings
  lora = mt.tuning.get("lora", rank=2, targets=r"llm/layers_\d+/mlp/experts_(gate_up|down)")
  shapes = jax.eval_shape(lambda: lora.init_variables(jax.random.key(0), loaded[3]))
  specs = {k: tuple(v.spec) for k, v in pytree.flatten(state_shardings(shapes, mesh)).items()
           if "/lora_" in k and "scale" not in k}
  stacks = "adapters/llm/layers/mlp/experts_"
  assert specs == {stacks + "gate_up/lora_a": (None, "expert", "fsdp", None),
                   stacks + "gate_up/lora_b": (None, "expert", None, None),
                   stacks + "down/lora_a": (None, "expert", None, None),
                   stacks + "down/lora_b": (None, "expert", None, "fsdp")}


def test_per_sample_gradients_under_vmap_equal_one_sample_at_a_time():
  """Fisher and grad_topk vmap gradients over samples with the weights shared (unbatched):
  `grouped_matmul`'s vmap rules (samples merged into one ragged product; per-sample weight
  gradients as (sample, expert) groups) give each sample's own gradients, also with per-sample
  weights and with experts no row of a sample picks."""
  rng = np.random.RandomState(3)
  xs = jnp.asarray(rng.randn(3, 10, 8), jnp.float32)
  logits = jnp.asarray(rng.randn(3, 10, 5) * 3, jnp.float32)
  logits = logits.at[1, :, 2].add(-100.0)  # sample 1 never picks expert 2
  gate_up = jnp.asarray(rng.randn(5, 8, 12) * 0.3, jnp.float32)
  down = jnp.asarray(rng.randn(5, 6, 8) * 0.3, jnp.float32)

  def loss(x, lg, gu, dn):
    w, i = route(lg, 2)
    return jnp.sum(jnp.sin(routed_experts(x, w, i, gu, dn, "silu")))

  grad = jax.grad(loss, argnums=(0, 1, 2, 3))
  one_by_one = [grad(xs[b], logits[b], gate_up, down) for b in range(3)]
  shared = jax.jit(jax.vmap(grad, in_axes=(0, 0, None, None)))(xs, logits, gate_up, down)
  per_sample_w = jax.jit(jax.vmap(grad))(xs, logits, jnp.stack([gate_up] * 3),
                                         jnp.stack([down] * 3))
  for got in (shared, per_sample_w):
    for k in range(4):
      want = np.stack([np.asarray(g[k]) for g in one_by_one])
      np.testing.assert_allclose(np.asarray(got[k]), want, atol=1e-5)
  assert np.abs(np.asarray(shared[2][1, 2])).max() == 0  # no rows: a zero gradient
  assert np.abs(np.asarray(shared[2][0])).max() > 0


def test_router_balance_loss_matches_transformers_aux_loss(loaded):
  """The router statistics each layer sows give transformers' `aux_loss`
  (`load_balancing_loss_func` with the attention mask) on the padded batch; padding matters."""
  from mllm_tune.losses.router import router_balance_loss
  hf_model, _, model, params = loaded
  enc = q3.batch(SIDES)
  kw = mt.hf_inputs(model, enc)
  _, state = jax.jit(lambda p, kw: model.apply({"params": p}, **kw,
                                               mutable=["intermediates"]))(params, kw)
  ours = float(router_balance_loss(state["intermediates"], enc["attention_mask"]))
  with torch.no_grad():
    ref = float(hf_model(**qt.torch_inputs(enc), output_router_logits=True).aux_loss)
  np.testing.assert_allclose(ours, ref, rtol=1e-5)
  unmasked = float(router_balance_loss(state["intermediates"], np.ones_like(enc["input_ids"])))
  assert abs(unmasked - ours) > 1e-4 and 2.0 <= ours  # k = 2 at perfect balance


def test_router_balance_loss_with_soft_prompts_matches_transformers(loaded):
  """With prompt tuning the soft prompts run once, in a pass of their own, and every sample sees
  them: their router statistics count once per sample (`sample_count`), which is transformers'
  `aux_loss` on the prompts prepended to every row's embeddings (mask ones in front, peft's
  prompt tuning), on a right-padded text batch; the logits of the real tokens agree too."""
  from mllm_tune.losses.router import router_balance_loss, sample_count
  hf_model, _, model, params = loaded
  rng = np.random.RandomState(0)
  ids = rng.randint(5, 100, size=(2, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  method = mt.tuning.get("prompt_tuning", num_virtual_tokens=3, prompt_init="random")
  v = method.init_variables(jax.random.key(2), params)
  prompts = torch.tensor(np.asarray(v["adapters"]["llm"]["prompt_embeddings"]))
  logits, state = model.apply(v, **mt.hf_inputs(model, {"input_ids": ids, "attention_mask": mask}),
                              mutable=["intermediates"])
  assert float(sample_count(mask)) == 2.0
  ours = float(router_balance_loss(state["intermediates"], mask, sample_count(mask)))
  hf_model.model.rope_deltas = None  # text positions, not the cached deltas of earlier batches
  with torch.no_grad():
    embeds = hf_model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))
    out = hf_model(inputs_embeds=torch.cat([prompts[None].expand(2, -1, -1), embeds], 1),
                   attention_mask=torch.tensor(np.pad(mask, ((0, 0), (3, 0)),
                                                      constant_values=1)),
                   output_router_logits=True)
  np.testing.assert_allclose(ours, float(out.aux_loss), rtol=1e-5)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], out.logits[:, 3:].numpy()[real],
                             atol=ATOL)
  with pytest.raises(ValueError, match=r"their own, then the batch\); give shared_weight"):
    router_balance_loss(state["intermediates"], mask)
  packed = np.asarray([[1, 1, 2, 2, 2, 0], [1, 1, 1, 3, 3, 3]])  # segments: 2 + 2 samples
  assert float(sample_count(packed > 0, packed)) == 4.0
