"""report: reports/REPORT.md, the run's findings on one page (setup, curve, tables, charts, cost)."""

from sdtune import io, params as params_lib, report, runtime
from sdtune.errors import main_guard

OUT = "reports/REPORT.md"


@main_guard
def main():
    params = params_lib.load()
    text = report.build(params, runtime.provenance(params))
    io.write_text(OUT, text)
    print(f"report: {OUT}")


if __name__ == "__main__":
    main()
