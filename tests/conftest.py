"""Shared fixtures: tiny random-weight SD1.5 / SDXL pipelines, built once per test session.

Heavy imports happen inside the fixtures, so test files that use none of them (config, data)
pay nothing. The pipelines are shared: tests must not modify them (load a teacher from the
saved directory instead, which gives a private copy).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one intra-op thread (opt in: ``pytestmark = pytest.mark.usefixtures(...)``).

    Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads
    spin-wait on each other: a tiny UNet forward measured 10 ms with one thread, 40-900 ms with two.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd():
    """A random-weight SD1.5-shaped ``StableDiffusionPipeline`` (8×8 latents, 16×16 images)."""
    from rapm.models.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl():
    """A random-weight SDXL-shaped ``StableDiffusionXLPipeline`` (two text encoders, text_time embedding)."""
    from rapm.models.tiny import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_sd_dir(tiny_sd, tmp_path_factory):
    """``tiny_sd`` saved with ``save_pretrained`` (safetensors): a local diffusers pipeline directory."""
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_sdxl, tmp_path_factory):
    """``tiny_sdxl`` saved with ``save_pretrained`` (safetensors): a local diffusers pipeline directory."""
    path = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sd_teacher(tiny_sd_dir):
    """The tiny SD1.5 pipeline loaded through ``rapm.teacher.load_teacher`` (float32, CPU)."""
    from rapm.teacher import load_teacher

    return load_teacher({"path": str(tiny_sd_dir), "type": "auto", "dtype": "float32", "device": "cpu"})


@pytest.fixture(scope="session")
def sdxl_teacher(tiny_sdxl_dir):
    """The tiny SDXL pipeline loaded through ``rapm.teacher.load_teacher`` (float32, CPU)."""
    from rapm.teacher import load_teacher

    return load_teacher({"path": str(tiny_sdxl_dir), "type": "auto", "dtype": "float32", "device": "cpu"})
