"""Captions: sidecars, templates, the token limit, the tiny and locally saved captioners, the contact sheet."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built locally

import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from sdtune.data import captions  # noqa: E402
from sdtune.data.captions import (  # noqa: E402
    apply_template, caption_folder, contact_sheet, load_captioner, read_sidecar, truncate)
from sdtune.data.images import check_folder  # noqa: E402
from sdtune.data.synthetic import generate  # noqa: E402
from sdtune.errors import UserError  # noqa: E402

ASSETS = Path(captions.__file__).resolve().parent.parent / "assets"
NO_MODEL = "no-such-org/no-such-model"  # loading it would fail: proves the model was not needed


@pytest.fixture(scope="module")
def clip_tokenizer():
    d = ASSETS / "clip-tokenizer"
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)


@pytest.fixture
def demo(tmp_path):
    raw = tmp_path / "raw"
    generate(raw, 6)  # images 2 and 5 have no sidecar
    return raw, check_folder(raw, min_side=32)


def test_an_image_whose_name_leaves_no_room_for_a_sidecars_suffix_has_none(tmp_path):
    """254 bytes of name (scrapers cut at 255): its .caption sibling would be 258, and Path.is_file
    raised 'File name too long' for it, a traceback in the caption stage."""
    img = tmp_path / ("é" * 125 + ".png")
    img.write_bytes(b"")
    assert read_sidecar(img) is None


def test_sidecar_txt_wins_then_caption(tmp_path):
    img = tmp_path / "My Photo ü.JPG"
    img.write_bytes(b"")
    assert read_sidecar(img) is None
    (tmp_path / "My Photo ü.caption").write_text("from caption file")
    assert read_sidecar(img) == "from caption file"
    (tmp_path / "My Photo ü.txt").write_bytes("\ufeff  a  lady\n in white \n".encode())
    assert read_sidecar(img) == "a lady in white"  # BOM dropped, whitespace collapsed


def test_bad_sidecars_are_ignored_with_a_note(tmp_path):
    img = tmp_path / "a.png"
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 latin-1")
    notes = []
    assert read_sidecar(img, notes) is None
    assert notes == ["a.txt: not valid UTF-8 (byte 3); sidecar ignored"]
    (tmp_path / "a.txt").write_text(" \n\t")
    notes = []
    assert read_sidecar(img, notes) is None and notes == ["a.txt: empty; sidecar ignored"]


def test_sidecar_suffix_case_is_ignored(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.JPG", format="JPEG")
    (tmp_path / "a.TXT").write_text("upper case txt")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.jpg")
    (tmp_path / "B.Caption").write_text("mixed case caption")
    assert read_sidecar(tmp_path / "a.JPG") == "upper case txt"
    assert read_sidecar(tmp_path / "b.jpg") == "mixed case caption"
    # An exact match wins over a name that differs only in case (A.txt sorts before a.txt).
    (tmp_path / "d.png").write_bytes((tmp_path / "b.jpg").read_bytes())
    (tmp_path / "D.txt").write_text("the caption of D")
    (tmp_path / "d.txt").write_text("the caption of d")
    assert read_sidecar(tmp_path / "d.png") == "the caption of d"


def test_uppercase_sidecars_are_used_and_a_shared_one_is_warned(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, colour in (("a.JPG", "red"), ("c.jpg", "green"), ("c.png", "blue")):
        Image.new("RGB", (32, 32), colour).save(raw / name)
    (raw / "a.TXT").write_text("a lady in white")
    (raw / "c.txt").write_text("a garden")
    verdicts = check_folder(raw, min_side=32)
    assert [v["file"] for v in verdicts] == ["a.JPG", "c.jpg", "c.png"]  # the sidecars are not images
    rows = caption_folder(raw, verdicts, model_id=NO_MODEL, revision="main", template="{caption}")
    assert [(r["caption"], r["how"]) for r in rows] == [
        ("a lady in white", "sidecar"), ("a garden", "sidecar"), ("a garden", "sidecar")]
    assert rows[0]["warnings"] == []
    assert rows[1]["warnings"] == rows[2]["warnings"] == ["c.txt: sidecar shared by c.jpg, c.png"]


def test_truncate_to_77_tokens_at_a_word(clip_tokenizer):
    short = "a painting by sargent, a lady"
    assert truncate(short, clip_tokenizer, 77) == (short, False)
    long = "a painting by sargent, " + " ".join(["madame"] * 40)
    text, cut = truncate(long, clip_tokenizer, 77)
    assert cut and long.startswith(text) and text.endswith("madame")
    assert len(clip_tokenizer(text).input_ids) <= 77
    assert len(clip_tokenizer(text + " madame").input_ids) > 77  # as long as it could be


def test_truncating_logs_nothing_from_transformers():
    """The caption stage warns about a cut caption in its own words; transformers' "Token indices
    sequence length is longer than..." line (logged once per tokenizer) would only repeat it."""
    import logging

    from sdtune.families import common

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    messages, handler = [], Collect(logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        text, cut = truncate("a painting by sargent, " + "madame " * 100, common.clip_tokenizer(), 77)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert cut and messages == []


def test_template_and_fixed(demo):
    assert apply_template("a painting by sargent, {caption}", "a {red} hat") == "a painting by sargent, a {red} hat"
    # Braces of the template's own are text too: "{style}" is no placeholder of ours.
    assert apply_template("sks in {style}, {caption}", "a hat") == "sks in {style}, a hat"
    with pytest.raises(UserError, match="caption.template"):
        apply_template("no slot", "x")
    raw, verdicts = demo
    rows = caption_folder(raw, verdicts, model_id=NO_MODEL, revision="main", template="sks, {caption}",
                          fixed="a photo")
    assert [r["caption"] for r in rows] == ["sks, a photo"] * 6
    assert {(r["how"], r["model"], r["revision"]) for r in rows} == {("fixed", None, None)}


def test_sidecars_only_never_load_a_model(demo):
    raw, verdicts = demo
    for p in raw.glob("*.png"):
        p.with_suffix(".txt").write_text(f"caption of {p.stem}")
    rows = caption_folder(raw, verdicts, model_id=NO_MODEL, revision="main", template="{caption}")
    assert [r["caption"] for r in rows] == [f"caption of synthetic_{i:03d}" for i in range(6)]
    assert {r["how"] for r in rows} == {"sidecar"}


def test_tiny_captioner_is_deterministic(demo, clip_tokenizer):
    raw, verdicts = demo
    verdicts[0] = dict(verdicts[0], status="skipped")  # skipped images get no row
    kw = dict(model_id="tiny", revision="main", template="a painting by sargent, {caption}", batch_size=1,
              max_new_tokens=8, tokenizer_for_limit=clip_tokenizer)
    rows = caption_folder(raw, verdicts, seed=3, **kw)
    assert [r["file"] for r in rows] == [f"synthetic_{i:03d}.png" for i in range(1, 6)]
    by_how = {r["file"]: r["how"] for r in rows}
    assert by_how["synthetic_002.png"] == by_how["synthetic_005.png"] == "model"
    assert by_how["synthetic_001.png"] == "sidecar"
    vocab = set((ASSETS / "tiny-captioner" / "vocab.txt").read_text().split())
    for r in rows:
        assert r["caption"].startswith("a painting by sargent, ")
        if r["how"] == "model":
            words = r["caption"].removeprefix("a painting by sargent, ").split()
            assert 3 <= len(words) <= 8 and set(words) <= vocab, r
            assert (r["model"], r["revision"]) == ("tiny", None)
    assert caption_folder(raw, verdicts, seed=3, **kw) == rows


def test_overlong_caption_is_truncated_with_a_warning(demo, clip_tokenizer):
    raw, verdicts = demo
    rows = caption_folder(raw, verdicts, model_id="tiny", revision="main", fixed="x " * 100,
                          template="{caption}", tokenizer_for_limit=clip_tokenizer)
    assert all(len(clip_tokenizer(r["caption"]).input_ids) <= 77 for r in rows)
    assert rows[0]["warnings"] == ["caption truncated to the text encoder's 77 tokens"]


def _byte_vocab():
    # GPT-2/BART byte-level symbols, taken from the CLIP asset (its entries without "</w>")
    clip = json.loads((ASSETS / "clip-tokenizer" / "vocab.json").read_text())
    symbols = [t for t in clip if not t.endswith("</w>") and not t.startswith("<|")]
    return {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + symbols)}


