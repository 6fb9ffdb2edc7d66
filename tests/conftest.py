"""Shared test setup: offline hub, the official fixture, real media, tiny models with weights that matter."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "official-tiny"  # made by the official model code: see its README
MEDIA = ROOT / "infinitevl" / "assets" / "media"
CASES = ("text", "image", "video", "multi")

# Under pytest-xdist (`make test` runs two workers) each worker gets one thread, so the cores are not oversubscribed.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


def pytest_configure(config):
    if not FIXTURE.exists():
        raise pytest.UsageError(f"the official fixture is missing at {FIXTURE}: it is part of the repository")


def in_ci() -> bool:
    """CI=true (exported by .ci/run): tools a test exists for must be there."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_tool(message: str):
    """A tool that a test exists to exercise is missing: a skip that says so, and under CI=true a failure."""
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing tool is a failure, not a skip)")
    pytest.skip(message)


def require_compiler() -> None:
    """The fused-kernel tests compare the kernels with the plain path: without a compiler there are no kernels."""
    import shutil

    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        missing_tool(
            f"no C++ compiler ({compiler!r}): the fused decode kernels cannot be built (as root: make compiler)"
        )


def pytest_terminal_summary(terminalreporter):
    """What was skipped and why, grouped by reason, after every run (pytest -q alone prints only a count)."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.section("skipped, by reason")
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            terminalreporter.write_line(f"{count:4d}  {reason}")


@pytest.fixture(scope="session")
def fixture_inputs() -> dict[str, dict[str, torch.Tensor]]:
    raw = load_file(str(FIXTURE / "inputs.safetensors"))
    return {case: {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith(case + ".")} for case in CASES}


@pytest.fixture(scope="session")
def fixture_expected() -> dict[str, dict[str, torch.Tensor]]:
    raw = load_file(str(FIXTURE / "expected.safetensors"))
    return {case: {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith(case + ".")} for case in CASES}


@pytest.fixture(scope="session")
def fixture_model():
    from infinitevl.model import InfiniteVLForConditionalGeneration

    return InfiniteVLForConditionalGeneration.from_pretrained(FIXTURE, dtype=torch.float32)


def model_args(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fixture case's inputs without the test-only `prefill_len`."""
    return {k: v for k, v in inputs.items() if k != "prefill_len"}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that every parameter visibly matters (see `spread_init`)."""
    from infinitevl.model.init import spread_init

    return spread_init(model, seed)


def tiny_model(seed: int = 0, **text_overrides):
    """A random tiny InfiniteVL (fixture-sized by default) in fp32, eval mode."""
    from infinitevl.config import tiny_config
    from infinitevl.model import InfiniteVLForConditionalGeneration

    model = InfiniteVLForConditionalGeneration(tiny_config(**text_overrides))
    return randomize(model, seed).eval()
