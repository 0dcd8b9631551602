"""Every JSON file, JSON line and JSON value unclip writes is strict JSON: no NaN, no Infinity.

Python's json writes NaN and Infinity, which strict readers (JSON.parse, jq, Go, serde) refuse;
`models.base.storage.strict_json` writes null instead, and is the only caller of json.dump(s)."""

from __future__ import annotations

import ast
import json
import math
import pathlib

import numpy as np
import pytest
import torch

from data_pipeline import encoder_fit
from data_pipeline.synthetic_quality import clip_retrieval
from models.base import storage
from models.config import ClipConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
WRITERS = ("models", "data_pipeline", "training", "launch", "benchmarks")
HELPER = ROOT / "models" / "base" / "storage.py"


def strictly(text: str):
    """Parse as a strict reader does: NaN, Infinity and -Infinity are errors."""

    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def json_writes(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of every json.dump / json.dumps call, `from json import dump(s)` and third-party
    JSON writer in a module, whatever name json was imported under."""
    json_names = {
        a.asname or a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for a in node.names
        if a.name == "json"
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "json":
            found += [(node.lineno, f"from json import {a.name}") for a in node.names if a.name in ("dump", "dumps")]
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [
                (node.lineno, f"import {m}") for m in modules if m.split(".")[0] in ("simplejson", "orjson", "ujson")
            ]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("dump", "dumps")
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in json_names
        ):
            found.append((node.lineno, f"{node.func.value.id}.{node.func.attr}"))
    return found


def test_no_module_writes_json_but_through_the_helper():
    helper = ast.parse(HELPER.read_text())
    (strict,) = [n for n in helper.body if isinstance(n, ast.FunctionDef) and n.name == "strict_json"]
    inside = range(strict.lineno, (strict.end_lineno or strict.lineno) + 1)
    offenders = []
    files = [f for package in WRITERS for f in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 50 and HELPER in files
    for file in files:
        writes = json_writes(ast.parse(file.read_text(), str(file)))
        if file == HELPER:
            assert [what for line, what in writes if line in inside] == ["json.dumps"]
            writes = [(line, what) for line, what in writes if line not in inside]
        offenders += [f"{file.relative_to(ROOT)}:{line}: {what}" for line, what in writes]
    assert not offenders, "write JSON with models.base.storage.strict_json / write_json:\n" + "\n".join(offenders)


def test_the_scan_sees_each_way_of_calling_json():
    source = (
        "import json\nimport json as j\nfrom json import dumps\njson.dump({}, f)\nj.dumps(1)\nstorage.strict_json(1)\n"
    )
    assert [what for _, what in json_writes(ast.parse(source))] == ["from json import dumps", "json.dump", "j.dumps"]


def test_non_finite_numbers_become_null_at_any_depth():
    nan, inf = float("nan"), float("inf")
    value = {
        "nan": nan,
        "inf": inf,
        "-inf": -inf,
        "nested": [1.5, {"deeper": (nan, 2)}],
        "numpy": [np.float32("nan"), np.float64(inf), np.float16(0.5), np.int64(7), np.bool_(True)],
        "array": np.array([[1.0, np.nan], [np.inf, 2.0]]),
        "tensor": torch.tensor([0.25, float("-inf")]),
        "kept": ["text", None, True, 0, -3],
    }
    text = storage.strict_json(value)
    assert "NaN" not in text and "Infinity" not in text
    assert strictly(text) == {
        "nan": None,
        "inf": None,
        "-inf": None,
        "nested": [1.5, {"deeper": [None, 2]}],
        "numpy": [None, None, 0.5, 7, True],
        "array": [[1.0, None], [None, 2.0]],
        "tensor": [0.25, None],
        "kept": ["text", None, True, 0, -3],
    }
    assert type(storage.json_safe(np.int64(7))) is int and type(storage.json_safe(np.float32(0.5))) is float
    assert storage.json_safe(np.float64(math.pi)) == math.pi


def test_keywords_pass_through_and_what_default_returns_is_made_safe_too():
    class Odd:
        def __str__(self) -> str:
            return "odd"

    assert storage.strict_json({"b": 1, "a": [Odd()]}, sort_keys=True, default=str) == '{"a": ["odd"], "b": 1}'
    assert strictly(storage.strict_json({"x": Odd()}, default=lambda o: [float("nan")])) == {"x": [None]}
    with pytest.raises(TypeError):
        storage.strict_json({"x": Odd()})  # without a default, what json cannot hold still fails loudly


def test_write_json_files_are_strict(tmp_path):
    url = str(tmp_path / "report.json")
    storage.write_json(url, {"top1": float("nan"), "psnr_db": np.float64("inf"), "rows": np.int32(3)})
    assert strictly(storage.read_text(url)) == {"top1": None, "psnr_db": None, "rows": 3}


def test_fit_report_without_a_scorable_pair_says_null_and_why(tmp_path):
    """Real captions are not in the embedded default's grammar: held-out retrieval scores no pair.
    The report says null, with the reason beside it, and the log line says it too."""
    pictures = np.zeros((3, 8, 8, 3), np.uint8)
    retrieval = clip_retrieval(ClipConfig(model="unused: no pair to score"), (pictures, ["a dog", "a cat", "the sea"]))
    assert retrieval["top1"] is None and retrieval["count"] == 0
    assert "none of the 3 captions" in retrieval["reason"]
    report = {"clip": {"heldout_retrieval": retrieval}, "vae": {"heldout_psnr_db": 31.25}}
    url = str(tmp_path / "encoders" / "fit_report.json")
    storage.write_json(url, report)
    written = strictly(storage.read_text(url))
    assert written["clip"]["heldout_retrieval"] == {"top1": None, "count": 0, "reason": retrieval["reason"]}
    assert '"top1": null' in storage.read_text(url)
    line = encoder_fit.scores_line(report)
    assert line.startswith("held-out CLIP retrieval not measured: none of the 3 captions") and "31.2 dB" in line
