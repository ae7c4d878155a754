"""The evaluate metrics move the right way on constructed cases, all with the tiny offline CLIP.

Cases: `real` (procedurally drawn shapes on gradients), `same` (a copy), `noisy` (real + Gaussian
pixel noise, sigma 12) and `rand` (uniform noise images, unrelated to real).
"""

import importlib.util
import math

import pytest
import torch
from PIL import Image

from sdtune.data.synthetic import generate
from sdtune.errors import UserError
from sdtune.evaluate import metrics as M
from sdtune.evaluate.clip import load_clip
from sdtune.profiling import memory

N, SIZE = 12, 48
FID_ZERO_TOL = 1e-6  # identical sets: only float64 round-off (seen ~1e-8; noisy copy ~1e-2)


@pytest.fixture(scope="module")
def clip():
    return load_clip("tiny")


def _drawn(dest, n, size, seed=0):
    return [Image.open(p).convert("RGB") for p in generate(dest, n, size=size, seed=seed) if p.suffix == ".png"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    real = torch.stack(M.as_images(_drawn(tmp_path_factory.mktemp("real"), N, SIZE)))
    gen = torch.Generator().manual_seed(1)
    noisy = (real.float() + 12 * torch.randn(real.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    rand = torch.randint(0, 256, real.shape, generator=gen, dtype=torch.uint8)
    return {"real": real, "same": real.clone(), "noisy": noisy, "rand": rand}


def test_tiny_clip_is_deterministic(clip):
    again, _ = load_clip("tiny")
    for (name, a), b in zip(clip[0].state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_clip_model_that_cannot_load_is_one_line(tmp_path):
    """evaluate.clip_model named wrong (offline here, as a mistyped id is on the Hub) or a folder that
    holds no CLIP checkpoint: one line naming the key, no traceback."""
    (tmp_path / "config.json").write_text("{}")
    for model_id in ["openai/clip-vit-base-patch1", str(tmp_path)]:
        with pytest.raises(UserError) as err:
            load_clip(model_id, "main")
        said = str(err.value)
        assert said.startswith(f"evaluate.clip_model: cannot load {model_id!r} at revision 'main': ")
        assert "\n" not in said


def test_fid_kid_order(clip, sets):
    ext = M.clip_image_extractor(clip)
    fid = {k: M.fid_kid(sets["real"], sets[k], ext) for k in ("same", "noisy", "rand")}
    assert abs(fid["same"][0]) < FID_ZERO_TOL
    assert FID_ZERO_TOL < fid["noisy"][0] < fid["rand"][0]
    # KID is an unbiased estimate: near 0 (it may dip below) for a copy, clearly above for noise.
    assert fid["rand"][1] > fid["same"][1] and fid["rand"][1] > 0
    assert all(math.isfinite(v) for triple in fid.values() for v in triple)


def test_fidelity_order(clip, sets):
    same = M.fidelity(sets["same"], sets["real"], clip)
    noisy = M.fidelity(sets["noisy"], sets["real"], clip)
    rand = M.fidelity(sets["rand"], sets["real"], clip)
    assert same == {"psnr": M.PSNR_CAP_DB, "lpips_like": 0.0}
    assert M.PSNR_CAP_DB > noisy["psnr"] > rand["psnr"]
    assert 0.0 < noisy["lpips_like"] < rand["lpips_like"]


def test_style_similarity(clip, sets):
    to_itself = M.style_similarity(sets["real"], sets["real"], clip)
    assert to_itself > M.style_similarity(sets["rand"], sets["real"], clip)
    assert -1.0 <= to_itself <= 1.0


def _clip_score_by_hand(images, prompts, clip) -> float:
    """torchmetrics' definition, from the CLIP directly: max(100 * mean_i cos(image_i, prompt_i), 0),
    the images through the CLIP processor's resize/crop/normalisation, the prompts padded together."""
    model, processor = clip
    with torch.no_grad():
        pixels = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))  # transformers 5: a ModelOutput
    return max(100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1).mean().item(), 0.0)


def test_clip_score_range_and_inputs(clip, sets):
    # Prompts the random tiny CLIP scores above 0 (most score below and clamp to 0, which would hide
    # whether the prompts are used at all); one per image, so the pairing counts too.
    prompts = [f"a red circle on a blue gradient {i}" for i in range(N)]
    score = M.clip_score(sets["real"], prompts, clip)
    assert math.isfinite(score) and 0.0 < score <= 100.0
    assert score == pytest.approx(_clip_score_by_hand(sets["real"], prompts, clip), abs=1e-3)
    # Other prompts, another score, also as computed by hand.
    others = [f"{i} a red circle on a blue gradient" for i in range(N)]
    other = M.clip_score(sets["real"], others, clip)
    assert other == pytest.approx(_clip_score_by_hand(sets["real"], others, clip), abs=1e-3)
    assert abs(other - score) > 0.5
    # A list of PIL images is the same input as the uint8 tensor.
    pil = [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in sets["real"]]
    assert M.clip_score(pil, prompts, clip) == pytest.approx(score, abs=1e-4)


def test_a_prompt_longer_than_clip_reads_is_scored_by_the_part_it_reads(clip):
    """CLIP reads 77 tokens, the last its end-of-text token, where it pools the text. torchmetrics
    cut longer prompts' ids at 77, dropping that token: every long prompt was read at another one."""
    tokenizer = clip[1].tokenizer
    shared = "a painting of shapes, oil on canvas, in the style of the old masters, with soft lights"
    # Images the random tiny CLIP scores these prompts above 0 with (a clamped 0 would hide the prompt).
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    scores = []
    for tail in (" cubes", " rings"):
        prompt = shared + tail + ", highly detailed" * 8
        ids = tokenizer(prompt)["input_ids"]
        assert len(ids) > 77 and ids[:71] == tokenizer(shared)["input_ids"][:71]  # 70 tokens in common
        cut = tokenizer.decode(tokenizer(prompt, truncation=True, max_length=77)["input_ids"], skip_special_tokens=True)
        assert cut.endswith(tail) and len(tokenizer(cut)["input_ids"]) == 77  # the 75 tokens CLIP reads
        scores.append(M.clip_score(images, [prompt] * 2, clip))
        assert scores[-1] > 0 and scores[-1] == pytest.approx(M.clip_score(images, [cut] * 2, clip), abs=1e-4)
    assert abs(scores[0] - scores[1]) > 0.1  # their last 5 tokens read differ


def test_fid_kid_mixed_sizes_and_small_sets(clip, sets, tmp_path):
    ext = M.clip_image_extractor(clip)
    # Real images differ in size; three of them also make KID's subset size 3.
    real = [_drawn(tmp_path / str(s), 1, s, seed=s)[0] for s in (40, 56, 64)]
    fid, kid_mean, kid_std = M.fid_kid(real, sets["rand"], ext)
    assert all(math.isfinite(v) for v in (fid, kid_mean, kid_std))
    with pytest.raises(UserError, match=r"^fid: needs at least 2 real and 2 generated images, got 1 real") as err:
        M.fid_kid(real[:1], sets["rand"], ext)
    assert "\n" not in str(err.value)


def test_extractor_names(clip):
    assert isinstance(M.fid_extractor("clip", clip), M.ClipImageFeatures)
    with pytest.raises(UserError, match="evaluate.fid_extractor"):
        M.fid_extractor("vgg", clip)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="would fetch Inception weights")
