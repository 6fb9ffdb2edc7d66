"""The correctness part of `python -m infinitevl.bench.gpu`: the device path against references, before any timing.

    kernels      the gated delta rule through `ops/backend.py` on the device -- flash-linear-attention's Triton
                 kernels (fused_recurrent for T <= 64, chunk above, as `fla_adapter.py` picks) and this package's
                 torch chunked form -- against the token-loop reference in fp64 on the CPU; fp32 and bf16 inputs,
                 grouped key/value heads (Hq > Hk = Hv) and grouped value heads (Hq = Hk < Hv), lengths around the
                 chunk size, with and without an initial state; output and final state
    fixture      the official-tiny fixture's full forward on the device against the official fp32 logits, the
                 model in fp32 and in bf16 (tolerances scaled by the CPU's bf16 error: `fixture_checks`)
    engine       the fixture model on the device: chunked prefill (chunks of 17 tokens) of each case's prefix, then
                 one-token decode steps, against the full forward's logits at the same positions
    greedy       greedy generations of the bundled trained model on the device equal, token for token, to the same
                 prompts on the CPU (fp32, torch backend)

Errors are relative, ||out - ref|| / ||ref||, with the largest absolute error beside them. Tolerances of the
single ops: fp32 inputs 2e-3 (flash-linear-attention's Triton dot products on fp32 run as TF32, ~3e-4 per
product), bf16 3e-2 (the bf16 rounding of every activation). `--quick` takes fewer cases, lengths and prompts. On a CPU, or without flash-linear-attention, its checks are reported as skipped with
the reason; everything else runs.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

import torch

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "official-tiny"
TOL = {"float32": 2e-3, "bfloat16": 3e-2}
CASES = ("text", "image", "video", "multi")
PROMPTS = ("What digit was shown last?", "Read back the digits.", "Hello")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||out - ref|| / ||ref||, max |out - ref|) in fp64; NaN anywhere gives inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf"), float("inf")
    diff = out - ref
    return (diff.norm() / ref.norm().clamp_min(1e-30)).item(), diff.abs().max().item()


def _entry(name: str, status: str, **extra) -> dict[str, Any]:
    return {"check": name, "status": status, **extra}


def _judged(name: str, errors: list[tuple[float, float]], tol: float, **extra) -> dict[str, Any]:
    worst_rel = max(e[0] for e in errors)
    worst_abs = max(e[1] for e in errors)
    status = "passed" if worst_rel <= tol else "failed"
    return _entry(name, status, rel_err=worst_rel, max_abs_err=worst_abs, tolerance_rel=tol, **extra)


def _guard(name: str, fn) -> list[dict[str, Any]]:
    """Run one check; an exception becomes an `error` entry with its message (the run goes on)."""
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 -- a broken device path is a result to report, not a crash
        return [_entry(name, "error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])]
    for x in out:
        x.setdefault("seconds", time.perf_counter() - start)
    return out


# -- kernels ------------------------------------------------------------------------------------------------------------
def _gdn_inputs(B, T, heads, Dk, Dv, dtype, device, with_state, gen):
    Hq, Hk, Hv = heads
    H = max(heads)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {
        "q": rnd(B, T, Hq, Dk),
        "k": rnd(B, T, Hk, Dk),
        "v": rnd(B, T, Hv, Dv),
        "g": torch.nn.functional.logsigmoid(rnd(B, T, H) + 2.0),  # decays in (0, 1), mostly close to 1
        "beta": torch.sigmoid(rnd(B, T, H)),
        "initial_state": 0.1 * rnd(B, H, Dk, Dv) if with_state else None,
    }
    cast = {k: None if v is None else v.to(dtype) for k, v in x.items()}  # the rounding the device sees
    cast["g"], cast["beta"] = x["g"].float(), x["beta"].float()  # the model's gates are fp32 (`GatedDeltaNet.gates`)
    cast["initial_state"] = None if x["initial_state"] is None else x["initial_state"].float()
    ref_in = {k: None if v is None else v.double() for k, v in cast.items()}  # the reference gets the same values
    dev_in = {k: None if v is None else v.to(device) for k, v in cast.items()}
    return ref_in, dev_in


def kernel_checks(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    from ..ops import backend
    from ..ops.gated_delta import gated_delta_rule_recurrent

    fla_reason = None
    if device.type != "cuda":
        fla_reason = "flash-linear-attention's kernels need a CUDA device (this run is on the CPU)"
    elif not backend.fla_installed():
        fla_reason = "flash-linear-attention is not installed (see docs/gpu.md for the wheels)"
    Dk, Dv = (16, 32) if quick else (128, 256)
    layouts = {"grouped_kv": (16, 4, 4), "grouped_v": (4, 4, 16)} if not quick else {"grouped_kv": (4, 2, 2)}
    lengths = (1, 63, 64, 65, 200) if not quick else (1, 65)
    out = []
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        dname = str(dtype).removeprefix("torch.")
        for layout, heads in layouts.items():
            for T in lengths:
                for with_state in (False, True):
                    # fresh inputs for every case; one reference serves both backends
                    ref_in, dev_in = _gdn_inputs(2, T, heads, Dk, Dv, dtype, device, with_state, gen)
                    reference: list = []
                    for bn in ("fla", "torch"):
                        kernel = ("fused_recurrent" if T <= 64 else "chunk") if bn == "fla" else "chunked"
                        name = f"kernels/{bn}/{kernel}/{dname}/{layout}/T={T}" + ("/state" if with_state else "")
                        if bn == "fla" and fla_reason:
                            out.append(_entry(name, "skipped", reason=fla_reason))
                            continue

                        def run(bn=bn, name=name, dev_in=dev_in, ref_in=ref_in, reference=reference, tol=TOL[dname]):
                            if not reference:
                                reference.extend(gated_delta_rule_recurrent(**ref_in, use_qk_l2norm=True))
                            with torch.no_grad(), backend.use_backend(bn):
                                o, s = backend.gated_delta_rule(**dev_in, use_qk_l2norm=True)
                            errs = [rel_err(o, reference[0]), rel_err(s, reference[1])]
                            return [_judged(name, errs, tol, output_rel_err=errs[0][0], state_rel_err=errs[1][0])]

                        out += _guard(name, run)
    return out


# -- the official fixture ---------------------------------------------------------------------------------------------
def _fixture_tensors() -> tuple[dict, dict]:
    from safetensors.torch import load_file

    def by_case(raw):
        cases: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in raw.items():
            case, name = key.split(".", 1)
            cases.setdefault(case, {})[name] = value
        return cases

    return by_case(load_file(str(FIXTURE / "inputs.safetensors"))), by_case(
        load_file(str(FIXTURE / "expected.safetensors"))
    )


def _args(inputs: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items() if k != "prefill_len"}


def fixture_checks(device: torch.device, quick: bool = False) -> list[dict[str, Any]]:
    """Full forward on the device against the official logits; then the engine against that full forward.

    These random-weight logits amplify rounding: the model in bf16 on the CPU is off the official fp32 logits by
    7-12% (relative), about 25 times bf16's rounding step. Tolerances are therefore scaled by that measured error,
    per case: bf16 on the device may be off by 1.5x what bf16 on the CPU is; fp32 on the device by a quarter of it
    (TF32, which the Triton kernels use for fp32 dot products, rounds 8 times finer than bf16: half of that leaves
    a factor 2), and never less than TOL."""
    if not (FIXTURE / "config.json").exists():
        reason = f"the official fixture is not at {FIXTURE} (run from a clone of the repository)"
        return [_entry("fixture", "skipped", reason=reason), _entry("engine", "skipped", reason=reason)]
    from ..model import InfiniteVLForConditionalGeneration
    from ..ops import backend

    inputs, expected = _fixture_tensors()
    cases = CASES[:2] if quick else CASES

    def logits_of(model, case, dev):
        with torch.no_grad():
            got = model(**_args(inputs[case], dev))
        return got.logits.float(), got.position_ids.cpu()

    cpu_bf16 = InfiniteVLForConditionalGeneration.from_pretrained(FIXTURE, dtype=torch.bfloat16)
    with backend.use_backend("torch"):
        scale = {c: rel_err(logits_of(cpu_bf16, c, "cpu")[0], expected[c]["logits_full"])[0] for c in cases}
    tolerance = {
        "float32": {c: max(TOL["float32"], scale[c] / 4) for c in cases},
        "bfloat16": {c: max(TOL["bfloat16"], 1.5 * scale[c]) for c in cases},
    }
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        dname = str(dtype).removeprefix("torch.")

        def full(dtype=dtype, dname=dname):
            model = InfiniteVLForConditionalGeneration.from_pretrained(FIXTURE, dtype=dtype, device=device)
            rows = []
            for case in cases:
                logits, positions = logits_of(model, case, device)
                want = expected[case]["logits_full"]
                row = _judged(
                    f"fixture/{dname}/{case}",
                    [rel_err(logits, want)],
                    tolerance[dname][case],
                    cpu_bf16_rel_err=scale[case],
                    logit_abs_max=want.abs().max().item(),
                )
                if not torch.equal(positions, expected[case]["position_ids"]):
                    row.update(status="failed", detail="mRoPE positions differ from the official ones")
                rows.append(row)
            if dtype == torch.float32:
                rows += _engine_rows(model, inputs, cases, tolerance["float32"], device)
            return rows

        out += _guard(f"fixture/{dname}", full)
    return out


def _engine_rows(model, inputs, cases, tolerance, device) -> list[dict[str, Any]]:
    from ..engine.generation import decode_step, prefill

    rows = []
    for case in cases:
        args = _args(inputs[case], device)
        P = int(inputs[case]["prefill_len"])
        ids = args.pop("input_ids")
        args.pop("attention_mask")
        with torch.no_grad():
            full = model(input_ids=ids, **args).logits[0].float()
            state = model.new_state()
            logits = [prefill(model, state, ids[:, :P], chunk_size=17, **args)[0].float()]
            for t in range(P, ids.shape[1]):
                logits.append(decode_step(model, state, ids[0, t : t + 1])[0].float())
        got = torch.stack(logits)
        err = rel_err(got, full[P - 1 :])
        rows.append(
            _judged(f"engine/float32/{case}", [err], tolerance[case], prefill_tokens=P, decode_steps=len(logits) - 1)
        )
    return rows


# -- the bundled model ---------------------------------------------------------------------------------------------------
def greedy_checks(device: torch.device, quick: bool = False) -> list[dict[str, Any]]:
    from ..defaults import BUNDLED

    if not (BUNDLED / "config.json").exists():
        return [_entry("greedy", "skipped", reason=f"the bundled model is not at {BUNDLED}")]

    def run():
        from ..engine.generation import greedy_generate
        from ..model import InfiniteVLForConditionalGeneration
        from ..ops import backend
        from ..processing.processor import Processor

        processor = Processor.from_pretrained(BUNDLED)
        cpu = InfiniteVLForConditionalGeneration.from_pretrained(BUNDLED, dtype=torch.float32)
        dev = InfiniteVLForConditionalGeneration.from_pretrained(BUNDLED, dtype=torch.float32, device=device)
        rows, new_tokens = [], 8 if quick else 24
        for i, text in enumerate(PROMPTS[:1] if quick else PROMPTS):
            ids = processor.tokenize(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
            prompt = torch.tensor([ids])
            with backend.use_backend("torch"):
                want = greedy_generate(cpu, prompt, max_new_tokens=new_tokens)[0].tolist()
            # on a CPU the same device: the chunking then differs (5 tokens against 2048), so the check still
            # tests something there
            chunk = 5 if device.type == "cpu" else 2048
            got = greedy_generate(dev, prompt, max_new_tokens=new_tokens, chunk_size=chunk)[0].tolist()
            status = "passed" if got == want else "failed"
            rows.append(_entry(f"greedy/prompt{i}", status, cpu_tokens=want, device_tokens=got, prompt_tokens=len(ids)))
        return rows

    return _guard("greedy", run)


def run_all(device: torch.device, quick: bool, progress) -> list[dict[str, Any]]:
    out = []
    for what, fn in (
        ("kernels", lambda: kernel_checks(device, quick)),
        ("fixture and engine", lambda: fixture_checks(device, quick)),
        ("greedy", lambda: greedy_checks(device, quick)),
    ):
        start = time.perf_counter()
        rows = fn()
        counts = {s: sum(r["status"] == s for r in rows) for s in ("passed", "failed", "error", "skipped")}
        progress(f"check {what}: {counts} in {time.perf_counter() - start:.1f} s")
        for r in rows:
            if r["status"] in ("failed", "error"):
                progress(f"  {r['status']}: {r['check']} {r.get('rel_err', r.get('error', ''))}")
        out += rows
    return out
