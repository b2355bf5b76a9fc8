"""Every error says "Expected … Received: key=value" (segpipe.errors), naming the key once.

(a) An AST scan over segpipe/: the message of each ``raise X(<message>)`` is built by
    ``expected(...)`` / ``SettingError(...)`` (or ``UnknownKeyError``, a SettingError of
    segpipe.settings), or is a literal/f-string of that form. Modules other helpers own are
    exempt as a whole; single sites are exempt only with a reason.
(b) Real bad inputs: the full message text, and the key appears once.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

import segpipe

PACKAGE = Path(segpipe.__file__).resolve().parent
ROOT = PACKAGE.parent

# Every module is converted (issue 13); a module may be exempted here only while its owner converts it.
EXEMPT_MODULES: set[str] = set()
EXEMPT_PACKAGES: tuple[str, ...] = ()
NOT_MESSAGES = {"SystemExit"}  # takes an exit code, not a message
# errors whose constructor words the message through expected(): (key, what, received), not a message
SELF_WORDED = {"SettingError", "UnknownKeyError", "with_prefix", "ScanSizeError"}

# (module, the raised expression as ast.unparse writes it): why it is not "Expected … Received".
JUSTIFIED = {
    ("segpipe/training/train.py", "ConfigError(f'loss: {exc}')"):
        "re-raises get_loss's own message (segpipe.losses words and checks its errors) under the config "
        "section it came from; a SettingError from get_loss is prefixed with 'loss.' instead",
    ("segpipe/training/train.py", "TrainingInterrupted(run_dir, stop.signal_number, stopped.epoch, stopped.step)"):
        "not a bad value but a status: the class words it as 'SIGINT: stopped after … Continue with: …'",
    ("segpipe/training/interrupts.py", "KeyboardInterrupt(f'{signal.Signals(signal_number).name} received twice')"):
        "a user's second Ctrl-C aborting at once, not an input that was expected to be different",
    ("segpipe/inference/bundle.py", "BundleError(str(exc))"):
        "re-raises the message of PreprocessSettings.from_dict, check_architecture or the manifest check (bundle.json, "
        "the key path, expected and received) as the bundle's error type",
    ("segpipe/training/distributed.py", "AttributeError(name)"):
        "Python's attribute protocol in __getattr__: the message is the attribute name, as Python's own",
}

BUILDERS = {"expected", "_expected"}  # _expected: models.architecture's closure over expected (adds the key path)
WORDED = re.compile(r"^(\S+: )?Expected .+?\. Received: [^\s=]+=", re.S)


def _render(node: ast.expr) -> str | None:
    """The text of a literal or f-string message, with each ``{…}`` as ``{}``; None if not literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _render(node.left), _render(node.right)
        return None if left is None or right is None else left + right
    return None


def _name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _worded(node: ast.expr, assignments: dict[str, list[ast.expr]], depth: int = 0) -> bool:
    if isinstance(node, ast.Call) and _name(node.func) in BUILDERS:
        return True
    if isinstance(node, ast.Call) and _name(node.func) == "str" and node.args:  # str(exc.with_prefix("x."))
        inner = node.args[0]
        return isinstance(inner, ast.Call) and _name(inner.func) == "with_prefix"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and _worded(node.left, assignments, depth):
        return True  # expected(...) + "\n  <one line per problem>"
    if isinstance(node, ast.Name) and depth < 3 and assignments.get(node.id):
        return all(_worded(v, assignments, depth + 1) for v in assignments[node.id])
    text = _render(node)
    return text is not None and WORDED.match(text) is not None


def badly_worded_raises(source: str, module: str = "<string>") -> list[tuple[int, str]]:
    """(line, raised expression) of every ``raise X(...)`` in ``source`` whose message is not worded."""
    tree = ast.parse(source)
    assignments: dict[str, list[ast.expr]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assignments.setdefault(target.id, []).append(node.value)
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Raise) or not isinstance(node.exc, ast.Call):
            continue  # bare ``raise`` and ``raise exc``: re-raising an error made elsewhere
        call = node.exc
        if _name(call.func) in SELF_WORDED or _name(call.func) in NOT_MESSAGES:
            continue
        if call.args and _worded(call.args[0], assignments):
            continue
        text = ast.unparse(call)
        if (module, text) not in JUSTIFIED:
            bad.append((node.lineno, text))
    return bad


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _exempt(module: str) -> bool:
    return module in EXEMPT_MODULES or module.startswith(EXEMPT_PACKAGES)


