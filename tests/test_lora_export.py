"""The published LoRA, loaded by diffusers onto the original base model, reproduces the adapted
denoiser it was exported from: every targeted module, whatever the init (PiSSA and OLoRA change
the base weights during training, the published file must not rely on that)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdtune import io, params as params_lib
from sdtune.evaluate import generate
from sdtune.families import common, get
from sdtune.train import kohya, lora, outputs

RES = 64


def make_params(family, **lora_params):
    return params_lib.parse({"base": {"device": "cpu"}, "model": {"family": family, "id": "tiny", "resolution": RES},
                             "train": {"lora": {"rank": 4, "alpha": 2.0, **lora_params}}})


def adapted(params, seed=0):
    """The tiny denoiser with the LoRA attached and all its matrices moved, as training would."""
    family = get(params.model.family)
    denoiser = family.load_denoiser(params.model)
    lora.add(denoiser, params.train.lora, family.LORA_TARGETS)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.trainable(denoiser):  # B starts at zero for the default inits: a LoRA doing nothing
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return denoiser.eval()


def latents(pipe):
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=2, height=RES, width=RES, output_type="latent",
               generator=torch.Generator().manual_seed(7))
    return np.asarray(out.images)


def loaded(params, folder, weight_name):
    """Latents of a fresh pipeline (the original base weights) with the file loaded by diffusers."""
    pipe = get(params.model.family).load_pipeline(params.model)
    pipe.load_lora_weights(str(folder), weight_name=weight_name)
    return latents(pipe)


CASES = [
    pytest.param("sd1", {"target_modules": ["to_q", "conv1"]}, id="sd1-linear+conv"),  # both in one file
    pytest.param("sdxl", {"target_modules": ["to_q", "conv1"]}, id="sdxl-linear+conv"),
    pytest.param("sd1", {}, id="sd1-default"),
    pytest.param("sd1", {"init": "pissa"}, id="sd1-pissa"),
    pytest.param("sd1", {"init": "olora"}, id="sd1-olora"),
    pytest.param("sd1", {"init": "pissa", "use_dora": True}, id="sd1-pissa-dora"),
    pytest.param("sdxl", {"init": "pissa"}, id="sdxl-pissa"),
    pytest.param("sd3", {"init": "olora"}, id="sd3-olora"),
]


@pytest.mark.parametrize(("family", "lora_params"), CASES)
def test_published_lora_reproduces_the_adapted_model(family, lora_params, tmp_path):
    params = make_params(family, **lora_params)
    fam = get(family)
    denoiser = adapted(params)
    run = SimpleNamespace(params=params, family=fam)
    outputs.write_lora(tmp_path, run, lora.diffusers_state(denoiser), {"model_family": family})

    want = latents(fam.load_pipeline(params.model, **{fam.DENOISER_ATTR: denoiser}))
    base = latents(fam.load_pipeline(params.model))
    assert np.abs(want - base).max() > 0.05  # the LoRA does something
    np.testing.assert_allclose(loaded(params, tmp_path, common.LORA_FILE), want, rtol=0, atol=1e-4)
    if kohya.supports(params):  # the copy for A1111 and ComfyUI, through diffusers' kohya reader
        np.testing.assert_allclose(loaded(params, tmp_path, kohya.KOHYA_FILE), want, rtol=0, atol=1e-4)


def test_lora_dropout_is_not_published_nor_applied_while_sampling(tmp_path):
    """Dropout regularises training only: the published config says 0, so other loaders sample without
    it, and generate samples in eval mode, so a file that still asks for it gives one image per seed."""
    params = make_params("sd1", dropout=0.5)
    fam = get("sd1")
    state = lora.diffusers_state(adapted(params))
    run = SimpleNamespace(params=params, family=fam)
    path = outputs.write_lora(tmp_path / "published", run, state, {"model_family": "sd1"})
    assert json.loads(io.read_safetensors_metadata(path)["lora_adapter_metadata"])["unet.lora_dropout"] == 0.0

    asks = lora.config(params.train.lora, fam.LORA_TARGETS).to_dict()  # as published before: dropout 0.5
    fam.save_lora(tmp_path / "asks", state, {"base_model": "tiny"},
                  adapter_metadata=asks | {"target_modules": sorted(asks["target_modules"])})
    pipe = generate.pipeline(fam, params.model, torch.device("cpu"), lora_dir=tmp_path / "asks")
    assert any(isinstance(m, torch.nn.Dropout) for m in pipe.unet.modules())  # the file's dropout is there
    one, two = (np.asarray(generate.sample(pipe, "a red circle", 7, steps=2, guidance=7.5, size=RES))
                for _ in range(2))
    assert np.array_equal(one, two)


def test_a_lora_trained_for_another_prediction_type_is_warned_of(tmp_path, capsys):
    """A LoRA trained with model.prediction_type: v_prediction on an epsilon checkpoint, sampled
    by `sdtune generate` under params without the override, gave noise without a word."""
    params = make_params("sd1")
    fam = get("sd1")
    state = lora.diffusers_state(adapted(params))
    adapter = lora.config(params.train.lora, fam.LORA_TARGETS).to_dict()
    adapter["target_modules"] = sorted(adapter["target_modules"])
    for trained in ("v_prediction", "epsilon", "default"):
        path = fam.save_lora(tmp_path / trained, state, {"base_model": "tiny", "prediction_type": trained},
                             adapter_metadata=adapter)
        generate.pipeline(fam, params.model, torch.device("cpu"), lora_dir=tmp_path / trained)
        out = capsys.readouterr().out
        if trained == "v_prediction":  # the tiny pipeline samples epsilon
            assert out == (f"warning: {path}: this LoRA was trained to predict v_prediction (model.prediction_type), "
                           f"but the pipeline samples with epsilon: set model.prediction_type: v_prediction\n")
        else:
            assert "warning" not in out