def _save_tiny_blip(dest):
    model, processor, _ = captions._tiny(seed=0)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return []


def _save_tiny_blip2(dest):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, GPT2Tokenizer
    from transformers import BlipImageProcessorPil

    tok = GPT2Tokenizer(vocab=_byte_vocab(), merges=[], bos_token="</s>", eos_token="</s>", pad_token="<pad>")
    processor = Blip2Processor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tok, num_query_tokens=2)
    image_id = tok.convert_tokens_to_ids("<image>")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = Blip2Config(
        vision_config=dict(**small, image_size=32, patch_size=8),
        qformer_config=dict(**small, vocab_size=len(tok), encoder_hidden_size=32),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                         num_attention_heads=2, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2,
                         pad_token_id=1),
        num_query_tokens=2, image_token_index=image_id)
    Blip2ForConditionalGeneration(config).save_pretrained(dest)
    processor.save_pretrained(dest)
    return [1, 3, image_id]  # pad, unk, image placeholder


def _save_tiny_florence2(dest):
    from transformers import BartTokenizer, CLIPImageProcessorPil, Florence2Config
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

    tok = BartTokenizer(vocab=_byte_vocab(), merges=[], extra_special_tokens={"image_token": "<image>"})
    config = Florence2Config(
        vision_config=dict(depths=[1] * 4, embed_dim=[8, 16, 16, 32], num_heads=[1] * 4, num_groups=[1] * 4,
                           window_size=2, projection_dim=32),
        text_config=dict(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                         decoder_start_token_id=2),
        image_token_id=tok.image_token_id)
    image_processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
    image_processor.image_seq_length = 2  # a 32 px image comes out of the tiny DaViT as 1x1 + 1 pooled token
    Florence2ForConditionalGeneration(config).save_pretrained(dest)
    Florence2Processor(image_processor, tok).save_pretrained(dest)
    return [1, 3, tok.image_token_id]


