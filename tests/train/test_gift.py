"""GIFT in the trainer (docs/methods.md §5.3 [choice] MLLM): one step's update is -(g_aux +
grad(L_task + L_AWC)) composed by hand from the pure gift.py functions (full params and LoRA),
L_AWC = 0 at theta = theta_ref, zero weights give plain training bit for bit, static_awc freezes
F, `mllm-tune train` with gift logs its terms, and bad synthetic data or a model without a
tokenizer is refused with the place named."""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import mllm_tune as mt
from mllm_tune.data.conversation import CHATML
from mllm_tune.data.errors import DataError
from mllm_tune.data.pipeline import SamplePreparer
from mllm_tune.data.synthetic_pairs import (PairBatches, PairDirectory, ProceduralPairs,
                                            batch_indices, llava_record)
from mllm_tune.models import build_model, init_params
from mllm_tune.models.config import LLMConfig, LlavaConfig, VisionConfig
from mllm_tune.train import setup, step as step_lib
from mllm_tune.train.loop import Trainer
from mllm_tune.train.synthetic import SyntheticBatches
from mllm_tune.penalties import gift
from mllm_tune.penalties.gift import penalty as gift_trainer
from mllm_tune import penalties
from mllm_tune import pytree as select
from tests.helpers.data import chatml_tokenizer, mixed_records, write_llava_dataset
from tests.helpers.train import tiny_cfg

LORA_TARGETS = r"llm/layers_\d+/(attn/(q|v)_proj|mlp/down_proj)"


@functools.cache
def _assets(root: str):
  """A tiny CLIP-ViT + Llama LLaVA and an HF directory with its weights, a ChatML BPE tokenizer
  (template included) and a CLIP image processor: what `SamplePreparer.from_pretrained` reads."""
  from transformers import CLIPImageProcessor
  tok = chatml_tokenizer(CHATML)
  cfg = LlavaConfig(
      vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          image_size=28, patch_size=14),
      llm=LLMConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256),
      image_token_id=int(tok.convert_tokens_to_ids("<image>")))
  model = build_model(cfg)
  params = init_params(model, jax.random.key(0))
  path = os.path.join(root, "model")
  mt.save_pretrained(path, model, params)
  tok.save_pretrained(path)
  CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
                     ).save_pretrained(path)
  return model, params, path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return _assets(str(tmp_path_factory.mktemp("gift")))


def _caption_batches(model, path, seed, batch_size=2):
  prep = SamplePreparer.from_pretrained(path, model.config, max_len=80)
  return PairBatches(ProceduralPairs(num=8, seed=seed, image_size=24), prep, batch_size,
                     seed=seed)


def _bound(model, params, method, hp: dict, opt):
  variables = method.init_variables(jax.random.key(1), params)
  mask = method.trainable(variables)
  trainable, frozen = mt.tuning.partition(variables, mask)
  bound = consts = None
  if hp is not None:
    bound, consts = penalties.bind(penalties.get("gift", **hp), method, variables, model=model)
    opt = optax.chain(bound.transform(),
                      mt.tuning.build_optimizer(method, variables, mask, trainable, opt))
  else:
    opt = mt.tuning.build_optimizer(method, variables, mask, trainable, opt)
  fns = step_lib.StepFns(model, method, opt, penalty=bound)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                              opt_state=opt.init(trainable), rng=jax.random.key(0))
  return fns, frozen, state, consts


def _method(kind):
  if kind == "lora":
    return mt.tuning.get("lora", rank=4, alpha=8.0, targets=LORA_TARGETS)
  return mt.tuning.get("freeze", preset="full")


def _kw(b):
  return {k: b[k] for k in gift_trainer.MODEL_INPUTS if k in b}


