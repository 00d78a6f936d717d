"""``polycom bench``: the fused PolyNorm / PolyReLU kernels against the official reference, side by side.

For each op, token count and width (one process, medians of ``--repeats`` runs) it times:

* ``official``  — the reference math in eager mode inside non-reentrant ``torch.utils.checkpoint``,
  as the official Megatron code runs it (backward recomputes the forward);
* ``compiled``  — the same reference math under ``torch.compile`` (steady state; the first call,
  which compiles, is reported separately);
* ``ours``      — ``polycom.functional`` with ``impl="auto"`` (the fused CPU or Triton kernels);
* ``liger``     — Liger-Kernel's ``LigerPolyNorm`` (only with a GPU and liger-kernel installed).

Every time is also given as a multiple of one same-size tensor copy (``x.clone()``, which like
the ops allocates its output): the memory floor is 1 copy for forward (x in, y out), 1.5 for
backward (x, dy in, dx out) and 2.5 for forward+backward. ``saved/input`` is the bytes autograd
keeps for backward (``saved_tensors_hooks``, unique storages) over the input's bytes. Then one
training step of an MLP block (``d -> hidden -> d``, AdamW) per activation, as a ratio to SwiGLU.
Results go to ``OUT/kernels.csv``, ``OUT/mlp.csv`` and ``OUT/bench.md`` (written atomically).
"""

from __future__ import annotations

import argparse

HELP = "Benchmark the fused PolyNorm/PolyReLU kernels vs the official reference and torch.compile."

