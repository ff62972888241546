"""Data pipeline: LLaVA-format conversations -> fixed-shape (packed) batches for `jit`.

    from mllm_tune import data
    batches = data.make_batches(cfg.data, model_dir, model.config)  # configs/data/*.py
    batch = next(batches)        # input_ids, attention_mask, positions, segment_ids, loss_mask
                                 # (B, T); pixel_values (M, H, W, 3), image_valid (M,)
    state = batches.get_state()  # JSON-able; batches.set_state(state) resumes exactly

or piece by piece:

    source = data.LlavaJsonSource("llava_instruct.json", "images/", on_error="skip")
    prepare = data.SamplePreparer.from_pretrained(model_dir, model.config, max_len=2048)
    spec = data.BatchSpec(batch_size=8, max_len=2048, packing=True, max_images=20,
                          image_seq_len=model.config.image_seq_len,
                          image_token_id=model.config.image_token_id, image_hw=prepare.image_hw)
    batches = data.Prefetcher(data.BatchIterator(source, prepare, spec, prepare.image_spec,
                                                 seed=0, on_error="skip", num_workers=2))

Modules: `conversation` (chat templates, tokens, loss masks; `messages`: turns and spans),
`images` (CLIP / SigLIP / LLaVA preprocessing), `anyres_images` (LLaVA-NeXT / OneVision),
`qwen_images` (Qwen2-VL / 2.5-VL), `qwen_videos` (Qwen-VL videos as frames), `qwen_batch` (Qwen
patch-buffer batches), `anyres_batch` (anyres crop batches), `sources` (JSON / JSONL / tfds),
`pipeline` (record -> sample; `qwen_samples` / `anyres_samples` for Qwen-VL / NeXT and
OneVision records), `samples` (Sample, length
policy), `packing` (batch layout, image slots, packing), `batching` (iterator, resume, prefetch),
`targets` (the loss-mask convention and the reference next-token loss), `loader` (config ->
iterator).
"""
from mllm_tune.data.batching import BatchIterator, Prefetcher, epoch_order
from mllm_tune.data.conversation import (BUILTIN_TEMPLATES, ChatTokenizer, TokenizedConversation,
                                         load_tokenizer, to_messages)
from mllm_tune.data.errors import DataError, SkipReport
from mllm_tune.data.images import ImageSpec, normalize, preprocess, resize_and_crop
from mllm_tune.data.loader import make_batches
from mllm_tune.data.packing import (BatchSpec, Item, Planner, assemble, batch_density, pack_rows,
                                    suggest_max_images)
from mllm_tune.data.pipeline import Sample, SamplePreparer, fit_length, qwen_preparer
from mllm_tune.data.anyres_batch import assemble_anyres
from mllm_tune.data.qwen_batch import assemble_qwen
from mllm_tune.data.qwen_images import QwenImageSpec, preprocess_qwen, smart_resize
from mllm_tune.data.sources import LlavaJsonSource, Source, TfdsSource, build_tfds
from mllm_tune.data.targets import next_token_nll, segment_losses

__all__ = [
    "BatchIterator", "Prefetcher", "epoch_order", "BUILTIN_TEMPLATES", "ChatTokenizer",
    "TokenizedConversation", "load_tokenizer", "to_messages", "DataError", "SkipReport",
    "ImageSpec", "normalize", "preprocess", "resize_and_crop", "BatchSpec", "Item", "Planner",
    "assemble", "batch_density", "pack_rows", "suggest_max_images", "Sample", "SamplePreparer",
    "fit_length", "qwen_preparer", "assemble_anyres", "assemble_qwen", "QwenImageSpec",
    "preprocess_qwen",
    "smart_resize", "LlavaJsonSource", "Source", "TfdsSource", "build_tfds", "next_token_nll",
    "segment_losses", "make_batches"]
