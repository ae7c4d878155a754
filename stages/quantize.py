"""quantize: save each variant of the fine-tuned denoiser to models/quantized/<variant>/.

Writes reports/quantize.json: per variant, bytes on disk, bytes in memory after loading, load
time (keyed by variant name: `dvc metrics show` skips lists).
"""

from tqdm import tqdm

from sdtune import families, io, params as params_lib, quantize, runtime
from sdtune.errors import main_guard

REPORT = "reports/quantize.json"


@main_guard
def main():
    params = params_lib.load()
    p = params.quantize
    family = families.of(params)
    for name in p.variants:  # refuse up front, before spending minutes on the others
        quantize.check_supported(name)
    with runtime.stage("quantize"):
        rows = []
        with io.atomic_path(quantize.QUANT_DIR) as tmp:
            tmp.mkdir()
            jobs = [(n, m) for n in p.variants for m in p.lora_modes]
            for name, mode in tqdm(jobs, desc="quantize", unit="variant"):
                rows.append(quantize.make_variant(family, params.model, quantize.LORA_DIR, name, mode,
                                                  tmp / quantize.variant_name(name, mode),
                                                  lora_scale=params.evaluate.lora_scale))
        variants = {r.pop("variant"): r for r in rows}
        io.write_json(REPORT, {"variants": variants})
    for name, r in variants.items():
        print(f"quantize: {name}: {r['disk_bytes'] / 2**20:.1f} MiB on disk, "
              f"{r['memory_bytes'] / 2**20:.1f} MiB in memory, loads in {r['load_seconds']:.2f} s")


if __name__ == "__main__":
    main()
