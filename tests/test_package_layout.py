"""The shape of the package: no import circle between its modules, every backend row has a module that registers
it, one table of environment variables in the docs, and one validator behind every hyperparameter check."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

import pytest

import ilora_kernels as ik
from ilora_kernels import settings
from ilora_kernels.ops import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ilora_kernels"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The package modules that ``name`` imports anywhere in its file (top level or inside functions); ``from X
    import y`` counts as importing ``X.y`` when that is a module, else ``X``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_in_the_package():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["ilora_kernels.functional"], "the import walk found nothing: it is broken"
    assert "ilora_kernels.ops.registry" in graph["ilora_kernels.functional"]
    assert _cycles(graph) == []


def test_the_walk_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_every_backend_row_names_a_module_that_registers_it():
    report = ik.available_backends()
    assert set(report) == set(registry.BACKENDS) == {row.name for row in registry.BACKEND_TABLE}
    for row in registry.BACKEND_TABLE:
        source = (ROOT / Path(*row.module.split("."))).with_suffix(".py").read_text()
        assert re.search(rf'register\("{row.name}"|register\(name', source) or f'"{row.name}"' in source, row
        if report[row.name] is None:
            ops = registry.backend_ops(row.name)
            assert registry.registered[row.name] is ops
    assert report["reference"] is None


def test_auto_takes_the_first_fitting_row():
    import torch

    for dtype in (torch.float32, torch.float64):
        picked = registry.resolve("auto", "cpu", dtype)
        first = next(row.name for row in registry.BACKEND_TABLE
                     if (row.auto_on is None or "cpu" in row.auto_on) and dtype in row.dtypes
                     and ik.available_backends()[row.name] is None)
        assert picked == first


def test_the_docs_table_lists_every_setting():
    text = (ROOT / "docs" / "api.md").read_text()
    section = text[text.index("### Environment variables"):]
    section = section[:section.index("\n## ", 1) if "\n## " in section[1:] else len(section)]
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", section, flags=re.MULTILINE))
    runtime = {variable for variable, _, _ in settings.VARIABLES}
    assert runtime <= documented, f"not in docs/api.md: {sorted(runtime - documented)}"
    build = {"ILORA_SKIP_EXTENSION", "ILORA_FORCE_CUDA", "ILORA_SKIP_CUDA"}
    assert documented - runtime <= build | {"TORCH_CUDA_ARCH_LIST", "MAX_JOBS"}, sorted(documented - runtime)
    setup = (ROOT / "setup.py").read_text()
    assert all(name in setup for name in build)


def test_settings_read_once_and_validated(ilora_env):
    before = settings.get()
    assert settings.get() is before
    ilora_env(ILORA_TRITON_BASE_GEMM="CUBLAS", ILORA_DETERMINISTIC="yes", ILORA_EAGER_FAST_PATH="off")
    now = settings.get()
    assert (now.triton_base_gemm, now.deterministic, now.eager_fast_path) == ("cublas", True, False)
    with pytest.raises(ValueError, match="ILORA_DETERMINISTIC must be one of"):
        ilora_env(ILORA_DETERMINISTIC="maybe")
    assert settings.get() is now      # a refused read keeps the settings in force
    with settings.override(triton_base_gemm="fused") as inner:
        assert settings.get() is inner and inner.triton_base_gemm == "fused" and inner.deterministic
    assert settings.get() is now


# ---------------------------------------------------------------------------------------------------------------
# one validator: the same bad value is refused by every entry point, naming the field as that entry point spells it

BAD_VALUES = [("r", 0), ("r", True), ("num_heads", 0), ("alpha", float("nan")), ("alpha", True), ("dropout", False),
              ("dropout", 1.0), ("top_k", 4), ("top_k", 1.0), ("backend", "fast"), ("backend", 3)]


def _linear():
    import torch
    return torch.nn.Linear(6, 5)


def _entry_points():
    """name -> (build(field, value), exception class, how its messages spell each field)."""
    from ilora_kernels.crab.config import ConfigError, config_from_dict

    fields = ("r", "num_heads", "alpha", "dropout", "top_k", "backend")
    points = {
        "ILoRAConfig": (lambda f, v: ik.ILoRAConfig(**{f: v}), ValueError, {f: f"ILoRAConfig.{f} " for f in fields}),
        "ILoRALinear": (lambda f, v: ik.ILoRALinear(_linear(), **{f: v}), ValueError, {f: f"{f} must" for f in fields}),
        "crab config": (lambda f, v: config_from_dict({"ilora": {f: v}}), ConfigError,
                        {f: f"ilora.{f} " for f in fields}),
    }
    try:
        from ilora_kernels.peft_integration import ILoRAPeftConfig
    except ImportError:  # pragma: no cover - PEFT is a dev requirement
        return points
    peft_names = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "num_heads": "ilora_num_heads",
                  "top_k": "ilora_top_k", "backend": "ilora_backend"}
    points["ILoRAPeftConfig"] = (lambda f, v: ILoRAPeftConfig(target_modules=["q"], **{peft_names[f]: v}),
                                 ValueError, {f: f"ILoRAPeftConfig.{peft_names[f]} " for f in fields})
    return points


@pytest.mark.parametrize("field,value", BAD_VALUES, ids=lambda v: repr(v))
def test_every_entry_point_refuses_the_same_bad_hyperparameter(field, value):
    for point, (build, error, spelled) in _entry_points().items():
        with pytest.raises(error) as info:
            build(field, value)
        assert spelled[field] in str(info.value), (point, str(info.value))


def test_good_hyperparameters_pass_everywhere():
    for _, (build, _, _) in _entry_points().items():
        build("top_k", 2)
        build("backend", "reference")


# ---------------------------------------------------------------------------------------------------------------
# a new backend is one module and one table row (docs/kernel_design.md, "Adding a backend")

TOY_BACKEND = '''
"""A toy backend: the reference math under its own ops."""
from ilora_kernels.ops import reference
from ilora_kernels.ops.contract import define
from ilora_kernels.ops.registry import register

register("toy", define("toy_layout_test", reference.forward, reference.backward))
'''


def test_a_new_backend_is_one_module_and_one_row(tmp_path, monkeypatch):
    import torch

    from ilora_float64 import ilora_float64, make_inputs

    (tmp_path / "toy_layout_backend.py").write_text(TOY_BACKEND)
    monkeypatch.syspath_prepend(str(tmp_path))
    row = registry.Backend("toy", "toy_layout_backend", ("cpu",), registry.ALL_DTYPES, ("cpu",), "a test backend")
    table = (row,) + registry.BACKEND_TABLE              # first row: "auto" prefers it on CPU
    monkeypatch.setattr(registry, "BACKEND_TABLE", table)
    # the names derived from the table, as the module derives them
    monkeypatch.setattr(registry, "BACKENDS", tuple(r.name for r in table))
    monkeypatch.setattr(registry, "_ROWS", {r.name: r for r in table})
    monkeypatch.setattr(registry, "_resolved", {})

    assert registry.available_backends()["toy"] is None
    assert registry.resolve("auto", "cpu", torch.float32) == "toy"
    with pytest.raises(ValueError, match="backend='toy' needs cpu tensors"):
        registry.resolve("toy", "cuda", torch.float32)
    layer = ik.ILoRALinear(torch.nn.Linear(6, 5), r=3, num_heads=2, alpha=6.0, dropout=0.0, backend="toy")
    assert ik.ILoRAConfig(backend="toy").backend == "toy"
    x, w, b, wr, a, bb = make_inputs(7, 6, 5, 2, 3, dtype=torch.float64, seed=3)
    leaves = [t.requires_grad_() for t in (x, wr, a, bb)]
    y = ik.ilora_linear(leaves[0], w, b, *leaves[1:], 2.0, backend="toy")
    y64, _ = ilora_float64(*[t.detach() for t in (x, w, b, wr, a, bb)], 2.0)
    torch.testing.assert_close(y, y64, rtol=1e-12, atol=1e-12)
    y.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    assert layer(torch.randn(4, 6)).shape == (4, 5)
    torch.library.opcheck(torch.ops.ilora_kernels.toy_layout_test_forward, (x, w, b, wr, a, bb, 2.0, 0.1, 5, 1))