def test_inception_without_torch_fidelity_is_a_user_error(sets):
    with pytest.raises(UserError, match="torch-fidelity"):
        M.fid_extractor("inception", None)  # before the stage samples anything, not after


def test_time_it_and_memory():
    calls = []
    out = M.time_it(lambda: calls.append(1), repeats=3, warmup=2, sync="cpu")
    assert len(calls) == 5 and len(out["all_s"]) == 3
    assert out["median_s"] == sorted(out["all_s"])[1]
    # the evaluate stage's peak memory, from the profiler's one implementation
    assert memory.peak_memory("cpu")["peak_bytes"] > 10 * 2**20  # torch loaded: well over 10 MiB



def test_psnr_is_in_decibels_over_0_255_pixels(clip):
    """10·log10(255² / MSE) per pair, averaged: pixels ±5 and ±20 off a grey image (MSE 25 and 400)."""
    grey = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    sign = (torch.arange(32 * 32).reshape(32, 32) % 2) * 2 - 1  # +1/-1 in alternate columns
    off = torch.stack([grey[0] + 5 * sign, grey[1] + 20 * sign]).to(torch.uint8)
    want = (10 * math.log10(255**2 / 25) + 10 * math.log10(255**2 / 400)) / 2
    assert M.fidelity(off, grey, clip)["psnr"] == pytest.approx(want, abs=1e-3)


def test_kid_is_the_unbiased_mmd_of_the_features_and_its_std_comes_second(clip, sets):
    """With KID's subset as large as both sets (12 here), every subset is the whole set: the mean is
    the unbiased MMD² under the cubic polynomial kernel, computed here from the features, and the
    std over subsets is 0."""
    ext = M.clip_image_extractor(clip)
    _, kid_mean, kid_std = M.fid_kid(sets["real"], sets["rand"], ext)
    x, y = ext(sets["real"]).double(), ext(sets["rand"]).double()
    n, d = len(x), x.shape[1]

    def k(a, b):
        return (a @ b.T / d + 1) ** 3

    def off_diagonal_mean(m):
        return (m.sum() - m.diagonal().sum()) / (n * (n - 1))

    mmd = off_diagonal_mean(k(x, x)) + off_diagonal_mean(k(y, y)) - 2 * k(x, y).mean()
    assert mmd > 1e-4  # noise is far from the drawings: a mean that cannot pass for a std of 0
    assert kid_mean == pytest.approx(float(mmd), rel=1e-3)
    assert kid_std == pytest.approx(0.0, abs=1e-6)