def test_every_raise_site_says_expected_and_received():
    bad = [f"{_relative(p)}:{line}: {text}" for p in _modules() if not _exempt(_relative(p))
           for line, text in badly_worded_raises(p.read_text(), _relative(p))]
    assert not bad, "raise sites not worded 'Expected … Received: key=value':\n" + "\n".join(bad)


def test_every_justified_exception_still_exists():
    """A stale entry would silently allow a new site with the same text."""
    found = set()
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                found.add((_relative(path), ast.unparse(node.exc)))
    assert set(JUSTIFIED) <= found, set(JUSTIFIED) - found
    assert all(reason.strip() for reason in JUSTIFIED.values())


def test_the_scan_covers_the_modules_of_this_task():
    scanned = {_relative(p) for p in _modules() if not _exempt(_relative(p))}
    for module in ("segpipe/config/loading.py", "segpipe/data/layouts.py", "segpipe/evaluation/folders.py",
                   "segpipe/training/checkpoints.py", "segpipe/training/sweep.py", "segpipe/cli/train.py",
                   "segpipe/io/durable.py", "segpipe/io/files.py", "segpipe/io/nifti.py", "segpipe/io/scan_size.py",
                   "segpipe/metrics/streaming.py", "segpipe/inference/settings.py", "segpipe/evaluation/predictions.py",
                   "segpipe/inference/segment.py", "segpipe/inference/sliding_window.py", "segpipe/models/unet3d.py",
                   "segpipe/losses/base.py", "segpipe/losses/options.py", "segpipe/losses/compound.py",
                   "segpipe/reports/html.py", "segpipe/reports/progress.py", "segpipe/reports/overlays.py",
                   "segpipe/export/bundle.py", "segpipe/export/run_export.py", "segpipe/inference/runtimes.py",
                   "segpipe/export/serving_graph.py",
                   "segpipe/inference/bundle.py", "segpipe/inference/integrity.py", "segpipe/models/architecture.py"):
        assert module in scanned


PLANTED = '''
from segpipe.errors import SettingError, expected

def good(x, exc):
    if x == 1:
        raise ValueError(expected("a number", key="x", received=x))
    if x == 2:
        raise SettingError("x", "a number", x)
    if x == 3:
        raise ValueError(f"{x}: Expected a number. Received: x={x!r}")
    if x == 4:
        raise ValueError("Expected a number. " f"Received: data.x={x}")
    if x == 5:
        message = expected("a number", key="x", received=x)
        raise TypeError(message)
    if x == 6:
        raise ValueError(expected("no problems", key="x", received=x) + "\\n  " + "\\n  ".join(["a", "b"]))
    if x == 7:
        raise ValueError(str(exc.with_prefix("data."))) from None
    raise

def bad(x):
    if x == 1:
        raise ValueError(f"Invalid value {x}")
    if x == 2:
        raise ValueError(f"Expected a number, got {x}")
    if x == 3:
        raise KeyError(f"Case {x!r} is not in the dataset")
    if x == 4:
        raise ValueError("Expected a number. Received: 3 things")
    if x == 5:
        text = f"Unknown key {x}"
        raise ValueError(text)
    raise ValueError()
'''


def test_the_scan_flags_planted_bad_raises_and_passes_good_ones():
    bad = badly_worded_raises(PLANTED)
    bad_start = PLANTED.splitlines().index("def bad(x):") + 1
    assert len(bad) == 6 and all(line > bad_start for line, _ in bad), bad


def test_a_bad_raise_planted_in_a_real_module_fails_the_scan():
    module = "segpipe/data/sampling.py"
    source = (ROOT / module).read_text()
    assert badly_worded_raises(source, module) == []
    planted = source + '\n\ndef _planted(x):\n    raise ValueError(f"Invalid value for `x`: {x}")\n'
    assert [text for _, text in badly_worded_raises(planted, module)] == ["ValueError(f'Invalid value for `x`: {x}')"]


# ---------------------------------------------------------------- (b) real bad inputs


