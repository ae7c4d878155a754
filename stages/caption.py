"""caption: check every image, caption the good ones, report the rest.

Writes data/captions.jsonl (file, sha256, caption, how, model, revision),
reports/data.json (a verdict per file) and reports/captions.png (a contact sheet).
"""

from sdtune import families, io, params as params_lib, runtime
from sdtune.data import captions, images
from sdtune.errors import UserError, main_guard

RAW, OUT, REPORT, SHEET = "data/raw", "data/captions.jsonl", "reports/data.json", "reports/captions.png"


@main_guard
def main():
    params = params_lib.load()
    p = params.caption
    family = families.of(params)  # sizes the family cannot take stop here, before any image is read
    with runtime.stage("caption"):
        verdicts = images.check_folder(RAW, min_side=params.model.resolution, bucket_step=params.cache.crop_step,
                                       too_small=params.data.too_small,
                                       max_pixels=params.data.max_pixels)
        kept = [v for v in verdicts if v["status"] == "kept"]
        skipped = [v for v in verdicts if v["status"] != "kept"]
        report = {"kept": len(kept), "skipped": len(skipped), "files": verdicts}
        if not kept:  # the reasons are what the user needs now; the captions before are kept
            io.write_json(REPORT, report)
            raise UserError(f"{RAW}: no usable image among {len(verdicts)} files; reasons in {REPORT}")
        tokenizer = family.load_tokenizer(params.model)
        rows = captions.caption_folder(RAW, verdicts, model_id=p.model, revision=p.revision,
                                       template=p.template, fixed=p.fixed, batch_size=p.batch_size,
                                       max_new_tokens=p.max_new_tokens, tokenizer_for_limit=tokenizer,
                                       seed=params.base.seed, device=params.base.device,
                                       max_pixels=params.data.max_pixels)
        for row in rows:
            for warning in row.pop("warnings", []):
                print(f"caption: warning: {row['file']}: {warning}")
        io.write_jsonl(OUT, rows)
        io.write_json(REPORT, report)  # after the captions: a failure while captioning leaves the pair as it was
        captions.contact_sheet(RAW, rows, SHEET, max_pixels=params.data.max_pixels)
    note = f"; skipped {len(skipped)} (reasons in {REPORT})" if skipped else ""
    print(f"caption: kept {len(kept)} images{note}; captions in {OUT}, contact sheet {SHEET}")


if __name__ == "__main__":
    main()
