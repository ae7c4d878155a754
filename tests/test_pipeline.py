"""The offline demo end to end: `make demo` (a real `dvc exp run`) in a fresh copy of the repo."""

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import sdtune
from conftest import ROOT, assert_no_secret, run, wandb_stage
from sdtune import io, params as params_lib, runtime
from sdtune.evaluate import report as eval_report
from sdtune.families import common, sd
from sdtune.profiling import kernels

pytestmark = pytest.mark.slow
STAGES = list(runtime.STAGES)


def finite_numbers(obj):
    if isinstance(obj, dict):
        return all(finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite_numbers(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def test_every_stage_ran_and_wrote_its_outputs(demo):
    log = (demo / "demo.log").read_text()
    assert ran(log) == STAGES
    for path in ["data/raw.manifest.json", "data/captions.jsonl", "cache/index.json",
                 "models/lora/pytorch_lora_weights.safetensors", "models/quantized/int8wo-fused/config.json",
                 "reports/train_loss.png", "reports/captions.png", "reports/eval.md", "reports/profile.md",
                 "reports/profile/phases.png", "reports/validation/step-0000030.png", "reports/REPORT.md"]:
        assert (demo / path).is_file(), path
    for stage in STAGES[:-1]:
        assert json.loads((demo / f"reports/stages/{stage}.json").read_text())["seconds"] > 0


def test_reports_hold_finite_numbers(demo):
    train = json.loads((demo / "reports/train.json").read_text())
    assert train["steps"] == 30 and math.isfinite(train["final_loss"])
    evals = json.loads((demo / "reports/eval.json").read_text())
    assert list(evals) == ["base", "lora", "int8wo-fused"]
    for record in evals.values():
        for key in ["clip_score", "fid", "kid", "style_similarity", "psnr_to_lora", "latency_s", "peak_memory_mib"]:
            assert math.isfinite(record[key]), key
    assert evals["lora"]["psnr_to_lora"] == 100.0  # its own reference
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    assert [r["dtype"] for r in evals.values()] == [dtype, dtype, "bfloat16"]  # int8wo runs in bf16
    profile = json.loads((demo / "reports/profile.json").read_text())
    assert finite_numbers(profile)
    for cell in profile["cells"].values():
        assert 0 < cell["mfu"] <= 1
        assert cell["coverage"] >= 0.95
    # the Makefile's demo cells, the last one the saved int8wo variant (which runs in bf16)
    assert list(profile["inference"]) == ["fp32", "fp32-no-lora", "math-attention", "int8wo-fused"]
    assert profile["inference"]["int8wo-fused"]["dtype"] == "bfloat16"
    for cell in profile["inference"].values():
        assert cell["seconds_per_image"] > 0 and 0 < cell["mfu"] <= 1 and cell["flops_per_image"] > 0
    if not torch.cuda.is_available():  # the demo's qlora cell needs CUDA: reported, and the others ran
        assert "qlora" not in profile["cells"] and len(profile["cells"]) == 6
        reason = profile["failed"]["matrix"]["qlora"]["reason"]
        assert reason.startswith("train.qlora: 4-bit NF4 loading needs a CUDA GPU")
        assert f"- `qlora` (matrix): {reason}" in (demo / "reports/profile.md").read_text()
    trace = json.loads((demo / "reports/traces/trace-baseline.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forward", "backward", "optimizer"} <= names
    # The traced cells' time by kind of kernel, each kind's FLOPs beside it: the baseline and the fastest.
    base, best = profile["cells"]["baseline"], profile["cells"][profile["best"]]
    for cell in {base["name"]: base, best["name"]: best}.values():
        kinds = {row["kind"]: row for row in cell["kernels"]["rows"]}
        assert {"convolution", "matmul", "attention"} <= set(kinds)
        traced = cell["reference_step"]["flops_by_kind"]  # the demo's steps are all full: the mean step's
        assert traced == pytest.approx(cell["flops_by_kind"])
        assert all(kinds[k]["tflop"] * 1e12 == pytest.approx(traced[k]) for k in ("convolution", "matmul"))
        assert f"Kernel time by kind in `{cell['name']}`'s traced steps" in (demo / "reports/profile.md").read_text()
        # Where its copies came from: the op, the ops it ran inside, and its inputs. On a CPU each
        # is a copy op itself (on a GPU, a convolution may launch cuDNN's layout kernels).
        copies = cell["kernels"]["copies"]
        assert copies and all(c["ms"] > 0 for c in copies) and any(c["inputs"] for c in copies)
        if not torch.cuda.is_available():
            assert all(kernels.kind(c["op"]) in ("copy", "layout") for c in copies)
    assert sum(base["flops_by_kind"].values()) == pytest.approx(base["flops_per_step"])
    assert all("kernels" not in c for name, c in profile["cells"].items() if name not in (base["name"], best["name"]))
    # Every cell's floor on this device, kind by kind; the traced cells' kernels set against it.
    for cell in profile["cells"].values():
        floor = cell["floor"]
        assert {"convolution", "matmul", "matmul: LoRA"} <= set(floor["kinds"])
        # The math-attention cell's attention is plain matmuls; the others dispatch the fused kernels.
        assert ("attention" in floor["kinds"]) == (cell["spec"].get("attention") != "math"), cell["name"]
        assert floor["ms"] == pytest.approx(sum(k["bound_ms"] for k in floor["kinds"].values())) and floor["ms"] > 0
        assert floor["ceiling_tflops"] == cell["ceiling_tflops"] and floor["bandwidth_gbs"] > 0
        assert floor["exp_tera_per_s"] is None  # a CPU's exponentials have no units of their own
        assert (floor["kinds"].get("attention", {}).get("exps", 0) > 0) == ("attention" in floor["kinds"])
    for cell in (base, best):
        ms = {k: sum(r["ms"] for r in cell["kernels"]["rows"] if r["kind"] == k) for k in ("convolution", "matmul")}
        floors, ratios = cell["floor"]["kinds"], cell["kernels"]["vs_floor"]
        assert ratios["convolution"] == pytest.approx(ms["convolution"] / floors["convolution"]["bound_ms"])
        # A trace cannot tell LoRA's matmuls from the others: they are set against both floors.
        matmul_floor = floors["matmul"]["bound_ms"] + floors["matmul: LoRA"]["bound_ms"]
        assert ratios["matmul"] == pytest.approx(ms["matmul"] / matmul_floor)
    profile_md = (demo / "reports/profile.md").read_text()
    assert profile_md.count("'s kinds against their floor. Each kind's floor: one step's ops") == len({base["name"], best["name"]})
    assert "|   of which LoRA | " in profile_md


def test_sample_grid_is_a_png_of_the_expected_size(demo):
    img = Image.open(demo / "reports/samples/grid.png")
    assert img.format == "PNG"
    # 3 variants side by side; 2 prompts x 2 seeds down, labelled in a 64 px margin; the 64 px
    # samples in 128 px cells (room for a variant's name) under a 14 px label row.
    assert img.size == (64 + 3 * 128, 14 + 4 * 128)
    table = (demo / "reports/eval.md").read_text()
    prompts = [ln for ln in (demo / "prompts/demo.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert f"prompt 1: `{prompts[0]}`; prompt 2: `{prompts[1]}`" in table
    # On a CPU the peak is a resident set: said, or the smallest variant, sampled last, reads largest.
    assert "peak_memory_mib on a CPU is the process's resident set" in table


def test_grid_labels_fit_their_column(tmp_path):
    names = ["float8wo-adapter", "a-variant-name-far-too-long-for-one-column"]
    sample = Image.new("RGB", (64, 64), "gray")
    assert eval_report.grid({n: [sample] for n in names}, tmp_path / "g.png") == (2 * 128, 14 + 128)
    labels = eval_report.row_labels(["a", "b"], [0, 7])
    assert labels == ["prompt 1\nseed 0", "prompt 1\nseed 7", "prompt 2\nseed 0", "prompt 2\nseed 7"]
    rows = {n: [sample] * 4 for n in names}
    assert eval_report.grid(rows, tmp_path / "r.png", rows=labels) == (64 + 2 * 128, 14 + 4 * 128)
    margin = Image.open(tmp_path / "r.png").crop((0, 14, 64, 14 + 128)).convert("L")
    assert margin.getextrema()[0] < 128  # the row's label is drawn there
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert eval_report.fit(draw, names[0], 128 - 4) == names[0]
    cut = eval_report.fit(draw, names[1], 128 - 4)
    assert names[1].startswith(cut) and len(cut) < len(names[1]) and draw.textlength(cut) <= 124


def test_a_long_seed_widens_the_grids_margin_rather_than_being_cut(tmp_path):
    """A 64 px margin cut `seed 20240101` to `seed 202401`: a wrong seed, not a short one."""
    sample = Image.new("RGB", (64, 64), "gray")
    labels = eval_report.row_labels(["a"], [20240101])
    width, _ = eval_report.grid({"lora": [sample]}, tmp_path / "g.png", rows=labels)
    need = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength("seed 20240101")
    assert width - 128 >= need + 2
    margin = Image.open(tmp_path / "g.png").crop((64, 14, width - 128, 14 + 128)).convert("L")
    assert margin.getextrema()[0] < 128  # the seed's last digits are drawn past the old margin


def test_lora_changes_the_output_and_scale_zero_does_not(demo):
    model = params_lib.parse({"model": {"id": "tiny", "resolution": 64}}).model
    pipe = sd.load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)

    def image():
        g = torch.Generator().manual_seed(7)
        return pipe("a red circle", num_inference_steps=3, height=64, width=64, generator=g, output_type="np").images

    base = image()
    pipe.load_lora_weights(str(demo / "models/lora"), weight_name=common.LORA_FILE, adapter_name="demo")
    tuned = image()
    pipe.set_adapters(["demo"], [0.0])
    zero = image()
    assert abs(tuned - base).max() > 1e-3
    assert abs(zero - base).max() == 0


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_loras_lineage_names_the_demos_data_cache_params_and_commit(demo):
    meta = io.read_safetensors_metadata(demo / "models/lora" / common.LORA_FILE)
    assert meta["base_model"] == "tiny" and re.fullmatch(r"tiny:[0-9a-f]{16}", meta["base_commit"])
    # The data by content, as the README's shell line computes it (not the manifest, which names data.source).
    listing = subprocess.run("find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum",
                             shell=True, cwd=demo / "data/raw", capture_output=True, text=True, check=True)
    assert meta["dataset_sha256"] == listing.stdout.split()[0]
    assert meta["cache_index_sha256"] == sha256_of(demo / "cache/index.json")
    # the fixture's copy is a git repo with one commit; `dvc exp run` trains in that workspace
    head = run(["git", "rev-parse", "HEAD"], demo).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", head) and meta["git_commit"] == head
    assert meta["sdtune_version"] == sdtune.__version__
    # the params the LoRA was trained with: the demo's params.yaml (the demo's values, from dvc exp run -S)
    params = params_lib.load(demo / "params.yaml")
    assert params.model.id == "tiny"
    assert meta["params_sha256"] == runtime.provenance(params)["params_sha256"]
    # which anyone can recompute from dvc.lock: params.yaml writes out every key, so DVC records them all
    from ruamel.yaml import YAML

    locked = YAML(typ="safe", pure=True).load((demo / "dvc.lock").read_text())["stages"]["train"]["params"]
    for key in params_lib.ALONG_THE_WAY:  # the keys of the loop around the step: not the weights'
        locked["params.yaml"]["train"].pop(key)
    assert meta["params_sha256"] == io.sha256_json(locked["params.yaml"])


def test_dvc_metrics_show_reads_every_metric(demo):
    """No metrics file DVC cannot load (a key named `error` reads to DVC as a failure; a list is
    skipped), so the quantize numbers show next to the others."""
    out = run(["dvc", "metrics", "show"], demo)
    said = (out.stdout + out.stderr).lower()
    assert "failed to load" not in said and "could not parse" not in said, out.stderr
    assert "variants.int8wo-fused.disk_bytes" in out.stdout


def test_report_is_generated_from_the_numbers(demo):
    text = (demo / "reports/REPORT.md").read_text()
    train = json.loads((demo / "reports/train.json").read_text())
    assert re.fullmatch(r".+ CPU, \d+ threads", train["device_name"])  # the CPU's model, from /proc/cpuinfo
    assert f"- hardware: {train['device_name']} (cpu), mixed precision `no`" in text
    assert (f"Final loss {train['final_loss']:.4f} (the mean of the last {train['final_loss_steps']} steps)" in text
            and train["final_loss_steps"] == 5)  # the window of the loss curve's running mean at 30 steps
    assert f"These step times were measured on {train['device_name']}, not on that machine's GPU." in text
    assert "At $0.85/h (g2-standard-8's approximate on-demand price in us-central1, 20" in text
    profile_md = (demo / "reports/profile.md").read_text()
    assert profile_md.startswith(f"Measured on {train['device_name']}: each step time is the median of 3 steps")
    assert "so an on-the-fly cell's include its VAE and text encoders" in profile_md  # the demo has one
    # Stage times in the order the stages ran, not alphabetically.
    rows = [line.split("|")[1].strip() for line in text.split("## Stage times")[1].split("##")[0].splitlines()
            if line.startswith("| ") and not line.startswith("| stage")]
    assert rows == STAGES[:-1]  # report writes no stage time of its own
    evals = json.loads((demo / "reports/eval.json").read_text())
    assert f"{evals['int8wo-fused']['psnr_to_lora']:.1f} dB" in text
    assert "## What helped, what did not" in text and "`checkpointing`" in text
    # What checkpointing is for, which the CPU's resident-set peak does not show.
    assert re.search(r"- `checkpointing` .*, kept for the backward -[1-9]\d%\.", text)
    # Every chart the profile stage draws, each where it is: W&B gets them all, REPORT.md did not.
    pictures = re.findall(r"!\[[^]]*\]\((profile/[^)]+)\)", text)
    assert sorted(pictures) == sorted(f"profile/{p.name}" for p in (demo / "reports/profile").glob("*.png"))
    assert len(pictures) == 5
    assert "| cell | peak MiB | reserved MiB | weights MiB |" in profile_md
    profile = json.loads((demo / "reports/profile.json").read_text())
    best = profile["cells"][profile["best"]]
    first = best["kernels"]["rows"][0]
    assert f"- Where `{best['name']}`'s kernel time went: {first['kind']} {first['share']:.0%}" in text
    slowest = min((r for r in best["kernels"]["rows"] if r["tflops"]), key=lambda r: r["tflops"])
    assert f"{slowest['kind']} does the fewest a second ({slowest['tflops']:.3g} TFLOP/s)" in text
    ratios = best["kernels"]["vs_floor"]
    furthest = max(ratios, key=ratios.get)
    assert f"`{best['name']}`'s kernels take: {furthest} {ratios[furthest]:.1f}×" in text
    assert f"; {furthest} is furthest from what the device allows." in text
    copying = sum(r["ms"] for r in best["kernels"]["rows"] if r["kind"] in ("copy", "layout"))
    top = best["kernels"]["copies"][0]
    assert (f"- Copies and layout changes took {copying:.2f} ms of `{best['name']}`'s "
            f"{best['kernels']['kernel_ms']:.2f} ms of kernels a step" in text)
    assert f"; the most, {top['ms']:.2f} ms, from `{top['op']}` inside `{top['callers'][0]}`" in text
    # The on-the-fly cell is the way without the cache: its sentence is about what the cache bought.
    profile = json.loads((demo / "reports/profile.json").read_text())
    cells = profile["cells"]
    fly, base = cells["on-the-fly"], cells["baseline"]
    assert fly["phases"]["phases"]["encode"]["median_ms"] > 0
    # speed is images a second (from what the measured steps trained), not the inverse step time
    assert (f"and ran {base['images_per_second'] / fly['images_per_second']:.2f}× the speed of `on-the-fly`" in text
            and f"({fly['step_ms']:.1f} vs {base['step_ms']:.1f} ms/step" in text)
    # What all the switches together bought over the examples' way: said unless the fastest cell is
    # `on-the-fly` itself or `baseline`, its cached twin, whose sentence is the one above.
    best = cells[profile["best"]]
    assert best["images_per_second"] == max(c["images_per_second"] for c in cells.values())
    fastest = "- The fastest cell, "
    if best["name"] in ("baseline", "on-the-fly"):
        assert fastest not in text
    else:
        speed = best["images_per_second"] / fly["images_per_second"]
        assert f"{fastest}`{best['name']}`, ran {speed:.2f}× the speed of `on-the-fly`" in text


def test_the_reports_lineage_is_the_loras_not_the_workspaces(demo, tmp_path):
    """The report stage re-runs where train does not (a data.source holding the same bytes writes
    another manifest; a later commit): it says what the LoRA was trained from, from its metadata."""
    ws = tmp_path / "ws"
    for folder in ["reports", "models/lora"]:
        shutil.copytree(demo / folder, ws / folder)
    shutil.copy(demo / "params.yaml", ws / "params.yaml")
    (ws / "data").mkdir()
    (ws / "data/raw.manifest.json").write_text('{"source": "elsewhere", "files": []}')
    run([sys.executable, "-m", "stages.report"], ws, env={"PYTHONPATH": str(ROOT)})
    meta = io.read_safetensors_metadata(ws / "models/lora" / common.LORA_FILE)
    line = next(s for s in (ws / "reports/REPORT.md").read_text().splitlines() if s.startswith("- the LoRA"))
    assert line == (f"- the LoRA (its metadata): trained at commit `{meta['git_commit']}` with sdtune "
                    f"{meta['sdtune_version']}, base `tiny` at `{meta['base_commit']}`, dataset sha256 "
                    f"`{meta['dataset_sha256'][:16]}…`, params sha256 `{meta['params_sha256'][:16]}…`")


def test_dvc_plots_show_reads_every_declared_plot(demo):
    # Plots folders hold only what DVC can render: images and tables (traces live in reports/traces).
    out = run(["dvc", "plots", "show", "-o", str(demo / "plots-html")], demo)
    assert "failed to load" not in (out.stdout + out.stderr).lower(), out.stderr
    assert (demo / "plots-html/index.html").stat().st_size > 0
    # and each chart can draw its data: a quantitative axis reads numbers (a bar_horizontal plot
    # with x and y the wrong way round put the names on the number axis and drew no bars)
    shown = json.loads(run(["dvc", "plots", "show", "--json"], demo).stdout)
    charts = [c["content"] for plots in shown["data"].values() for c in plots if c["type"] == "vega"]
    assert charts
    def number(v):  # CSV plots hold numbers as text, which Vega parses
        try:
            return math.isfinite(float(v))
        except ValueError:
            return False

    for chart in charts:
        for axis in ("x", "y"):
            enc = chart["encoding"].get(axis) or {}
            if enc.get("type") == "quantitative":
                values = [row[enc["field"]] for row in chart["data"]["values"]]
                assert values and all(number(v) for v in values), (chart["title"], axis, values[:3])


def test_report_goes_to_wandb_when_it_is_on(demo, tmp_path):
    """train.wandb: offline (the default of the real run): the report's tables, pictures and
    REPORT.md land in a W&B run next to the training run; no secret goes with them."""
    ws = tmp_path / "ws"
    shutil.copytree(demo / "reports", ws / "reports")
    shutil.copytree(demo / "models/lora", ws / "models/lora")
    params = (demo / "params.yaml").read_text()
    assert "wandb: disabled" in params
    (ws / "params.yaml").write_text(params.replace("wandb: disabled", "wandb: offline"))
    done = wandb_stage("report", ws)
    assert done.returncode == 0, done.stderr[-3000:]
    [wandb_run] = (ws / "wandb").glob("offline-run-*")
    files = wandb_run / "files"
    tables = {p.name.rsplit("_", 2)[0] for p in files.rglob("*.table.json")}
    assert tables == {"training", "inference", "eval"}
    training = json.loads(next(files.rglob("training_*.table.json")).read_text())
    cells = json.loads((demo / "reports/profile.json").read_text())["cells"]
    assert [row[0] for row in training["data"]] == list(cells)  # every measured cell, in order
    kept = training["columns"].index("kept_for_backward_mib")
    assert [row[kept] for row in training["data"]] == [c["memory"]["kept_for_backward_bytes"] / 2**20
                                                        for c in cells.values()]
    assert len(list(files.rglob("*.png"))) >= 6  # loss curve, samples, profile charts
    report = files / "REPORT.md"  # a copy: a run synced later still holds this report
    assert not report.is_symlink() and report.read_text() == (ws / "reports/REPORT.md").read_text()
    assert_no_secret(ws / "wandb")


def test_second_repro_does_nothing_and_train_params_rerun_only_downstream(demo, tmp_path):
    # In a copy of the demo: it re-runs at 20 steps, and the other tests read the demo at 30.
    demo = Path(shutil.copytree(demo, tmp_path / "demo", symlinks=True))
    again = run(["dvc", "repro"], demo)
    assert ran(again.stdout) == []
    assert "Data and pipelines are up to date" in again.stdout
    # A fresh clone has no checkpoints/ (resume state, not pushed): after `dvc pull` nothing re-runs.
    shutil.rmtree(demo / "checkpoints", ignore_errors=True)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], demo).stdout
    text = (demo / "params.yaml").read_text()
    (demo / "params.yaml").write_text(text.replace("steps: 30", "steps: 20", 1))
    changed = run(["dvc", "repro"], demo, timeout=1200)
    assert ran(changed.stdout) == ["train", "quantize", "evaluate", "profile", "report"]
    assert json.loads((demo / "reports/train.json").read_text())["steps"] == 20


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_the_demo_runs_for_the_other_families_through_the_hub_loading_code(family, tmp_path):
    """The demo's `dvc exp run`, with model.family switched and model.id a folder holding the
    family's tiny pipeline as diffusers saves it: every stage loads its model the way the real run
    does (from_pretrained with subfolders), end to end, and the LoRA names that folder."""
    import shlex

    from conftest import copy_repo
    from sdtune import families

    repo = copy_repo(tmp_path / "repo")
    weights = tmp_path / f"{family}-tiny"
    tiny = params_lib.parse({"model": {"family": family, "id": "tiny", "resolution": 64}}).model
    families.get(family).load_pipeline(tiny).save_pretrained(weights)
    # --no-print-directory: under `make test` this make is a sub-make, which would say where it is
    printed = run(["make", "--no-print-directory", "-n", "demo"], repo).stdout.splitlines()
    (demo_cmd,) = [line for line in printed if line.startswith("HF_HUB_OFFLINE=1 dvc exp run ")]
    # Two training cells and one generation cell: the others run the same family code as these,
    # and cost minutes of CI each.
    demo_args = shlex.split(demo_cmd)[1:]
    for key in ("++profile.matrix=", "++profile.inference="):  # each key set once
        at = next(i for i, arg in enumerate(demo_args) if arg.startswith(key))
        del demo_args[at - 1:at + 1]
    args = demo_args + ["-S", f"++model.family={family}", "-S", f"++model.id={weights}", "-S", "++base.device=cpu",
                        "-S", "++profile.matrix=[{name: baseline}, {name: checkpointing, gradient_checkpointing: true}]",
                        "-S", "++profile.inference=[{name: fp32}]"]
    out = run(args, repo, timeout=1200)
    assert ran(out.stdout) == STAGES, out.stdout[-3000:]
    meta = io.read_safetensors_metadata(repo / "models/lora" / common.LORA_FILE)
    assert meta["base_model"] == str(weights) and meta["base_commit"].startswith("local:")
    evals = json.loads((repo / "reports/eval.json").read_text())
    assert list(evals) == ["base", "lora", "int8wo-fused"] and finite_numbers(evals)
    profile = json.loads((repo / "reports/profile.json").read_text())
    assert finite_numbers(profile["cells"]) and profile["best"] in profile["cells"]
    assert "## What helped, what did not" in (repo / "reports/REPORT.md").read_text()