WIDTHS = (2048, 5504, 8256, 16384)
TOKENS = (1024, 8192)
OPS = ("polynorm", "polyrelu")
DTYPES = ("float32", "bfloat16", "float16")
MLP_ACTIVATIONS = ("swiglu", "polynorm", "polynorm-official", "polyrelu", "relu", "gelu")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="one shape, 3 repeats, small MLP (< 1 min)")
    parser.add_argument("--widths", type=_int_list, help=f"comma-separated (default {WIDTHS})")
    parser.add_argument("--tokens", type=_int_list, help=f"comma-separated (default {TOKENS})")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    parser.add_argument(
        "--dtype", default=None, help=f"one of {DTYPES} (default float32 on CPU, bf16 on GPU)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    parser.add_argument("--mlp-tokens", type=int, default=None, help="tokens in the MLP step (default 8192)")
    parser.add_argument("--no-mlp", action="store_true", help="skip the MLP-block training step")
    parser.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")


def _settings(args: argparse.Namespace) -> dict:
    """Validate the arguments into plain settings; ``ValueError`` names a bad value."""
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise ValueError(f"--ops {args.ops!r}: valid ops are {', '.join(OPS)}")
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: valid devices are cpu, cuda")
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: valid dtypes are {', '.join(DTYPES)}")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    if repeats < 1:
        raise ValueError(f"--repeats {repeats}: must be >= 1")
    mlp_tokens = args.mlp_tokens if args.mlp_tokens is not None else (2048 if args.quick else 8192)
    if mlp_tokens < 1:
        raise ValueError(f"--mlp-tokens {mlp_tokens}: must be >= 1")
    return {
        "ops": ops,
        "widths": args.widths or ([8256] if args.quick else list(WIDTHS)),
        "tokens": args.tokens or ([1024] if args.quick else list(TOKENS)),
        "dtype": dtype,
        "device": args.device,
        "repeats": repeats,
        "compile": not args.no_compile,
        "mlp_tokens": None if args.no_mlp else mlp_tokens,
        "out": args.out,
    }


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    import torch

    if settings["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    return _run(settings)


# ---------------------------------------------------------------------------------------------
# Measurement (heavy imports happen inside these functions, after argument checking).


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _interleaved_ms(tasks: dict, repeats: int, device: str) -> dict:
    """Median wall time (ms) of each task, measured round-robin so that machine noise hits all alike.

    ``tasks`` maps a key to ``(setup, timed)``: ``setup()`` (or None) runs untimed and its result
    is passed to ``timed``. Round 0 is a warm-up (caches, allocator, lazy initialisation).
    """
    import statistics
    import time

    times: dict = {key: [] for key in tasks}
    for round_ in range(repeats + 1):
        for key, (setup, timed) in tasks.items():
            state = setup() if setup else None
            _sync(device)
            start = time.perf_counter()
            timed(state)
            _sync(device)
            if round_:
                times[key].append((time.perf_counter() - start) * 1e3)
            del state
    return {key: statistics.median(v) for key, v in times.items()}


def _reference_fn(op: str):
    from polycom.ops import reference

    return reference.poly_norm if op == "polynorm" else reference.poly_relu


def _providers(op: str, settings: dict) -> dict:
    """name -> fn(x, weight, bias) for every implementation available here."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from polycom import functional

    ref = _reference_fn(op)
    ours = functional.poly_norm if op == "polynorm" else functional.poly_relu
    providers = {
        "official": lambda x, w, b: checkpoint(ref, x, w, b, use_reentrant=False),
        "ours": lambda x, w, b: ours(x, w, b, impl="auto"),
    }
    if settings["compile"]:
        providers["compiled"] = torch.compile(ref)
    liger = _liger_poly_norm(settings) if op == "polynorm" else None
    if liger is not None:
        providers["liger"] = liger
    return providers


def _liger_poly_norm(settings: dict):
    """Liger-Kernel's PolyNorm as fn(x, w, b), or None without a GPU or liger-kernel."""
    if settings["device"] != "cuda":
        return None
    try:
        from liger_kernel.transformers import LigerPolyNorm
    except ImportError:
        return None
    # in_place=False: the default writes dx into dy, which the benchmark reuses across runs
    module = LigerPolyNorm(eps=1e-6, in_place=False).to(settings["device"])

    def run(x, w, b):
        return module(x)

    return run


def _saved_bytes(fn, x, w, b) -> int:
    """Bytes of the unique storages autograd saves for backward during ``fn(x, w, b)``."""
    import torch

    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x, w, b)
    del y
    return sum(storages.values())


def _measure_op(op: str, tokens: int, width: int, settings: dict) -> list[dict]:
    import time

    import torch

    device, repeats = settings["device"], settings["repeats"]
    dtype = getattr(torch, settings["dtype"])
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, width, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(tokens, width, generator=gen).to(device, dtype)
    w = torch.full((3,), 1 / 3, device=device, requires_grad=True)
    b = torch.zeros(1, device=device, requires_grad=True)
    providers = _providers(op, settings)

    def backward(y):  # Liger's module has its own coefficients: w and b are then unused
        return torch.autograd.grad(y, (x, w, b), dy, allow_unused=True)

    first_s = {}
    for name, fn in providers.items():
        start = time.perf_counter()
        backward(fn(x, w, b))  # the first call compiles where it must
        _sync(device)
        first_s[name] = time.perf_counter() - start
    tasks = {"copy": (None, lambda _: x.detach().clone())}
    for name, fn in providers.items():
        tasks[name, "fwd"] = (None, lambda _, fn=fn: fn(x, w, b))
        tasks[name, "bwd"] = (lambda fn=fn: fn(x, w, b), backward)
        tasks[name, "fwdbwd"] = (None, lambda _, fn=fn: backward(fn(x, w, b)))
    ms = _interleaved_ms(tasks, repeats, device)
    copy_ms = ms["copy"]
    rows = []
    for name, fn in providers.items():
        fwd, bwd, both = ms[name, "fwd"], ms[name, "bwd"], ms[name, "fwdbwd"]
        saved = _saved_bytes(fn, x, w, b) / (x.numel() * x.element_size())
        rows.append(
            {
                "op": op, "provider": name, "dtype": settings["dtype"], "device": device,
                "tokens": tokens, "width": width, "copy_ms": copy_ms, "fwd_ms": fwd, "bwd_ms": bwd,
                "fwdbwd_ms": both, "fwd_x_copy": fwd / copy_ms, "bwd_x_copy": bwd / copy_ms,
                "fwdbwd_x_copy": both / copy_ms, "saved_over_input": saved, "first_call_s": first_s[name],
            }
        )  # fmt: skip
        print(_progress(rows[-1]), flush=True)
    return rows


def _progress(r: dict) -> str:
    return (
        f"{r['op']:<9}{r['tokens']:>6} x {r['width']:<6}{r['provider']:<9} "
        f"fwd {r['fwd_x_copy']:6.2f}x bwd {r['bwd_x_copy']:6.2f}x fwd+bwd {r['fwdbwd_x_copy']:6.2f}x copy, "
        f"saved {r['saved_over_input']:.3f}"
    )


def _mlp_step(name: str, tokens: int, settings: dict):
    """One AdamW training step of ``d=512 -> hidden -> 512`` with activation ``name``, as a closure."""
    import torch
    from torch import nn

    from polycom import build_activation, get_activation_spec

    device, dtype = settings["device"], getattr(torch, settings["dtype"])
    spec = get_activation_spec(name.removesuffix("-official"))
    hidden = spec.hidden_width(2048)
    torch.manual_seed(0)
    if name.endswith("-official"):
        act = _checkpointed(build_activation(spec.name, impl="reference"))
    else:
        act = build_activation(spec.name)
    model = nn.Sequential(
        nn.Linear(512, spec.up_features(hidden), bias=False), act, nn.Linear(hidden, 512, bias=False)
    ).to(device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(tokens, 512, device=device, dtype=dtype)

    def step(_):
        opt.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
        opt.step()

    return step


def _checkpointed(inner):
    """``inner`` run inside non-reentrant activation checkpointing, as the official code does."""
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    return Checkpointed()


def _fresh_process_first_call(settings: dict) -> dict:
    """Seconds for ``import torch`` and for ``import polycom`` + first fused PolyNorm fwd+bwd."""
    import json
    import subprocess
    import sys

    code = (
        "import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter()\n"
        "import polycom\n"
        "x = torch.randn(64, 8256, requires_grad=True); m = polycom.PolyNorm()\n"
        "m(x).sum().backward(); t2 = time.perf_counter()\n"
        "import json; print(json.dumps({'import_torch_s': t1 - t0, 'polycom_first_call_s': t2 - t1,"
        " 'impl': polycom.functional._pick('auto', x, 3).name}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run(settings: dict) -> int:
    kernel_rows = [
        row
        for op in settings["ops"]
        for tokens in settings["tokens"]
        for width in settings["widths"]
        for row in _measure_op(op, tokens, width, settings)
    ]
    mlp_rows = []
    if settings["mlp_tokens"]:
        tasks = {name: (None, _mlp_step(name, settings["mlp_tokens"], settings)) for name in MLP_ACTIVATIONS}
        for name, ms in _interleaved_ms(tasks, settings["repeats"], settings["device"]).items():
            mlp_rows.append({"activation": name, "tokens": settings["mlp_tokens"], "step_ms": ms})
            print(f"mlp step {name:<18} {ms:8.1f} ms", flush=True)
        swiglu = mlp_rows[0]["step_ms"]
        for row in mlp_rows:
            row["over_swiglu"] = row["step_ms"] / swiglu
    first = _fresh_process_first_call(settings) if settings["device"] == "cpu" else {}
    markdown = _markdown(settings, kernel_rows, mlp_rows, first)
    _write_outputs(settings["out"], kernel_rows, mlp_rows, markdown)
    print("\n" + markdown)
    return 0


# ---------------------------------------------------------------------------------------------
# Reports


def _markdown(settings: dict, kernel_rows: list[dict], mlp_rows: list[dict], first: dict) -> str:
    import platform

    import torch

    lines = [
        f"Device: {settings['device']} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), dtype {settings['dtype']}, torch {torch.__version__}, "
        f"median of {settings['repeats']} runs. Times as multiples of one same-size copy "
        "(floors: fwd 1.0, bwd 1.5, fwd+bwd 2.5).",
        "",
        "| op | tokens x width | provider | fwd | bwd | fwd+bwd | fwd+bwd ms | saved/input | first call s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in kernel_rows:
        lines.append(
            f"| {r['op']} | {r['tokens']} x {r['width']} | {r['provider']} | {r['fwd_x_copy']:.2f} | "
            f"{r['bwd_x_copy']:.2f} | {r['fwdbwd_x_copy']:.2f} | {r['fwdbwd_ms']:.1f} | "
            f"{r['saved_over_input']:.3f} | {r['first_call_s']:.2f} |"
        )
    lines += ["", *_speedups(kernel_rows)]
    if mlp_rows:
        lines += [
            "",
            f"MLP block training step (d=512, width 2048 / 1365 for SwiGLU, {mlp_rows[0]['tokens']} tokens, "
            "AdamW):",
            "",
            "| activation | step ms | / SwiGLU |",
            "|---|---:|---:|",
        ]
        lines += [f"| {r['activation']} | {r['step_ms']:.1f} | {r['over_swiglu']:.2f} |" for r in mlp_rows]
    if first:
        lines += ["", f"Fresh process: {first}"]
    return "\n".join(lines) + "\n"


def _speedups(kernel_rows: list[dict]) -> list[str]:
    """Ours vs the others, forward+backward: how many times faster (higher is better for ours)."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in kernel_rows:
        by_key.setdefault((r["op"], r["tokens"], r["width"]), {})[r["provider"]] = r
    others = sorted({r["provider"] for r in kernel_rows} - {"ours"})
    lines = [
        "| op | tokens x width | " + " | ".join(f"ours vs {o} (fwd+bwd)" for o in others) + " |",
        "|---|---|" + "---:|" * len(others),
    ]
    for (op, tokens, width), group in by_key.items():
        ours = group.get("ours")
        cells = [
            f"{group[o]['fwdbwd_ms'] / ours['fwdbwd_ms']:.1f}x" if ours and o in group else "-"
            for o in others
        ]
        lines.append(f"| {op} | {tokens} x {width} | " + " | ".join(cells) + " |")
    return lines


def _write_outputs(out: str, kernel_rows: list[dict], mlp_rows: list[dict], markdown: str) -> None:
    """Write kernels.csv, mlp.csv and bench.md into ``out``, each via a temp file and a rename."""
    import csv
    import io
    import os

    from polycom.fileio import atomic_write_text

    files = {"bench.md": markdown}
    for name, rows in (("kernels.csv", kernel_rows), ("mlp.csv", mlp_rows)):
        if rows:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
            files[name] = buffer.getvalue()
    for name, text in files.items():
        atomic_write_text(os.path.join(out, name), text)
    print(f"wrote {', '.join(files)} to {out}")
