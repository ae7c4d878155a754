"""fetch: materialise data.source into data/raw/ and write data/raw.manifest.json."""

from sdtune import io, params as params_lib, runtime
from sdtune.data import sources
from sdtune.errors import main_guard

RAW, MANIFEST = "data/raw", "data/raw.manifest.json"


@main_guard
def main():
    p = params_lib.load().data
    with runtime.stage("fetch"):
        # replace: fetch builds beside data/raw and swaps it in at the end; a failed fetch keeps the old one.
        skipped = []  # links leaving the source, special files, OS junk: never copied
        rows = sources.fetch(p.source, RAW, sha256=p.sha256, retries=p.retries, skipped=skipped, replace=True,
                             max_archive_bytes=p.max_archive_bytes, max_archive_files=p.max_archive_files)
        io.write_json(MANIFEST, {"source": runtime.redacted(p.source), "files": rows, "skipped": skipped})
    note = f"; left out {len(skipped)} (reasons in {MANIFEST})" if skipped else ""
    print(f"fetch: {len(rows)} files from {runtime.redacted(p.source)} into {RAW}/{note}")
    if "://" not in p.source:  # DVC sees the params, not the files behind a path
        print(f"fetch: DVC does not watch {p.source}; after changing its files, run `dvc repro -f fetch && dvc repro`")


if __name__ == "__main__":
    main()
