"""The kohya export: exact round trip, names that agree with diffusers' own exporter, and a file
that diffusers' kohya reader (which mirrors A1111's and ComfyUI's) loads to the same image."""

import numpy as np
import pytest
import torch
from diffusers.utils import convert_state_dict_to_kohya
from safetensors.torch import load_file

from sdtune import io
from sdtune.errors import UserError
from sdtune.families import common, sd
from sdtune.params import parse
from sdtune.train import kohya, lora

RANK, ALPHA = 4, 2.0  # alpha != rank, so a lost alpha changes the image


def make_lora(directory, unet=None, seed=0, rank=RANK, alpha=ALPHA):
    """A non-zero LoRA on the tiny SD1 UNet (or `unet`), written as the train stage writes it."""
    unet = unet if unet is not None else sd.tiny_unet()
    cfg = lora.add(unet, parse({"train": {"lora": {"rank": rank, "alpha": alpha}}}).train.lora, sd.LORA_TARGETS)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: a LoRA that does nothing
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    adapter = cfg.to_dict() | {"target_modules": sorted(cfg.target_modules)}
    meta = {"base_model": "tiny", "model_family": "sd1"}
    return sd.save_lora(directory, lora.diffusers_state(unet), meta, adapter_metadata=adapter)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("lora"))


def test_round_trip_is_exact(lora_file):
    state = load_file(lora_file)
    back, alpha = kohya.from_kohya(kohya.to_kohya(state, ALPHA))
    assert alpha == ALPHA
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_names_match_diffusers_exporter(lora_file):
    # diffusers' exporter reads peft spelling (lora_A/lora_B, as our file has) and writes alpha = rank.
    state = load_file(lora_file)
    ours, theirs = kohya.to_kohya(state, ALPHA), convert_state_dict_to_kohya(state)
    assert set(ours) == set(theirs)
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"} <= set(ours)
    assert all(float(ours[k]) == ALPHA for k in ours if k.endswith(".alpha"))


def test_unexportable_keys_are_one_line():
    with pytest.raises(UserError, match="text_encoder"):
        kohya.to_kohya({"text_encoder.x.lora.down.weight": torch.zeros(1)}, 1.0)
    with pytest.raises(UserError, match="lora_te_"):
        kohya.from_kohya({"lora_te_text_model_x.lora_down.weight": torch.zeros(1)})


def test_write_kohya_metadata(lora_file):
    meta = io.read_safetensors_metadata(lora_file)
    path = kohya.write_kohya(lora_file.parent, load_file(lora_file), ALPHA, meta)
    assert path.name == "pytorch_lora_weights_kohya.safetensors"
    written = io.read_safetensors_metadata(path)
    assert written["base_model"] == "tiny" and "lora_adapter_metadata" not in written
    assert (written["ss_network_dim"], written["ss_network_alpha"]) == (str(RANK), str(ALPHA))
    assert (written["ss_base_model_version"], written["ss_v2"]) == ("sd_v1", "False")
    sd2 = kohya.write_kohya(lora_file.parent, load_file(lora_file), ALPHA, meta | {"model_family": "sd2"})
    written = io.read_safetensors_metadata(sd2)  # A1111 picks SD 2.x's v-prediction config by these
    assert (written["ss_base_model_version"], written["ss_v2"]) == ("sd_v2", "True")
    assert kohya.supports(parse({})) and not kohya.supports(parse({"train": {"lora": {"use_dora": True}}}))
    with pytest.raises(UserError, match="sdxl"):  # A1111 would take it for an SD 1.x LoRA
        kohya.write_kohya(lora_file.parent, load_file(lora_file), ALPHA, meta | {"model_family": "sdxl"})


def _image(pipe):
    out = pipe("a lighthouse", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(7))
    return out.images[0]


def _with_lora(pipe, folder, weight_name):
    pipe.load_lora_weights(str(folder), weight_name=weight_name)
    image = _image(pipe)
    pipe.unload_lora_weights()
    return image


def test_diffusers_kohya_loader_gives_the_same_image(lora_file, tmp_path):
    folder = lora_file.parent
    kohya.write_kohya(folder, load_file(lora_file), ALPHA, io.read_safetensors_metadata(lora_file))
    pipe = sd.load_pipeline(parse({"model": {"id": "tiny", "resolution": 64}}).model)
    pipe.set_progress_bar_config(disable=True)
    base = _image(pipe)
    ours = _with_lora(pipe, folder, common.LORA_FILE)
    from_kohya = _with_lora(pipe, folder, kohya.KOHYA_FILE)
    assert np.abs(ours - base).max() > 1e-3  # the LoRA does something
    np.testing.assert_array_equal(from_kohya, ours)
    # The alpha in the file is what the loader uses: a wrong one gives another image.
    kohya.write_kohya(tmp_path, load_file(lora_file), 2 * ALPHA, {"model_family": "sd1"})
    assert np.abs(_with_lora(pipe, tmp_path, kohya.KOHYA_FILE) - ours).max() > 1e-4