# ----------------------------------------------------------------------------- the step
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_gift_step_is_aux_plus_task_plus_awc_by_hand(assets, kind):
  """SGD lr 1 from drifted weights: new = theta - (g_aux + g_task + g_awc), each term from the
  pure functions; F has mean 1 per tensor (per layer for stacked leaves)."""
  model, params, path = assets
  task = jax.tree.map(jnp.asarray, _caption_batches(model, path, 1).batch(0))
  synth = jax.tree.map(jnp.asarray, _caption_batches(model, path, 2).batch(0))
  hp = dict(weight=0.05, kd_weight=1.0, ita_weight=0.25, temperature=2.0)
  fns, frozen, state, consts = _bound(model, params, _method(kind), hp, optax.sgd(1.0))
  theta_ref = state.trainable
  rng = np.random.RandomState(0)
  drifted = jax.tree.map(lambda x: x + jnp.float32(0.02 * rng.randn(*x.shape)), theta_ref)
  state0 = state
  state = state.replace(trainable=drifted)
  ghp = gift.GiftHparams(2.0, 1.0, 0.25, 0.0, 0.05, 0, ())

  def by_hand(t):
    apply = lambda v, b: model.apply(v, b["input_ids"], **_kw(b))
    ce = lambda q: (lambda s: s[0] / s[1])(step_lib.token_ce(
        apply(mt.tuning.combine(q, frozen), task), task["input_ids"], task["loss_mask"]))
    teacher = apply({"params": params, "adapters": {}}, synth)  # theta0 without adapters
    aux = lambda q: gift.mllm_aux_loss(apply(mt.tuning.combine(q, frozen), synth), teacher,
                                       synth["input_ids"], synth["loss_mask"], ghp)
    (_, terms), g_aux = jax.value_and_grad(aux, has_aux=True)(t)
    f = gift.awc_importance(g_aux, ())
    awc, g_awc = jax.value_and_grad(gift.awc_penalty)(t, theta_ref, f, 0.05)
    return jax.grad(ce)(t), g_aux, g_awc, f, awc, terms

  # one compilation for both (XLA shares their common forward passes)
  run = jax.jit(lambda s: (step_lib.train_step(fns, frozen, s, task, penalty_consts=consts,
                                               penalty_batch=synth), by_hand(s.trainable)))
  (new, metrics), (g_task, g_aux, g_awc, f, awc, terms) = run(state)
  norm = lambda t: float(optax.tree.norm(t))
  assert min(norm(g_aux), norm(g_awc)) > 0.1 * norm(g_task)  # every pass contributes
  for p, got in select.flatten(new.trainable).items():
    t = select.flatten(drifted)[p]
    want = t - (select.flatten(g_task)[p] + select.flatten(g_aux)[p] + select.flatten(g_awc)[p])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-6,
                               err_msg=p)
  for p, x in select.flatten(f).items():  # mean 1 per logical tensor: per layer when stacked
    g = np.asarray(select.flatten(g_aux)[p])
    stacked = select.is_stacked(p.split("/", 1)[1])
    for x_i, g_i in zip(*((np.asarray(x), g) if stacked else ([np.asarray(x)], [g]))):
      want = 1.0 if g_i.any() else gift.EXCLUDED_IMPORTANCE  # e.g. the unused last ViT layer
      np.testing.assert_allclose(x_i.astype(np.float64).mean(), want, rtol=1e-4, err_msg=p)
  np.testing.assert_allclose(float(metrics["loss_terms/gift_awc"]), float(awc), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss_terms/gift_kd"]), float(terms["kd"]), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["loss_terms/gift_ita"]), 0.25 * float(terms["ita"]),
                             rtol=1e-5)
  # theta = theta_ref at step 0: L_AWC = 0 exactly, and the student is the teacher (KD ~ 0)
  (_, m0), _ = run(state0)
  assert float(m0["loss_terms/gift_awc"]) == 0.0
  assert abs(float(m0["loss_terms/gift_kd"])) < 1e-5 < float(m0["loss_terms/gift_ita"])


