"""The package imports one way: core -> configs -> data -> models -> stage1 / stage2 / sampling -> evaluation ->
recipes / benchmarks -> commands. Every import statement is read (function-level ones too), so a cycle cannot hide in a lazy import.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "ctxrq_jax"
LAYERS = {"core": 0, "configs": 1, "data": 2, "models": 3, "stage1": 4, "stage2": 4, "sampling": 4, "evaluation": 5,
          "recipes": 6, "benchmarks": 6}
COMMANDS = {"bench", "convert", "demo", "encode", "evaluate", "sample", "tokenize", "train", "train_rqvae"}
# Inference (sampling, evaluation) never builds an optimizer nor imports a trainer.
TRAINING_ONLY = {"ctxrq_jax.stage1.trainer", "ctxrq_jax.stage2.trainer", "ctxrq_jax.core.optim", "ctxrq_jax.core.loop"}


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    yield ".".join(parts), path


def _imports(name, path):
  """Absolute names of the ctxrq_jax modules `path` imports (relative imports resolved)."""
  tree = ast.parse(path.read_text(), str(path))
  package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
      out.add(base)
      out.update(f"{base}.{a.name}" for a in node.names)
  return {m for m in out if m == "ctxrq_jax" or m.startswith("ctxrq_jax.")}


def _where(module):
  """('command', None) | ('layer', rank) | ('root', None) | (None, None) for a ctxrq_jax module name."""
  parts = module.split(".")
  if len(parts) == 1:
    return "root", None
  if parts[1] in LAYERS:
    return "layer", LAYERS[parts[1]]
  if len(parts) == 2 and parts[1] in COMMANDS:
    return "command", None
  return None, None


MODULES = dict(_modules())


def test_every_module_has_a_layer():
  unplaced = [m for m in MODULES if _where(m)[0] is None]
  assert not unplaced, f"modules outside the layers: {unplaced}; put them in a layer folder or COMMANDS"
  top_level = {m.split(".")[1] for m in MODULES if m.count(".") == 1}
  assert top_level <= set(LAYERS) | COMMANDS


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_one_way(module):
  kind, rank = _where(module)
  problems = []
  for imported in sorted(_imports(module, MODULES[module])):
    target_kind, target_rank = _where(imported)
    if imported == "ctxrq_jax":
      continue
    if target_kind == "command":  # nothing imports a command, not even another command
      problems.append(f"imports the command {imported}")
      continue
    if target_kind != "layer":
      continue
    if kind == "root":
      problems.append(f"the package root imports {imported}")
    elif kind == "layer":
      same_folder = imported.split(".")[1] == module.split(".")[1]
      if target_rank > rank or (target_rank == rank and not same_folder):
        problems.append(f"imports {imported}, a higher or sibling layer")
      if imported in TRAINING_ONLY and module.split(".")[1] in ("sampling", "evaluation"):
        problems.append(f"imports {imported}, which inference must not need")
  assert not problems, f"{module}: " + "; ".join(problems)


def test_the_checker_catches_a_violation(tmp_path):
  fake = tmp_path / "x.py"
  fake.write_text("def f():\n  from ctxrq_jax import sample\n  from ..stage2 import trainer\n")
  assert _imports("ctxrq_jax.sampling.x", fake) == {"ctxrq_jax", "ctxrq_jax.sample", "ctxrq_jax.stage2",
                                                     "ctxrq_jax.stage2.trainer"}
  assert _where("ctxrq_jax.sample") == ("command", None)
  assert _where("ctxrq_jax.stage2.trainer") == ("layer", 4)
