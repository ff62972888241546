"""Image preprocessing equals transformers' CLIP / SigLIP / LLaVA (pad) image processors."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from mllm_tune.data.errors import DataError
from mllm_tune.data.images import ImageSpec, decode_image, preprocess
from tests.helpers.data import image_bytes

# (width, height, mode, format): landscape, portrait, RGBA with transparency, grayscale, JPEG,
# smaller than the crop, already square
IMAGES = [(50, 37, "RGB", "PNG"), (23, 61, "RGBA", "PNG"), (30, 30, "L", "PNG"),
          (64, 48, "RGB", "JPEG"), (10, 7, "RGB", "PNG"), (41, 41, "RGB", "JPEG")]


def _images():
  return [decode_image(image_bytes(w, h, i, mode, fmt)) for i, (w, h, mode, fmt)
          in enumerate(IMAGES)]


def _hf_nhwc(processor, images) -> np.ndarray:
  out = processor(images, return_tensors="np")["pixel_values"]
  return np.asarray(out).transpose(0, 2, 3, 1)


CASES = {
    "clip": (CLIPImageProcessorPil(size={"shortest_edge": 28},
                                   crop_size={"height": 28, "width": 28}), ImageSpec.clip(28)),
    "clip_crop_larger_than_resize": (
        CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 24, "width": 26}),
        ImageSpec(shortest_edge=20, crop_height=24, crop_width=26)),
    "siglip": (SiglipImageProcessorPil(size={"height": 32, "width": 32}), ImageSpec.siglip(32)),
    "llava_pad": (LlavaImageProcessorPil(size={"shortest_edge": 28}, do_pad=True,
                                         crop_size={"height": 28, "width": 28}),
                  ImageSpec.clip(28, aspect="pad")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_pixels_equal_transformers_image_processor(name):
  processor, spec = CASES[name]
  images = _images()
  ref = _hf_nhwc(processor, images)
  ours = preprocess(images, spec)
  assert ours.shape == ref.shape and ours.dtype == np.float32
  assert np.abs(ours - ref).max() <= 1e-5
  assert ref.std() > 0.1  # real content, not a constant


@pytest.mark.parametrize("name", sorted(CASES))
def test_spec_read_from_a_saved_preprocessor_config(tmp_path, name):
  processor, spec = CASES[name]
  processor.save_pretrained(tmp_path)
  loaded = ImageSpec.from_pretrained(str(tmp_path))
  assert loaded == spec
  np.testing.assert_array_equal(preprocess(_images(), loaded), preprocess(_images(), spec))


@pytest.mark.parametrize("name", sorted(CASES))
def test_spec_read_from_a_transformers5_processor_directory(tmp_path, name):
  """transformers 5 `LlavaProcessor.save_pretrained` writes the image processor into
  processor_config.json ("image_processor") and no preprocessor_config.json."""
  from transformers import LlavaProcessor
  from tests.helpers.data import chatml_tokenizer
  processor, spec = CASES[name]
  LlavaProcessor(processor, chatml_tokenizer(), patch_size=14,
                 vision_feature_select_strategy="default").save_pretrained(tmp_path)
  files = os.listdir(tmp_path)
  assert "processor_config.json" in files and "preprocessor_config.json" not in files
  loaded = ImageSpec.from_pretrained(str(tmp_path))
  assert loaded == spec
  np.testing.assert_array_equal(preprocess(_images(), loaded), _hf_nhwc(processor, _images()))


def test_directory_without_an_image_processor_names_both_layouts(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"preprocessor_config.json \(transformers 4\) "
                     r"nor processor_config.json with an 'image_processor' section"):
    ImageSpec.from_pretrained(str(tmp_path))
  (tmp_path / "processor_config.json").write_text(json.dumps({"patch_size": 14}))
  with pytest.raises(ValueError, match=r"processor_config.json: no 'image_processor' section"):
    ImageSpec.from_pretrained(str(tmp_path))
  (tmp_path / "processor_config.json").write_text('{"image_processor": {,}}')
  with pytest.raises(ValueError, match=r"processor_config.json:1:\d+: malformed JSON"):
    ImageSpec.from_pretrained(str(tmp_path))


def test_pad_mode_fills_with_the_mean_colour_like_llava_expand2square():
  img = Image.new("RGB", (40, 20), (0, 0, 0))
  px = preprocess([img], ImageSpec(shortest_edge=40, crop_height=40, crop_width=40,
                                   do_normalize=False, aspect="pad"))[0]
  mean255 = np.array([int(m * 255) for m in ImageSpec().mean]) / 255
  np.testing.assert_allclose(px[0, 20], mean255, atol=1e-6)     # top band: background
  np.testing.assert_allclose(px[20, 20], 0.0, atol=1e-6)        # centre: the image
  np.testing.assert_allclose(px[39, 20], mean255, atol=1e-6)    # bottom band


def test_corrupt_image_is_reported_with_its_location():
  good = image_bytes(8, 8, 0, "RGB", "PNG")
  with pytest.raises(DataError, match=r"data.json record 3 \(id=a\): image x.png: cannot "
                                      r"decode image") as e:
    decode_image(good[: len(good) // 2], "data.json record 3 (id=a): image x.png")
  assert e.value.reason == "corrupt_image"
  with pytest.raises(DataError, match="cannot decode image"):
    decode_image(b"not an image at all", "somewhere")


def test_malformed_preprocessor_config_names_file_and_line(tmp_path):
  (tmp_path / "preprocessor_config.json").write_text('{\n  "size": {"shortest_edge": 28},\n  x\n}')
  with pytest.raises(ValueError, match=r"preprocessor_config.json:3:3: malformed JSON"):
    ImageSpec.from_pretrained(str(tmp_path))
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(
      {"image_processor_type": "CLIPImageProcessor", "size": {"longest_edge": 30}}))
  with pytest.raises(ValueError, match="longest_edge"):
    ImageSpec.from_pretrained(str(tmp_path))


def test_decode_loads_lazily_opened_files_fully():
  img = decode_image(image_bytes(12, 9, 1, "RGB", "JPEG"))
  assert img.size == (12, 9)
  buf = io.BytesIO()
  img.save(buf, "PNG")  # works only if the pixels were loaded


def test_legacy_feature_extractor_config_with_int_sizes():
  """openai/clip-vit-large-patch14-336 (LLaVA-1.5's tower) still ships this older format."""
  legacy = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": 336,
            "image_mean": list(ImageSpec().mean), "image_std": list(ImageSpec().std)}
  assert ImageSpec.from_hf(legacy) == ImageSpec.clip(336)
  assert ImageSpec.from_hf(legacy, aspect="pad") == ImageSpec.clip(336, aspect="pad")