def test_zero_weights_give_plain_training_bit_for_bit_and_static_awc_freezes_f(assets):
  model, params, path = assets
  data, synth = _caption_batches(model, path, 1), _caption_batches(model, path, 2)
  runs = {}
  for label, hp in [("plain", None), ("zero", dict(weight=0.0, kd_weight=0.0, ita_weight=0.0)),
                    ("static", dict(weight=10.0, static_awc=1))]:
    fns, frozen, state, consts = _bound(model, params, _method("lora"), hp, optax.adam(1e-2))
    step = jax.jit(lambda s, b, pb, fns=fns, frozen=frozen, consts=consts: step_lib.train_step(
        fns, frozen, s, b, penalty_consts=consts, penalty_batch=pb))
    out = []
    for i in range(2):
      state, metrics = step(state, data.batch(i), synth.batch(i))
      out.append((jax.tree.map(np.asarray, state.trainable), metrics))
    runs[label] = (out, state, fns)
  for (a, ma), (b, mb) in zip(runs["plain"][0], runs["zero"][0]):
    assert float(ma["loss"]) == float(mb["loss"])
    assert float(mb["loss_terms/gift_kd"]) == float(mb["loss_terms/gift_awc"]) == 0.0
    for p, x in select.flatten(a).items():
      np.testing.assert_array_equal(select.flatten(b)[p], x, err_msg=p)
  out, state, fns = runs["static"]
  # K = 1: the aux pass runs at step 1 only; F is then frozen and L_AWC keeps pulling
  (_, m1), (_, m2) = out
  assert float(m1["loss_terms/gift_ita"]) > 0.0 == float(m2["loss_terms/gift_ita"])
  assert float(m1["loss_terms/gift_awc"]) == 0.0 < float(m2["loss_terms/gift_awc"])
  (gs,) = [s for s in jax.tree.leaves(state.opt_state,
                                      is_leaf=lambda x: isinstance(x, gift.GiftState))
           if isinstance(s, gift.GiftState)]
  assert int(gs.awc.count) == 2 and float(optax.tree.norm(gs.awc.importance)) > 0


