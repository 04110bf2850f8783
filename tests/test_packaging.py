"""Packaging metadata: the licence file, project URLs, the platform marker on triton, one version everywhere."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the metadata is the same on 3.10
Requirement = pytest.importorskip("packaging.requirements").Requirement

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_license_file_matches_the_declared_license(project):
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_project_urls(project):
    urls = project["urls"]
    assert set(urls) >= {"Homepage", "Repository", "Documentation", "Issues"}
    assert all(url.startswith("https://github.com/sparse-dit/sparse-dit") for url in urls.values())


def test_test_extra_installs_triton_only_where_it_runs(project):
    pinned = Requirement(project["optional-dependencies"]["triton"][0])
    (triton,) = [Requirement(r) for r in project["optional-dependencies"]["test"] if Requirement(r).name == "triton"]
    assert triton.specifier == pinned.specifier  # the same exact pin as the triton extra
    assert triton.marker is not None
    assert triton.marker.evaluate({"platform_system": "Linux", "platform_machine": "x86_64"})
    for system, machine in (("Darwin", "arm64"), ("Windows", "AMD64"), ("Linux", "aarch64")):
        assert not triton.marker.evaluate({"platform_system": system, "platform_machine": machine})


def test_one_version(project):
    import sparse_dit

    assert project["version"] == sparse_dit.__version__
    assert "torch==2.13.0" in project["dependencies"]
