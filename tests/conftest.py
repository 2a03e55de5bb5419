"""Shared pytest fixtures: small random checkpoints in the real layout (built once per session)."""
from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    """@pytest.mark.gpu tests need onnxruntime's CUDA provider and a CUDA device."""
    try:
        import onnxruntime as ort

        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (onnxruntime CUDAExecutionProvider)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Phi-3.5-vision checkpoint: sharded bf16 safetensors + index, real tokenizer files."""
    from phi3v_edge.models.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    """The fp32 CPU bundle of `tiny_checkpoint` (runtime tests)."""
    from phi3v_edge.export.bundle import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("tiny_bundle") / "fp32", precision="fp32",
                         target="cpu")


@pytest.fixture(scope="session")
def tiny_package(tiny_checkpoint, tmp_path_factory):
    """The fp32 onnxruntime-genai package of the same checkpoint as `tiny_bundle`, made by the CLI."""
    from phi3v_edge.export import cli

    out = tmp_path_factory.mktemp("genai") / "fp32"
    assert cli.main([str(tiny_checkpoint), "--out", str(out), "--format", "genai", "--precision", "fp32",
                     "--target", "cpu", "--quiet"]) == 0
    return out
