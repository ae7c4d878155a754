"""cache: encode every image and caption once (VAE latents, text embeddings) into cache/."""

from sdtune import families, io, params as params_lib, runtime
from sdtune.data import cache
from sdtune.errors import main_guard

CAPTIONS, RAW, OUT = "data/captions.jsonl", "data/raw", "cache"


@main_guard
def main():
    params = params_lib.load()
    family = families.of(params)
    with runtime.stage("cache"):
        rows = io.read_jsonl(CAPTIONS)
        counts = cache.build(rows, RAW, OUT, family, params.model, params.cache,
                             device=runtime.device(params.base.device), max_pixels=params.data.max_pixels)
    print(f"cache: {counts['items']} items ({counts['encoded']} encoded, {counts['reused']} reused, "
          f"{counts['removed']} stale removed) in {OUT}/")


if __name__ == "__main__":
    main()
