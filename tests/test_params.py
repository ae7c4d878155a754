"""params.yaml validation: every bad value stops with one line naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from sdtune import params
from sdtune.errors import UserError

ROOT = Path(__file__).resolve().parent.parent

BAD = [
    ({"train": {"lora": {"rank": 0}}}, "train.lora.rank", "greater than 0"),
    ({"train": {"lr": -1.0e-4}}, "train.lr", "greater than 0"),
    ({"model": {"resolution": 500}}, "model.resolution", "multiple of 8"),
    ({"model": {"family": "sd9"}}, "model.family", "'sd1', 'sd2', 'sdxl' or 'sd3'"),
    ({"train": {"stpes": 10}}, "unknown key 'train.stpes'", "allowed here: steps"),
    ({"trian": {}}, "unknown key 'trian'", "allowed here: base, data"),
    ({"train": {"steps": "10"}}, "train.steps", "valid integer"),
    ({"train": {"gradient_checkpointing": "yes"}}, "train.gradient_checkpointing", "valid boolean"),
    ({"caption": {"template": "no slot"}}, "caption.template", "{caption}"),
    ({"quantize": {"variants": ["int3"]}}, "quantize.variants.0", "'bf16'"),
    ({"evaluate": {"seeds": []}}, "evaluate.seeds", "at least 1 item"),
    ({"train": {"validation_prompts": []}}, "train.validation_prompts", "at least 1 item"),
    ({"train": {"lora": {"target_modules": []}}}, "train.lora.target_modules", "at least 1 item"),
    ({"base": {"seed": -1}}, "base.seed", "greater than or equal to 0"),
    # No param means "unbounded" or "off" by .inf or .nan (max_grad_norm: null turns clipping off).
    ({"train": {"lr": float("nan")}}, "train.lr", "finite number"),
    ({"train": {"max_grad_norm": float("inf")}}, "train.max_grad_norm", "finite number"),
    ({"base": {"seed": 2**32}}, "base.seed", "less than 4294967296"),
    # The seed lists were unbounded: a seed past 2**64 failed in the first generation, as a traceback.
    ({"evaluate": {"seeds": [0, 2**64]}}, "evaluate.seeds.1", "less than 4294967296"),
    ({"train": {"validation_seeds": [-1]}}, "train.validation_seeds.0", "greater than or equal to 0"),
    # FID and KID of [0, 0] were of one image twice, past the stage's two-image guard.
    ({"evaluate": {"seeds": [0, 1, 0]}}, "evaluate.seeds", "0 listed more than once; list each once"),
    ({"train": {"validation_seeds": [2, 2]}}, "train.validation_seeds", "2 listed more than once"),
    ({"quantize": {"variants": ["bf16", "int8wo", "bf16"]}}, "quantize.variants", "bf16 listed more than once"),
    ({"quantize": {"lora_modes": ["fused", "fused"]}}, "quantize.lora_modes", "fused listed more than once"),
    # [] made no variant and removed those made before, exit 0
    ({"quantize": {"lora_modes": []}}, "quantize.lora_modes", "at least 1 item"),
    ({"profile": {"matrix": []}}, "profile.matrix", "list at least one cell (got [])"),
    ({"profile": {"matrix": [{"name": "a"}, {"name": "a", "lr": 1.0}]}}, "profile.matrix",
     "cell name 'a' is used more than once; names must be unique"),
    # A section with its keys all commented out: pydantic's "a valid dictionary or instance of Train"
    ({"train": None}, "train", "expected a mapping of its keys (indented `key: value` lines), or leave the "
                               "section out (got None)"),
    ({"train": {"warmup_steps": 100}}, "train.warmup_steps", "constant_with_warmup"),
    # A schedule still warming up at its last step never reached train.lr, without a word.
    ({"train": {"steps": 4, "warmup_steps": 10, "lr_scheduler": "cosine"}}, "train.warmup_steps",
     "10 warmup steps leave none of train.steps (4) at train.lr"),
    ({"train": {"optimizer": "prodigy"}}, "train.optimizer", "expects lr around 1.0"),
    ({"profile": {"matrix": [{"mixed_precision": "bf16"}]}}, "profile.matrix", "'name'"),
    ({"train": {"compile_mode": "reduce-overhead"}}, "train.compile_mode: 'reduce-overhead' needs compile: true", ""),
    ({"train": {"compile": True, "compile_mode": "reduce-overhead", "grad_accum": 4}},
     "train.compile_mode: 'reduce-overhead' uses CUDA graphs", "set grad_accum: 1 or compile_mode: default"),
    ({"train": {"compile_options": {"cpp_wrapper": True}}}, "train.compile_options", "needs compile: true"),
    ({"train": {"compile": True, "compile_options": {"cpp_wraper": True}}},
     "train.compile_options: 'cpp_wraper'", "no such option"),
    ({"train": {"compile": True, "compile_options": {"cpp_wrapper": 1}}},
     "train.compile_options: 'cpp_wrapper'", "expected a value of type bool, as the option is now False (got 1)"),
    ({"train": {"compile": True, "compile_options": {"cpp.threads": True}}},
     "train.compile_options: 'cpp.threads'", "expected a value of type int"),
    ({"train": {"compile": True, "compile_options": {"triton.cudagraphs": True}}},
     "train.compile_options: 'triton.cudagraphs'", "set compile_mode: reduce-overhead instead"),
]


def test_compile_options_take_inductor_values_of_the_options_types():
    train = params.parse({"train": {"compile": True, "compile_options": {
        "cpp_wrapper": True, "cpp.threads": 2, "max_autotune_gemm_backends": "ATEN"}}}).train
    assert train.compile_options == {"cpp_wrapper": True, "cpp.threads": 2, "max_autotune_gemm_backends": "ATEN"}
    assert params.parse({}).train.compile_options == {}


@pytest.mark.parametrize("raw, key, allowed", BAD)
def test_bad_value_is_one_line_naming_the_key(raw, key, allowed):
    with pytest.raises(UserError) as err:
        params.parse(raw)
    msg = str(err.value)
    assert "\n" not in msg
    assert key in msg and allowed in msg


def real_run(p):
    """What README and params.yaml's header say the real run is: Sargent's paintings (the zip on
    Google Drive, captions that name him), SD 1.5 at 512 px, LoRA rank 16 (alpha = rank), W&B
    offline until a key is set, seed 1234."""
    assert p.data.source == "gdrive://1capT9kF-zCu2OiNVzm7VG5DQDaAQLl1Q"
    assert p.caption.template.startswith("a painting by sargent, ")
    assert (p.model.family, p.model.id) == ("sd1", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert (p.model.resolution, p.train.lora.rank, p.train.lora.alpha) == (512, 16, 16.0)
    assert (p.train.wandb, p.base.seed) == ("offline", 1234)


def test_defaults_are_the_real_run_and_repo_params_load():
    real_run(params.load(ROOT / "params.yaml"))
    # with no params at all (`sdtune generate` outside a checkout), the built-in defaults are that run
    real_run(params.parse({}))


def test_floats_accept_ints_but_not_strings():
    assert params.parse({"train": {"lr": 1}}).train.lr == 1.0
    with pytest.raises(UserError, match="train.lr"):
        params.parse({"train": {"lr": "1e-4"}})


def test_yaml_nan_and_inf_are_refused_with_one_line(tmp_path):
    for text, said in [("train: {lr: .nan}\n", "train.lr: Input should be a finite number (got nan)"),
                       ("train: {max_grad_norm: .inf}\n", "train.max_grad_norm: Input should be a finite number (got inf)")]:
        (tmp_path / "params.yaml").write_text(text)
        with pytest.raises(UserError) as err:
            params.load(tmp_path / "params.yaml")
        assert str(err.value) == f"{tmp_path / 'params.yaml'}: {said}"


def test_stage_prints_one_line_and_no_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  lora:\n    rank: 0\n")
    out = subprocess.run([sys.executable, "-m", "stages.train"], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: params.yaml: train.lora.rank: Input should be greater than 0 (got 0)"
    assert "Traceback" not in out.stderr


def test_missing_and_broken_params_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        params.load(tmp_path / "params.yaml")
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(UserError, match="folder.yaml: a folder, not a params file"):
        params.load(tmp_path / "folder.yaml")
    # Where the parser stopped and what it found there: not its context line ("while parsing ...").
    for text, said in [(b"train: [unclosed\n", "at line 2, column 1: expected ',' or ']', but got '<stream end>'"),
                       (b"data:\n  retries: 1\n  retries: 2\n",
                        'at line 3, column 3: found duplicate key "retries" with value "2" (original value: "1")'),
                       (b"data:\n\tretries: 1\n", "at line 2, column 1: found character '\\t' that cannot start any token")]:
        (tmp_path / "params.yaml").write_bytes(text)
        with pytest.raises(UserError) as err:
            params.load(tmp_path / "params.yaml")
        assert str(err.value) == f"{tmp_path / 'params.yaml'}: not valid YAML {said}"
    (tmp_path / "params.yaml").write_bytes('caption: {template: "caf\xe9 {caption}"}\n'.encode("latin-1"))
    with pytest.raises(UserError) as err:
        params.load(tmp_path / "params.yaml")
    assert str(err.value) == f"{tmp_path / 'params.yaml'}: not valid UTF-8 (byte 24); save it as UTF-8"


def test_params_yaml_writes_out_every_key():
    """DVC watches params.yaml, not the defaults in params.py: a key left to its default there is one
    whose change in code (a git pull) DVC would not see, leaving every output it feeds stale."""
    from ruamel.yaml import YAML

    def keys(tree, prefix=""):
        out = set()
        for key, value in tree.items():
            out.add(prefix + key)
            if isinstance(value, dict) and value:  # a mapping of keys, not a value such as compile_options: {}
                out |= keys(value, f"{prefix}{key}.")
        return out

    written = YAML(typ="safe", pure=True).load((ROOT / "params.yaml").read_text())
    assert keys(params.Params().model_dump()) - keys(written) == set()