@pytest.mark.parametrize("save", [_save_tiny_blip, _save_tiny_blip2, _save_tiny_florence2])
def test_each_kind_loads_with_from_pretrained_and_captions(tmp_path, save):
    import torch

    torch.manual_seed(3)  # random weights: the same ones whatever ran before in this process
    special = save(tmp_path / "model")
    cap = load_captioner(str(tmp_path / "model"), revision="main")
    # random weights stop at once; force a few ordinary tokens so decoding is exercised
    cap.generate_kwargs = dict(min_new_tokens=3, suppress_tokens=special) if special else cap.generate_kwargs
    images = [Image.new("RGB", (40, 30), (200, 0, 0)), Image.new("RGB", (30, 40), (0, 0, 200))]
    texts = cap(images, max_new_tokens=6)
    assert len(texts) == 2 and all(texts)
    for t in texts:  # neither the image placeholders nor Florence-2's prompt leak into the caption
        assert "<image>" not in t and "What does the image" not in t


def test_a_real_captioners_id_and_revision_are_recorded_with_each_caption(demo, tmp_path):
    """Which weights wrote a caption: the id and the revision asked for (only the tiny captioner,
    whose weights are code, has none)."""
    import torch

    torch.manual_seed(3)
    _save_tiny_blip(tmp_path / "blip")
    raw, verdicts = demo
    rows = caption_folder(raw, verdicts, model_id=str(tmp_path / "blip"), revision="v1.0", template="{caption}",
                          max_new_tokens=4)
    made = [r for r in rows if r["how"] == "model"]
    assert [r["file"] for r in made] == ["synthetic_002.png", "synthetic_005.png"]
    assert {(r["model"], r["revision"]) for r in made} == {(str(tmp_path / "blip"), "v1.0")}


def test_unsupported_and_remote_code_models_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "florence2", "auto_map": {"AutoConfig": "x.Y"}}))
    with pytest.raises(UserError, match="remote code.*florence-community"):
        load_captioner(str(tmp_path), "main")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="model_type 'bert'; supported: blip, blip-2, florence2"):
        load_captioner(str(tmp_path), "main")
    (tmp_path / "config.json").unlink()
    with pytest.raises(UserError, match="cannot read the config"):
        load_captioner(str(tmp_path), "main")
    assert captions.KINDS["florence2"].prompt == "<CAPTION>"


def test_cuda_asked_for_without_cuda_is_a_user_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="base.device"):
        load_captioner("tiny", "main", device="cuda")


def test_contact_sheet_is_a_png_of_the_expected_size(demo, tmp_path):
    raw, verdicts = demo
    rows = caption_folder(raw, verdicts, model_id="tiny", revision="main", template="{caption}", max_new_tokens=5)
    rows[0]["caption"] = "an extremely long caption " * 20 + "Supercalifragilisticexpialidocious" * 3
    out = contact_sheet(raw, rows, tmp_path / "reports" / "captions.png", n=5)
    with Image.open(out) as im:
        assert im.format == "PNG"
        # 5 thumbnails in rows of 4: 2 rows; cell = 192 + 2*8 wide, 192 + 2*8 + 4 lines of 16 high
        assert im.size == (4 * 208, 2 * 272)
        assert im.convert("L").getextrema()[0] < 50  # something dark (text) was drawn
    empty = contact_sheet(raw, [], tmp_path / "empty.png")
    assert Image.open(empty).size == (208, 272)
