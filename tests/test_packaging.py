"""The release artefacts: build the sdist and the wheel, check what they hold, install the wheel and use it.

The wheel goes into a fresh virtual environment that borrows this environment's packages (torch and
the other dependencies) through a ``.pth`` file, so nothing is downloaded: pip runs with
``--no-index --no-deps --ignore-installed`` (the borrowed packages may hold an installed
sed-discriminator, which must neither satisfy nor be replaced) and the build with ``--no-isolation``
(``build`` and ``hatchling`` come with the ``test`` extra). The README's first Python snippet then runs
with that installation from a folder outside the repository, with random CLIP weights
(``pretrained=None``) since there is no network. The sdist is unpacked, installed the way the README
says (``pip install ".[test,examples]"``, dependencies borrowed) and runs tests of its own with the
README's command for an unpacked sdist (``python -m pytest -q``, a few fast files here).
"""

from __future__ import annotations

import email
import importlib.util
import os
import re
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from doc_snippets import python_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# What an unpacked sdist needs to run its own tests: the tests import benchmarks/ and examples/.
SDIST_TREES = ("sed_discriminator", "tests", "benchmarks", "examples", "docs")
SDIST_FILES = (
    "LICENSE",
    "README.md",
    "CHANGELOG.md",
    "CITATION.cff",
    "pyproject.toml",
    "conftest.py",
    "Makefile",
    ".ci/min_constraints.py",
)
_TAG = re.compile(r"""pretrained\s*=\s*(["'])(openai|default)\1""")  # a weights tag: random weights offline
# A markdown link or image whose target is not an absolute URL: broken on the package index, which
# neither has the repository's files nor gives headings anchors.
_RELATIVE_LINK = re.compile(r"!?\[[^\]]*\]\((?!https?://)([^)\s]+)\)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="the fresh-venv paths below are POSIX ones"),
]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _clean_env(**extra: str) -> dict[str, str]:
    # No PYTHONPATH (it could point at the repository) and no network.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return {**env, "HF_HUB_OFFLINE": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def _version() -> str:
    text = (ROOT / "sed_discriminator" / "version.py").read_text(encoding="utf-8")
    return re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text).group(1)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist, and the wheel built from that sdist (``python -m build``'s default order)."""
    for module in ("build", "hatchling"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is missing: install the test extra (pip install -e '.[test]').")
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)], env=_clean_env())
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def test_wheel_contents(dist: dict[str, Path]) -> None:
    version = _version()
    assert dist["wheel"].name == f"sed_discriminator-{version}-py3-none-any.whl"
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = wheel.namelist()
        metadata = email.message_from_bytes(wheel.read(f"sed_discriminator-{version}.dist-info/METADATA"))
    top = {name.split("/")[0] for name in names}
    assert top == {"sed_discriminator", f"sed_discriminator-{version}.dist-info"}, top  # no tests, examples, ...
    assert not [n for n in names if re.search(r"(^|/)(tests?|conftest)(/|\.py$)|(^|/)test_[^/]*\.py$", n)]
    assert "sed_discriminator/py.typed" in names
    assert f"sed_discriminator-{version}.dist-info/licenses/LICENSE" in names
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "sed_discriminator").glob("*.py")}
    assert package <= set(names), package - set(names)
    assert metadata["Name"] == "sed-discriminator" and metadata["Version"] == version
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_payload().strip() == README.read_text(encoding="utf-8").strip()  # the long description


def test_sdist_contents(dist: dict[str, Path]) -> None:
    version = _version()
    prefix = f"sed_discriminator-{version}/"
    with tarfile.open(dist["sdist"]) as sdist:
        names = {m.name[len(prefix) :] for m in sdist.getmembers() if m.isfile()}
    for name in SDIST_FILES:
        assert name in names, f"{name} is missing from the sdist"
    for tree in SDIST_TREES:
        on_disk = {
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / tree).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        }
        missing = on_disk - names
        assert not missing, f"the sdist lacks files its tests or docs need: {sorted(missing)[:5]}"
    assert "tests/data/golden.safetensors" in names and "benchmarks/bench_sed.py" in names
    assert not [n for n in names if n.startswith((".venv/", "dist/", "build/", "runs/"))]


