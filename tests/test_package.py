"""The package as a user installs it: the library imports apart from the
experiments and their dependencies, works without its compiled ops (with one
warning), and declares the experiments as an install extra with the
``autobalance`` command."""
import importlib.machinery
import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT_DEPENDENCIES = ("matplotlib", "mlxtend", "sklearn", "tqdm", "scipy", "pandas")

# A short bilevel run on a linear model: the library's whole path (loss, objective,
# hyper-step) without anything from the experiments.
USE_THE_LIBRARY = """
import torch
from autobalance import BalancedCE, BilevelOptimizer, ParametricCE, balanced_error
torch.manual_seed(0)
x, y = torch.randn(64, 5), torch.arange(64) % 4
model = torch.nn.Linear(5, 4)
criterion = ParametricCE.from_counts(torch.tensor([40, 20, 10, 5]), "la")
bopt = BilevelOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), criterion, BalancedCE(4))
loss = criterion(model(x), y)
bopt.zero_grad(); loss.backward(); bopt.step()
result = bopt.hyper_step(model, [(x, y)], [(x, y)])
assert result.applied and result.hypergrad_norm > 0, result
assert 0 <= balanced_error(model(x), y, num_classes=4) <= 1
"""


def _run(code, *, env=None, cwd=None):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=env, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_the_library_needs_none_of_the_experiments_dependencies():
    # None in sys.modules: `import X` raises ImportError, find_spec says not installed
    blocker = f"""
    import sys
    sys.modules.update(dict.fromkeys({EXPERIMENT_DEPENDENCIES!r}))
    import autobalance
    assert not [m for m in sys.modules if m.startswith("autobalance.experiments")]
    """
    _run(blocker + textwrap.indent(USE_THE_LIBRARY, "    "))


def test_importing_the_library_loads_nothing_of_the_experiments():
    # torch itself imports tqdm when it is installed (torch.hub); count what autobalance adds.
    out = _run("""
    import sys, torch
    before = set(sys.modules)
    import autobalance
    print(" ".join(sorted(set(sys.modules) - before)))
    """)
    added = out.split()
    assert "autobalance.losses" in added
    assert not [m for m in added if m.split(".")[0] in EXPERIMENT_DEPENDENCIES
                or m.startswith("autobalance.experiments")], added


def test_experiments_are_an_extra_with_the_command():
    meta = importlib.metadata.metadata("autobalance")
    assert "experiments" in meta.get_all("Provides-Extra")
    extra = [r for r in meta.get_all("Requires-Dist") if "extra == \"experiments\"" in r]
    assert {r.split(";")[0].strip() for r in extra} >= {"matplotlib", "tqdm", "scikit-learn", "mlxtend"}
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts["autobalance"] == "autobalance.experiments.cli:main"
    out = subprocess.run([sys.executable, "-m", "autobalance.experiments.cli", "run", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--experiment" in out.stdout, out.stderr


def _copy_without_compiled_ops(tmp_path, bad_library=False):
    """The Python sources of both packages, without the built _C (or with a file in its
    place that is not a loadable library, as a build for another torch fails to load)."""
    shutil.copytree(os.path.join(ROOT, "python", "autobalance"), tmp_path / "autobalance",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "autobalance_ext"), tmp_path / "autobalance_ext",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    if bad_library:
        (tmp_path / "autobalance_ext" / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(
            b"not a shared library")
    return dict(os.environ, PYTHONPATH=str(tmp_path))


@pytest.mark.parametrize("bad_library", [False, True], ids=["missing", "unloadable"])
def test_without_compiled_ops_the_library_warns_once_and_runs_the_reference_path(tmp_path, bad_library):
    env = _copy_without_compiled_ops(tmp_path, bad_library)
    _run(f"""
    import sys, warnings
    # the editable install's finder would find the built _C of the source tree
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import autobalance, autobalance_ext
        import torch
        assert autobalance_ext.__file__.startswith({str(tmp_path)!r}), autobalance_ext.__file__
        assert not autobalance_ext.has_compiled_ops() and not autobalance_ext.has_cuda_kernels()
        assert autobalance_ext.LOAD_ERROR is not None
        from autobalance import parametric_cross_entropy
        g = torch.Generator().manual_seed(0)
        z = torch.randn(9, 4, generator=g, requires_grad=True)
        y = torch.randint(0, 4, (9,), generator=g)
        W, S, L = [torch.rand(1, 4, generator=g) + 0.5 for _ in range(3)]
        fused = parametric_cross_entropy(z, y, W, scale=S, shift=L)  # backend="fused", the default
        ref = parametric_cross_entropy(z, y, W, scale=S, shift=L, backend="reference")
        assert torch.equal(fused, ref)
        assert torch.equal(*(torch.autograd.grad(l, z)[0] for l in (fused, ref)))
    {textwrap.indent(USE_THE_LIBRARY, "    ")}
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "could not be loaded" in messages[0] and "pip install -e . --no-build-isolation" in messages[0]
    """, env=env, cwd=str(tmp_path))