def _by_hand_pixels(images, clip):
    return clip[1].image_processor(images=list(images), return_tensors="pt")["pixel_values"]


def test_style_similarity_is_the_cosine_to_the_unit_centroid_of_the_real_embeddings(clip, sets):
    """The centroid of the real images' unit embeddings, itself unit-normalised: a mean of unit
    vectors is shorter than 1, which would shrink every score."""
    with torch.no_grad():
        real = clip[0].get_image_features(pixel_values=_by_hand_pixels(sets["real"], clip))
        fake = clip[0].get_image_features(pixel_values=_by_hand_pixels(sets["noisy"], clip))
    real, fake = (torch.nn.functional.normalize(getattr(t, "pooler_output", t), dim=-1) for t in (real, fake))
    centroid = real.mean(0)
    assert centroid.norm() < 0.99  # the case this test is about
    want = torch.nn.functional.cosine_similarity(fake, centroid[None], dim=-1).mean().item()
    assert M.style_similarity(sets["noisy"], sets["real"], clip) == pytest.approx(want, abs=1e-5)


def test_lpips_like_is_the_token_distance_averaged_over_tokens_and_every_layer(clip, sets):
    """Squared L2 of unit patch tokens, averaged over the patch tokens and over each transformer
    layer's output (not summed over tokens, not the last layer alone): at most 4."""
    with torch.no_grad():
        a, b = (clip[0].vision_model(_by_hand_pixels(sets[k], clip), output_hidden_states=True).hidden_states
                for k in ("rand", "real"))
    per_layer = []
    for x, y in zip(a[1:], b[1:]):  # after each of the 2 layers, not the embeddings
        x, y = (torch.nn.functional.normalize(t[:, 1:], dim=-1) for t in (x, y))  # patch tokens only
        per_layer.append(((x - y) ** 2).sum(-1).mean(-1))
    assert len(per_layer) == 2 and abs(per_layer[0].mean() - per_layer[1].mean()) > 1e-3
    got = M.fidelity(sets["rand"], sets["real"], clip)["lpips_like"]
    assert got == pytest.approx(torch.stack(per_layer).mean().item(), abs=1e-5)
    assert 0 < got <= 4


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """40 drawn images: more than one metrics batch of 32."""
    return torch.stack(M.as_images(_drawn(tmp_path_factory.mktemp("many"), 40, 32, seed=5)))


def test_metrics_over_more_than_one_batch_use_every_image_once_and_in_order(clip, many):
    assert len(many) > M.BATCH
    # fidelity pairs image i with reference i in every batch: a copy is identical throughout.
    assert M.fidelity(many, many.clone(), clip) == {"psnr": M.PSNR_CAP_DB, "lpips_like": 0.0}
    # ... and an image changed past the first batch shows.
    changed = many.clone()
    changed[-1] = 255 - changed[-1]
    assert M.fidelity(changed, many, clip)["lpips_like"] > 0
    # CLIP score pairs each image with its own prompt, past the first batch too.
    prompts = [f"a red circle on a blue gradient {i}" for i in range(len(many))]
    assert M.clip_score(many, prompts, clip) == pytest.approx(_clip_score_by_hand(many, prompts, clip), abs=1e-3)
    # FID sees the whole set: the same set is 0, a set whose last batch differs is not.
    ext = M.clip_image_extractor(clip)
    assert abs(M.fid_kid(many, many.clone(), ext)[0]) < FID_ZERO_TOL
    assert M.fid_kid(many, changed, ext)[0] > FID_ZERO_TOL


def test_kid_draws_the_same_subsets_whatever_the_global_seed(clip, sets):
    """12 real and 5 generated images: KID draws subsets of 5 from the real ones. With its own seed,
    the same inputs give the same KID (the evaluate stage is re-run and compared)."""
    ext = M.clip_image_extractor(clip)
    torch.manual_seed(1)
    first = M.fid_kid(sets["real"], sets["rand"][:5], ext)
    torch.manual_seed(2)
    assert M.fid_kid(sets["real"], sets["rand"][:5], ext) == first


def test_fid_features_are_unit_vectors():
    """FID and KID compare CLIP's image embeddings on the unit sphere, as CLIP compares them:
    every number in eval.md's fid and kid columns rests on it."""
    images = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    features = M.clip_image_extractor(load_clip("tiny"))(images)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