def test_readme_reads_well_as_the_long_description() -> None:
    text = README.read_text(encoding="utf-8")
    relative = _RELATIVE_LINK.findall(text)
    assert not relative, f"README.md links to repository paths that break on the package index: {relative}"
    assert "pip install ." in text, "README.md must say how to install from a clone"
    assert "pip install sed-discriminator" in text


def _borrowing_venv(venv: Path) -> Path:
    """A new venv without packages of its own that sees this environment's; returns its python."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=_clean_env())
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # Directories listed in a .pth file join sys.path after the venv's own site-packages, and the
    # .pth files inside them (this environment's editable install of the repository) are not read.
    borrowed = dict.fromkeys(site.getsitepackages() + [p for p in sys.path if p.endswith("site-packages")])
    (Path(purelib) / "_borrowed_test_env.pth").write_text("\n".join(borrowed) + "\n", encoding="utf-8")
    return python


def _pip_install(python: Path, *args: str) -> None:
    """Offline install into ``python``'s venv; an installed sed-discriminator among the borrowed packages is ignored."""
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--no-deps"]
    _run([*pip, "--ignore-installed", "--no-build-isolation", *args], env=_clean_env())


@pytest.fixture(scope="module")
def fresh_python(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding only the wheel; torch and the other dependencies come from this environment."""
    python = _borrowing_venv(tmp_path_factory.mktemp("venv"))
    _pip_install(python, str(dist["wheel"]))
    return python


def test_unpacked_sdist_installs_and_runs_its_own_tests(dist: dict[str, Path], tmp_path: Path) -> None:
    with tarfile.open(dist["sdist"]) as sdist:
        sdist.extractall(tmp_path, filter="data")
    (source,) = tmp_path.glob("sed_discriminator-*")
    python = _borrowing_venv(tmp_path / "venv")
    _pip_install(python, f"{source}[test,examples]")  # README: pip install ".[test,examples]" in the unpacked sdist
    where = _run([str(python), "-c", "import sed_discriminator; print(sed_discriminator.__file__)"], cwd=tmp_path)
    assert (tmp_path / "venv").resolve() in Path(where.stdout.strip()).resolve().parents
    tests = ["tests/test_input_hints.py", "tests/test_docs.py", "-m", "not slow"]
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=source, env=_clean_env(OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"the unpacked sdist's tests failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    assert re.search(r"\b[1-9]\d* passed\b", proc.stdout) and "failed" not in proc.stdout, proc.stdout[-2000:]


def test_wheel_installs_and_imports_outside_the_repository(fresh_python: Path, tmp_path: Path) -> None:
    probe = (
        "import sed_discriminator as sd, importlib.metadata as m; "
        "print(sd.__file__); print(sd.__version__); print(m.version('sed-discriminator'))"
    )
    out = _run([str(fresh_python), "-c", probe], cwd=tmp_path, env=_clean_env()).stdout.split()
    location = Path(out[0]).resolve()
    venv = fresh_python.parent.parent.resolve()
    assert venv in location.parents, f"imported from {location}, not from the fresh venv {venv}"
    assert ROOT not in location.parents
    assert out[1] == out[2] == _version()
    assert (location.parent / "py.typed").exists()


def test_readme_first_snippet_runs_from_the_installed_wheel(fresh_python: Path, tmp_path: Path) -> None:
    blocks = [b for b in python_blocks(README.read_text(encoding="utf-8")) if not b.skip]
    assert blocks, "README.md has no runnable ```python block"
    code = _TAG.sub("pretrained=None", blocks[0].code)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    (workdir / "snippet.py").write_text(
        "import warnings\nwarnings.simplefilter('ignore')\n"
        + code
        + "\nimport sed_discriminator\nprint(sed_discriminator.__file__)\n",
        encoding="utf-8",
    )
    proc = _run([str(fresh_python), "snippet.py"], cwd=workdir, env=_clean_env(OMP_NUM_THREADS="2"))
    location = Path(proc.stdout.strip().splitlines()[-1]).resolve()
    assert ROOT not in location.parents and fresh_python.parent.parent.resolve() in location.parents