def _config(*overrides):
    from segpipe.config import load_config

    return lambda tmp_path: load_config(None, list(overrides))


def _model_keys() -> str:
    from segpipe.config import ModelConfig

    return ", ".join(f.name for f in dataclasses.fields(ModelConfig))


def _augment_keys() -> str:
    from segpipe.data.augment import AugmentSettings

    return ", ".join(f.name for f in dataclasses.fields(AugmentSettings))


def _loss_names() -> list[str]:
    from segpipe.losses import available_losses

    return available_losses()


def _inference(**values):
    from segpipe.inference.settings import InferenceSettings

    return lambda tmp_path: InferenceSettings(**values)


def _inference_mapping(values):
    from segpipe.inference.settings import InferenceSettings

    return lambda tmp_path: InferenceSettings.from_dict(values)


def _model_file(which):
    def run(tmp_path):
        from segpipe.runs.rundir import RunDir

        (tmp_path / "run").mkdir()
        return RunDir(tmp_path / "run").model_file(which)
    return run


def _preprocess(data, **kwargs):
    def run(tmp_path):
        from segpipe.data.preprocess import PreprocessSettings

        return PreprocessSettings.from_dict(data, where="bundle/bundle.json", **kwargs)
    return run


def _folders(make_pred: bool, make_ref: bool):
    def run(tmp_path):
        from segpipe.evaluation.folders import evaluate_folders

        for name, make in (("pred", make_pred), ("ref", make_ref)):
            if make:
                (tmp_path / name).mkdir()
        return evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval", workers=1)
    return run


def _tolerance(values):
    def run(tmp_path):
        from segpipe.cli.evaluate import _parse_tolerance

        return _parse_tolerance(values)
    return run


def _split_file(content):
    def run(tmp_path):
        from segpipe.data.pipeline import read_split_file

        path = tmp_path / "split.json"
        if content is not None:
            path.write_text(json.dumps(content))
        return read_split_file(path)
    return run


def _phantoms_into_existing(tmp_path):
    from segpipe.data.phantoms import PhantomSettings, write_phantom_dataset

    (tmp_path / "ds").mkdir()
    return write_phantom_dataset(tmp_path / "ds", PhantomSettings())


def _dataset(meta, layout=None, folder="ds"):
    def run(tmp_path):
        from segpipe.data.layouts import load_dataset

        root = tmp_path / folder
        if meta is not None:
            root.mkdir()
            (root / "dataset.json").write_text(json.dumps(meta))
        return load_dataset(root, layout)
    return run


def _folds(folds):
    def run(tmp_path):
        from segpipe.training.sweep import plan_runs

        return plan_runs([], folds=folds)
    return run


def _augment(data):
    def run(tmp_path):
        from segpipe.data.augment import AugmentSettings

        return AugmentSettings.from_dict(data)
    return run


def _loss(spec):
    def run(tmp_path):
        from segpipe.losses import get_loss

        return get_loss(spec)
    return run


def _unet(**kwargs):
    def run(tmp_path):
        from segpipe.models.unet3d import build_unet3d

        return build_unet3d(1, 2, depth=2, base_filters=4, **kwargs)
    return run


def _history(content):
    def run(tmp_path):
        from segpipe.reports.progress import read_history

        (tmp_path / "h.csv").write_text(content)
        return read_history(tmp_path / "h.csv")
    return run


def _scans(name):
    def run(tmp_path):
        from segpipe.inference.segment import find_cases

        return find_cases(tmp_path / name)
    return run


