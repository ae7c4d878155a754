"""dvc.yaml against the code: the stages in order, and every module a stage runs among its deps.

A module a stage imports but does not list is a change DVC cannot see: the stage would keep its
old outputs after the code that made them changed. The imports are read from the source (AST),
so an import inside a function counts as much as one at the top of a file.
"""

import ast
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from sdtune import runtime

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# The shared plumbing dvc.yaml leaves out on purpose (see its header comment).
FAMILIES = ROOT / "sdtune" / "families" / "__init__.py"
ASSETS = ROOT / "sdtune" / "assets"
PLUMBING = {"sdtune/__init__.py", "sdtune/params.py", "sdtune/io.py", "sdtune/errors.py", "sdtune/runtime.py"}


def module_file(name: str) -> Path | None:
    """The file behind a dotted sdtune name; None for a name that is not a module (a function)."""
    path = ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def sdtune_imports(path: Path) -> set[Path]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "sdtune"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "sdtune":
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {f for n in names if (f := module_file(n)) is not None}


def code_run_by(script: Path) -> set[str]:
    """Every sdtune file the script imports, directly or through other sdtune modules."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += sdtune_imports(path)
            if path == FAMILIES:  # families.get imports a family by name, which no import statement shows
                todo += sorted(FAMILIES.parent.glob("*.py"))
    return {str(p.relative_to(ROOT)) for p in seen - {script}}


def only_a_docstring(rel: str) -> bool:
    body = ast.parse((ROOT / rel).read_text()).body
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def test_stage_list_is_dvc_yaml_in_order():
    assert list(STAGES) == list(runtime.STAGES)


@pytest.mark.parametrize("name", list(STAGES))
def test_every_param_a_stage_lists_is_in_params_yaml(name):
    """DVC refuses to run a stage whose listed param is missing from params.yaml (the defaults in
    params.py do not count), so a param added to a stage must be written out there too."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = []
    for key in (k for k in STAGES[name].get("params", []) if isinstance(k, str)):
        node = params
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert not missing, f"{name}: add to params.yaml: {missing}"


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_depends_on_its_script_and_the_code_it_runs(name):
    deps = [d for d in STAGES[name]["deps"] if isinstance(d, str)]
    assert f"stages/{name}.py" in deps
    used = code_run_by(ROOT / "stages" / f"{name}.py") - PLUMBING
    # The files a module reads count as its code (the tiny models' tokenizer, the tiny captioner):
    # a module that names an asset folder needs that folder among the stage's deps too.
    assets = {f"sdtune/assets/{a.name}" for f in used for a in ASSETS.iterdir() if a.name in (ROOT / f).read_text()}
    missing = sorted(f for f in used | assets if (f in assets or not only_a_docstring(f))
                     and not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"{name}: add to its deps in dvc.yaml: {missing}"


@pytest.mark.parametrize("name", list(STAGES))
def test_no_stage_depends_on_code_it_does_not_run(name):
    """The other way: an edit to a module a stage never imports re-ran it for nothing. profile listed
    sdtune/train whole, validate.py and outputs.py with it; train ran sdtune/quantize.py through
    generate.py, so a change to how variants are saved trained again from step 0."""
    used = code_run_by(ROOT / "stages" / f"{name}.py")
    listed = [d for d in STAGES[name]["deps"] if isinstance(d, str) and d.startswith("sdtune/")
              and not d.startswith("sdtune/assets/")]
    files = {str(f.relative_to(ROOT)) for d in listed
             for f in ((ROOT / d).rglob("*.py") if (ROOT / d).is_dir() else [ROOT / d])}
    unused = sorted(f for f in files if f not in used and not only_a_docstring(f))
    assert not unused, f"{name}: depends on code it does not run: {unused}"


def test_the_walk_follows_imports_through_modules_functions_and_family_lookup(tmp_path):
    # The checker itself. The training loop reaches the validation sampler only through
    # sdtune.train.validate; quantize is not reached (variants load in evaluate/pipelines.py).
    used = code_run_by(ROOT / "stages" / "train.py")
    assert {"sdtune/train/validate.py", "sdtune/evaluate/generate.py"} <= used
    assert "sdtune/quantize.py" not in used
    assert "sdtune/families/sd3.py" in used  # loaded by name through families.get
    assert "sdtune/data/sources.py" not in used  # and it does not take in everything
    script = tmp_path / "lazy.py"
    script.write_text("def later():\n    from sdtune import quantize\n")
    assert "sdtune/quantize.py" in code_run_by(script)  # an import inside a function counts too


def test_profile_depends_on_every_train_key_but_those_of_the_loop_around_the_step():
    """A change to train.log_every or the validation images re-ran the whole profile matrix."""
    from sdtune.params import ALONG_THE_WAY, Train

    listed = {k.removeprefix("train.") for k in STAGES["profile"]["params"] if k.startswith("train")}
    assert listed == set(Train.model_fields) - set(ALONG_THE_WAY)


def test_the_loras_params_hash_covers_the_params_the_train_stage_lists():
    """runtime.LORA_PARAMS (what a LoRA's params_sha256 hashes) is what dvc.yaml lists for train:
    a change DVC re-trains for moves it, and one that re-runs only the stages before it, leaving
    their outputs as they were, does not (the LoRA is then the same)."""
    assert set(STAGES["train"]["params"]) == set(runtime.LORA_PARAMS)


def test_a_checkpoints_fingerprint_hashes_the_train_stages_code_but_what_only_measures():
    """loop.TRAINING_CODE is the train stage's sdtune code deps in dvc.yaml but sdtune/profiling
    (timers and memory counts): a change DVC re-runs train for is one its checkpoints must not outlive.
    The tiny models' tokenizer in sdtune/assets is part of their revision, which is fingerprinted."""
    from sdtune.train import loop

    deps = {dep for dep in STAGES["train"]["deps"] if dep.startswith("sdtune/")
            and not dep.startswith(("sdtune/profiling/", "sdtune/assets/"))}
    assert {str(path.relative_to(ROOT)) for path in loop.TRAINING_CODE} == deps