# ----------------------------------------------------------------------------- data and config
def _write_pairs(root, lines: list[str]):
  os.makedirs(root, exist_ok=True)
  rng = np.random.RandomState(0)
  for i in range(3):
    Image.fromarray(rng.randint(0, 256, (20, 24, 3)).astype(np.uint8)).save(
        os.path.join(root, f"{i}.png"))
  with open(os.path.join(root, "captions.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return root


def _pair_lines():
  return [json.dumps({"image": f"{i}.png", "caption": f"a photo of thing {i}", "label": i % 2,
                      **({"prompt": "What is shown?"} if i == 1 else {})}) for i in range(3)]


def test_caption_records_use_the_training_template_and_preprocessing(assets, tmp_path):
  model, _, path = assets
  src = PairDirectory(_write_pairs(str(tmp_path / "pairs"), _pair_lines()))
  rec = llava_record(src, 1)
  assert rec["conversations"] == [{"from": "human", "value": "<image>\nWhat is shown?"},
                                  {"from": "gpt", "value": "a photo of thing 1"}]
  assert llava_record(src, 0)["conversations"][0]["value"] == "<image>\nDescribe the image briefly."
  prep = SamplePreparer.from_pretrained(path, model.config, max_len=80)
  batches = PairBatches(src, prep, 2, seed=3)
  b = batches.batch(5)
  assert b["input_ids"].shape == (2, 80) and b["pixel_values"].shape == (2, 28, 28, 3)
  np.testing.assert_array_equal(b["input_ids"], batches.batch(5)["input_ids"])  # pure in step
  for row, i in enumerate(batch_indices(3, 2, seed=3, step=5)):  # the same tokens and loss mask as the training pipeline's
    s = prep(llava_record(src, int(i)))
    n = len(s.tokens)
    np.testing.assert_array_equal(b["input_ids"][row, :n], s.tokens.input_ids)
    np.testing.assert_array_equal(b["loss_mask"][row, :n], s.tokens.loss_mask)
    assert b["loss_mask"][row].sum() > 0 and b["loss_mask"][row, n:].sum() == 0


def test_config_presets():
  from configs.methods import gift as method_cfg
  from configs.penalties import gift as penalty_cfg
  p = penalties.from_config(penalty_cfg.get_config())
  assert isinstance(p, gift.Gift)
  assert p.hparams == gift.GiftHparams(2.0, 1.0, 0.25, 0.0, 1.0, 0, ())
  assert gift.GiftHparams.from_config(method_cfg.get_config()).awc_weight == p.weight
  with pytest.raises(penalties.PenaltyError, match="static_awc"):
    penalties.get("gift", static_awc=-1)


def test_tiny_model_without_tokenizer_is_refused(tmp_path):
  cfg = tiny_cfg(str(tmp_path / "run"), method="lora", steps=1)
  cfg.penalty.name = "gift"
  with pytest.raises(setup.ConfigValueError, match=r"gift turns synthetic image-caption pairs "
                                                   r".* model.source='tiny' has none"):
    Trainer(cfg, SyntheticBatches(8, 16, 128), progress=False)


# ----------------------------------------------------------------------------- end to end
def _cli(assets, tmp_path, run: str, *extra):
  from mllm_tune.cli import main
  _, _, path = assets
  data = str(tmp_path / "data")
  if not os.path.isdir(data):
    records, images = mixed_records(12)
    write_llava_dataset(data, records, images)
  return main(["train", "--config=configs/experiments/llava_lora.py", "--no-progress",
               f"--config.model.path={path}", f"--config.data.json_path={data}/data.json",
               f"--config.data.image_folder={data}/images", "--config.data.seq_len=96",
               "--config.data.batch_size=2", "--config.data.num_workers=0",
               "--config.data.max_images=4", f"--config.method.targets={LORA_TARGETS}",
               "--config.method.rank=4", "--config.train.log_every=1",
               "--config.train.save_every=0", f"--config.run_dir={tmp_path / run}",
               "--config.optimizer.learning_rate=3e-2", "--config.penalty.name=gift",
               "--config.penalty.synthetic.seq_len=80", *extra])


def test_cli_train_with_gift_logs_its_terms(assets, tmp_path, capsys):
  pairs = _write_pairs(str(tmp_path / "pairs"), _pair_lines())
  code = _cli(assets, tmp_path, "run", "--config.train.steps=3",
              "--config.penalty.synthetic.kind=directory",
              f"--config.penalty.synthetic.path={pairs}")
  assert code == 0, capsys.readouterr().err[-3000:]
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 3
  for key in ("loss_terms/gift_kd", "loss_terms/gift_ita", "loss_terms/gift_awc"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert rows[0]["loss_terms/gift_awc"] == 0.0 < rows[-1]["loss_terms/gift_awc"]
  assert rows[0]["loss_terms/gift_ita"] > 0 and rows[-1]["loss_terms/gift_kd"] > 0


def test_cli_bad_synthetic_data_names_the_place(assets, tmp_path, capsys):
  missing = tmp_path / "nowhere"
  assert _cli(assets, tmp_path, "a", "--config.penalty.synthetic.kind=directory",
              f"--config.penalty.synthetic.path={missing}") == 2
  assert f"{missing}: synthetic pair directory not found" in capsys.readouterr().err
  lines = _pair_lines()
  lines[1] = '{"image": "1.png", "caption": '
  bad = _write_pairs(str(tmp_path / "bad"), lines)
  assert _cli(assets, tmp_path, "b", "--config.penalty.synthetic.kind=directory",
              f"--config.penalty.synthetic.path={bad}") == 2
  assert "captions.jsonl:2: malformed JSON" in capsys.readouterr().err
  with pytest.raises(DataError, match=r"captions\.jsonl:3: field 'prompt'"):
    lines = _pair_lines()
    lines[2] = json.dumps({"image": "2.png", "caption": "c", "label": 0, "prompt": ""})
    PairDirectory(_write_pairs(str(tmp_path / "bad2"), lines))