T = "{tmp}"  # stands for tmp_path in the expected messages
CASES = [
    # (id, make the error, exception type, the full message, the key)
    ("augment-p", _config("data.augment={rotation: {p: 1.5}}"), ValueError,
     "Expected a probability in [0, 1]. Received: data.augment.rotation.p=1.5.", "data.augment.rotation.p"),
    ("augment-range", _config("data.augment={scaling: {range: [1.2, 0.8]}}"), ValueError,
     "Expected [low, high] with 0 < low <= high. Received: data.augment.scaling.range=[1.2, 0.8].",
     "data.augment.scaling.range"),
    ("augment-unknown", _config("data.augment={rotaton: {p: 0.1}}"), ValueError,
     "Expected a key of data.augment ({augment_keys}). Received: data.augment.rotaton={{'p': 0.1}}. "
     "Did you mean 'data.augment.rotation'?", "data.augment.rotaton"),
    ("config-range", _config("train.epochs=-1"), ValueError,
     "Expected >= 1. Received: train.epochs=-1.", "train.epochs"),
    ("config-choice", _config("model.norm=bach"), ValueError,
     "Expected one of ['batch', 'instance', 'none']. Received: model.norm='bach'. Did you mean 'batch'?", "model.norm"),
    ("config-unknown", _config("model.filters=8"), ValueError,
     "Expected a key of model ({model_keys}). Received: model.filters=8. Did you mean 'model.max_filters'?",
     "model.filters"),
    ("config-patch", _config("model.depth=4", "data.patch_size=[30, 32, 32]"), ValueError,
     "Expected every side divisible by 8 (model.depth=4 halves the patch 3 times). "
     "Received: data.patch_size=[30, 32, 32]. Nearest valid: [32, 32, 32]", "data.patch_size"),
    ("config-inference", _config("inference.overlap=0.96"), ValueError,
     "Expected a number in [0, 0.95]. Received: inference.overlap=0.96.", "inference.overlap"),
    ("config-override", _config("train.epochs"), ValueError,
     "Expected an override of the form key.sub=value. Received: --set='train.epochs'.", "--set"),
    ("inference-overlap", _inference(overlap=0.99), ValueError,
     "Expected a number in [0, 0.95]. Received: overlap=0.99.", "overlap"),
    ("inference-unknown", _inference_mapping({"overlaps": 0.5}), ValueError,
     "Expected a key of inference settings (overlap, mirror_axes, batch_size, sigma_scale, "
     "postprocess_largest_component, postprocess_largest_foreground). Received: overlaps=0.5. Did you mean 'overlap'?",
     "overlaps"),
    ("rundir-choice", _model_file("latest"), ValueError,
     "Expected one of ['best', 'last', 'final'] or a .keras file. Received: model='latest'.", "model"),
    ("rundir-missing", _model_file(None), FileNotFoundError,
     "Expected a trained model (checkpoints/best.keras or model.keras). Received: run_dir={tmp}/run (neither exists).",
     "run_dir"),
    ("preprocess-value", _preprocess({"normalization": "minmax"}, prefix="preprocessing."), ValueError,
     "bundle/bundle.json: Expected one of ['zscore', 'zscore_nonzero', 'ct', 'none']. "
     "Received: preprocessing.normalization='minmax'.", "preprocessing.normalization"),
    ("preprocess-unknown", _preprocess({"spacing": [1, 1, 1]}), ValueError,
     "bundle/bundle.json: Expected a key of preprocessing settings (target_spacing_mm, normalization, "
     "crop_to_nonzero, image_order, label_interpolation, intensity_stats). Received: spacing=[1, 1, 1].",
     "spacing"),
    ("folders-no-ref", _folders(True, False), FileNotFoundError,
     "Expected a folder of NIfTI label maps. Received: ref_dir={tmp}/ref (no such folder).", "ref_dir"),
    ("folders-empty-ref", _folders(True, True), ValueError,
     "Expected NIfTI reference files (.nii, .nii.gz). Received: ref_dir={tmp}/ref (has none).", "ref_dir"),
    ("tolerance", _tolerance(["1=a"]), ValueError,
     "Expected one number or LABEL=MM pairs. Received: --tolerance-mm=1=a.", "--tolerance-mm"),
    ("split-missing-file", _split_file(None), FileNotFoundError,
     "Expected a JSON file with train/val case ids. Received: data.split_file={tmp}/split.json (not found).",
     "data.split_file"),
    ("split-missing-key", _split_file({"train": ["a"]}), ValueError,
     "{tmp}/split.json: Expected a list of case ids. Received: val=<missing>.", "val"),
    ("split-overlap", _split_file({"train": ["a", "b"], "val": ["b"]}), ValueError,
     "{tmp}/split.json: Expected val cases that are not in train. Received: val=1 case(s) also in train, e.g. ['b'].",
     "val"),
    ("phantoms-exist", _phantoms_into_existing, FileExistsError,
     "Expected a new folder for the phantom dataset. Received: root={tmp}/ds (exists).", "root"),
    ("layout-none", _dataset(None, folder="nope"), FileNotFoundError,
     "Expected a dataset folder with dataset.json (MSD or nnU-Net v2 layout) or with images/ and labels/ "
     "subfolders. Received: root={tmp}/nope (no such folder, neither found).", "root"),
    ("layout-choice", _dataset({"labels": {"0": "bg"}, "training": []}, layout="bogus"), ValueError,
     "Expected one of ['auto', 'msd', 'nnunet', 'folders']. Received: layout='bogus'.", "layout"),
    ("layout-msd-key", _dataset({"labels": {"0": "bg"}}, layout="msd"), ValueError,
     "{tmp}/ds/dataset.json: Expected a key the MSD layout requires. Received: training=<missing>.", "training"),
    ("layout-regions", _dataset({"labels": {"background": 0, "whole": [1, 2]}, "channel_names": {"0": "t1"}}),
     ValueError, "{tmp}/ds/dataset.json: Expected one label value in 1..255 per region (1: ['whole']), written "
     "where the region is predicted. Received: regions_class_order=None.", "regions_class_order"),
    ("layout-ignore",
     _dataset({"labels": {"background": 0, "a": 1, "b": 2, "ignore": 1}, "channel_names": {"0": "t1"}}),
     ValueError, "{tmp}/ds/dataset.json: Expected an integer label value above every class value (highest: 2) and at "
     "most 255: the ignore label is the highest value, as in nnU-Net. Received: labels['ignore']=1.",
     "labels['ignore']"),
    ("layout-background", _dataset({"labels": {"1": "organ"}, "training": []}), ValueError,
     "{tmp}/ds/dataset.json: Expected labels that declare the background value 0. Received: labels={{1: 'organ'}}.",
     "labels"),
    ("sweep-folds", _folds(1), ValueError, "Expected a number of folds >= 2. Received: --folds=1.", "--folds"),
    ("augment-direct", _augment({"gamma": {"p": 2}}), ValueError,
     "Expected a probability in [0, 1]. Received: gamma.p=2.", "gamma.p"),
    ("loss-term-option", _loss({"terms": [{"name": "dice"}, {"name": "tversky", "alpha": -1}]}), ValueError,
     "Expected a number >= 0 for loss 'tversky'. Received: terms[1].alpha=-1.", "terms[1].alpha"),
    ("loss-name", _loss("tverski"), ValueError,
     "Expected one of {loss_names}, or a compound {{'terms': [...]}}. Received: "
     "name='tverski'. Did you mean 'tversky'?",
     "name"),
    ("model-strides", _unet(strides=[[2, 2, 2], [2, 2, 2]]), ValueError,
     "Expected [1, 1, 1] as stage 0 (full resolution). Received: strides=[[2, 2, 2], [2, 2, 2]].", "strides"),
    ("report-history", _history("epoch,loss\n1,0.5\n2,oops\n"), ValueError,
     "{tmp}/h.csv:3: Expected numbers. Received: loss='oops'.", "loss"),
    ("predict-input", _scans("nope"), FileNotFoundError,
     "Expected a NIfTI file or a folder of them. Received: input={tmp}/nope (no such file or folder).", "input"),
]


@pytest.mark.parametrize("make_error, error_type, message, key", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_real_bad_inputs_are_worded_with_the_key_once(tmp_path, make_error, error_type, message, key):
    text = message.format(tmp=tmp_path, model_keys=_model_keys(), augment_keys=_augment_keys(),
                          loss_names=_loss_names())
    with pytest.raises(error_type) as info:
        make_error(tmp_path)
    assert str(info.value) == text
    assert re.match(r"^(\S+: )?Expected .+?\. Received: ", text, re.S)
    assert text.count(f"Received: {key}=") == 1
    assert text.count(key + "=") == 1  # the key is named once, not repeated in front ("data.x: … x=")
    if "." in key:
        assert text.count(key) == 1


def test_the_table_spans_every_kind_of_input():
    assert len(CASES) >= 15
    ids = " ".join(c[0] for c in CASES)
    for kind in ("augment", "config", "inference", "rundir", "preprocess", "folders", "split", "phantoms", "layout",
                 "loss", "model", "report", "predict"):
        assert kind in ids
