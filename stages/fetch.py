"""fetch: materialise data.source into data/raw/ and write data/raw.manifest.json."""

from sdtune import io, params as params_lib, runtime
from sdtune.data import sources
from sdtune.errors import main_guard

RAW, MANIFEST = "data/raw", "data/raw.manifest.json"


@main_guard
def main():
    p = params_lib.load().data
    with runtime.stage("fetch"):
        # Fetch into a temporary folder and swap it in: a failed fetch keeps the old data/raw.
        with io.atomic_path(RAW) as tmp:
            rows = sources.fetch(p.source, tmp, sha256=p.sha256, retries=p.retries,
                                 max_archive_bytes=p.max_archive_bytes, max_archive_files=p.max_archive_files)
        io.write_json(MANIFEST, {"source": p.source, "files": rows})
    print(f"fetch: {len(rows)} files from {p.source} into {RAW}/")


if __name__ == "__main__":
    main()
