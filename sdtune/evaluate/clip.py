"""Load the CLIP model that scores prompts and embeds images for the evaluate stage.

`model_id="tiny"` builds a small random-initialised CLIP offline (for tests and the demo);
anything else is loaded with `from_pretrained` at a pinned revision.
"""

from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from sdtune.errors import UserError
from sdtune.families import common

TINY_IMAGE_SIZE = 32
TINY_SEED = 0


def _tiny() -> tuple[CLIPModel, CLIPProcessor]:
    tokenizer = common.clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),  # 514: the byte symbols, with and without </w>, plus bos/eos
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE, patch_size=4,
            # At the default init scale a random ViT is nearly linear: its embedding tracks the mean
            # colour, so pure noise lands on the average image. A larger scale makes it respond to
            # structure, as a trained CLIP does, so the metrics move the right way on test cases.
            initializer_factor=4.0,
        ),
        projection_dim=32,
    )
    # Seed inside a forked RNG: the same weights every call, without disturbing the caller's RNG.
    with common.seeded(TINY_SEED):
        model = CLIPModel(config)
    # The same resize/crop/normalisation as the real processor, only at the tiny model's size.
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_clip(model_id: str, revision: str = "main", device="cpu") -> tuple[CLIPModel, CLIPProcessor]:
    """Return (model, processor), the model in eval mode on `device` with gradients off."""
    if model_id == "tiny":
        model, processor = _tiny()
    else:
        try:
            model = CLIPModel.from_pretrained(model_id, revision=revision)
            processor = CLIPProcessor.from_pretrained(model_id, revision=revision)
        except (OSError, ValueError) as err:  # not on the Hub, no network, not a CLIP checkpoint
            raise UserError(f"evaluate.clip_model: cannot load {model_id!r} at revision {revision!r}: "
                            f"{str(err).strip().splitlines()[0]}") from None
    model.requires_grad_(False)
    return model.to(device).eval(), processor
