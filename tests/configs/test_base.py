"""mllm_tune/configs (the package) and base.py: config files outside the clone import the shipped
configs (`from configs ...` and `from mllm_tune.configs ...`), and `configs/...` paths resolve
from any working directory; the base config and its thin copy agree."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.helpers import ROOT
from tests.helpers.configs import load_both

USER_CONFIG = textwrap.dedent('''\
    """A user's experiment, kept outside the clone."""
    from configs import base
    from configs.methods import lora
    from mllm_tune.configs.data import llava_instruct


    def get_config():
      c = base.get_config()
      c.method = lora.get_config()
      c.data = llava_instruct.get_config()
      c.eval.target.val = base.eval_set("llava_json", json_path="val.json")
      return c
    ''')
SCRIPT = textwrap.dedent('''\
    import json, sys
    from mllm_tune.train.config_io import load_config
    user = load_config("my_config.py")
    shipped = load_config("configs/experiments/tiny_lora.py")
    print(json.dumps({"method": user.method.name, "data": user.data.kind,
                      "val": user.eval.target.val.kind, "tiny": shipped.method.rank,
                      "configs": sys.modules["configs"].__file__}))
    ''')


def test_configs_import_from_a_file_outside_the_clone(tmp_path):
  """The package alone on the path (a symlink to mllm_tune/, as an installed copy: no clone's
  `configs/` anywhere), run from an empty directory."""
  site = tmp_path / "site"
  site.mkdir()
  os.symlink(os.path.join(ROOT, "mllm_tune"), site / "mllm_tune")
  work = tmp_path / "work"
  work.mkdir()
  (work / "my_config.py").write_text(USER_CONFIG)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = str(site)
  res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=work, env=env, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["method"] == "lora" and out["data"] == "llava_json" and out["val"] == "llava_json"
  assert out["tiny"] == 4
  assert os.path.realpath(out["configs"]) == os.path.join(ROOT, "mllm_tune", "configs",
                                                           "__init__.py")


def test_base_config_is_the_same_from_the_package_and_the_thin_copy():
  packaged, thin = load_both("", "base")
  assert packaged.to_dict() == thin.to_dict()
  from configs import base as thin_base
  from mllm_tune.configs import base
  assert thin_base.eval_set is base.eval_set
