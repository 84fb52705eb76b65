"""Fuzzes the engine's boundary: ExpertEngine, routed_experts, the ops wrappers and the raw C ABI.

    python tests/native/fuzz_boundary.py -max_total_time=600          # atheris (libFuzzer flags)
    python tests/native/fuzz_boundary.py -max_total_time=30 -seed=1   # tests/native/test_fuzz.py

The contract: every call either succeeds with results that match the float64 reference
(fuzz_oracle.py) or raises ValueError, TypeError or KTNativeError; never a crash, an abort, a
hang (libFuzzer's -timeout) or a silently wrong result. Inputs the harness knows to be valid must
succeed, and inputs it knows to be invalid must be refused. A broken contract raises, which
atheris reports as a crash (nonzero exit, the input saved as crash-*).

Without atheris the same targets run on a seeded `random.Random` per run, for
``-max_total_time`` seconds (``-seed`` picks the first seed), and say so on stderr.
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

try:
    import atheris
except ImportError:   # the fallback loop below
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["kt_trl", "tests"]):
        from kt_trl._native import KTNativeError, available_isas, configure
        from kt_trl.engine import ExpertEngine, ExpertLoRA
        from kt_trl.experts import routed_experts
        from tests.native import fuzz_raw
        from tests.native.fuzz_inputs import COPIED_KINDS, CONTIGUOUS_KINDS, Draw, redtype, relayout, reshape_bad, routing
        from tests.native.fuzz_oracle import LayerCall, check_outputs, near_kink
else:
    from kt_trl._native import KTNativeError, available_isas, configure
    from kt_trl.engine import ExpertEngine, ExpertLoRA
    from kt_trl.experts import routed_experts
    from tests.native import fuzz_raw
    from tests.native.fuzz_inputs import COPIED_KINDS, CONTIGUOUS_KINDS, Draw, redtype, relayout, reshape_bad, routing
    from tests.native.fuzz_oracle import LayerCall, check_outputs, near_kink

REFUSALS = (ValueError, TypeError, KTNativeError)
FLOATS = [torch.bfloat16, torch.float16, torch.float64]
STATS = {"runs": 0, "compared": 0, "near_kink": 0, "refused": 0}


class Expect:
    """Whether the draw stayed valid, and what it changed, for the message of a broken contract."""

    def __init__(self):
        self.valid, self.why, self.reshaped = True, [], False

    def require(self, ok: bool, what: str) -> None:
        if not ok:
            self.valid = False
            self.why.append(what)

    def call(self, fn, *args, **kwargs):
        """``(True, fn(...))``, or ``(False, None)`` if it refused an invalid input; raises if the
        contract broke (a valid input refused, an invalid one accepted, any other exception)."""
        try:
            result = fn(*args, **kwargs)
        except REFUSALS as e:
            if self.valid:
                raise AssertionError(f"valid input refused by {fn.__name__}: {type(e).__name__}: {e}") from e
            STATS["refused"] += 1
            return False, None
        if not self.valid:
            raise AssertionError(f"{fn.__name__} accepted invalid input ({', '.join(self.why)})")
        return True, result


def tensor_arg(draw, expect, t, name, *, dtype, others=FLOATS, converted=FLOATS, kinds=COPIED_KINDS, bad=12):
    """``t`` redrawn in dtype (one of ``others`` at times: valid if ``converted``), layout (valid if in
    ``kinds``) and, once per `Expect`, shape (invalid), with the expectation updated."""
    t, _ = redtype(draw, t, dtype, list(others))
    expect.require(t.dtype in (dtype, *converted), f"{name} dtype")
    t, kind = relayout(draw, t, bad=bad)
    expect.require(kind in kinds, f"{name} layout {kind}")
    if isinstance(t, torch.Tensor) and t.device.type != "meta" and not expect.reshaped and draw.odds(25):
        t, expect.reshaped = reshape_bad(draw, t), True
        expect.require(False, f"{name} shape")
    return t


def lora_arg(draw, expect, E, out, inp, g, name):
    """``(ExpertLoRA | None, leaves)`` of one projection: A contiguous, B in any layout."""
    if draw.odds(2):
        return None, []
    r = draw.int(1, 4)
    A = tensor_arg(draw, expect, torch.randn(E, r, inp, generator=g) * 0.2, f"{name} A", dtype=torch.float32,
                   others=[torch.float64], converted=(), kinds=CONTIGUOUS_KINDS, bad=20)
    if draw.int(0, 1):   # PEFT's lora_B.weight [out, r*E] seen as [E, out, r]
        B = (torch.randn(out, r * E, generator=g) * 0.2).view(out, r, E).permute(2, 0, 1)
    else:
        B = tensor_arg(draw, expect, torch.randn(E, out, r, generator=g) * 0.2, f"{name} B", dtype=torch.float32,
                       others=[torch.float64], converted=(), bad=20)
    scale = 0.5
    if draw.odds(30):
        scale = draw.pick([float("nan"), float("inf"), "half"])
        expect.require(False, f"{name} scale")
    return ExpertLoRA(A, B, scale), [A, B]


def semantic_call(engine_gate_up, engine_down, x, ids, w, loras, leaves, **options) -> LayerCall:
    """The values the engine reads from these arguments (converted as `ExpertEngine` converts them)."""
    scales = [l.scale if l is not None else None for l in loras]

    def views(L):
        out, i = [], 0
        for s in scales:
            out.append(None if s is None else (L[i], L[i + 1], s))
            i += 0 if s is None else 2
        return tuple(out)

    w = w if w.dtype in (torch.float32, torch.bfloat16) else w.float()
    return LayerCall(engine_gate_up.double(), engine_down.double(), x.to(torch.bfloat16), ids.long(), w,
                     leaves=leaves, loras=views, **options)


def routing_valid(ids: torch.Tensor, w: torch.Tensor, E: int) -> bool:
    """What the engine accepts: ids in [0, E], no expert twice in a row, finite weights."""
    if ids.dim() != 2 or w.shape != ids.shape or not bool(torch.isfinite(w.double()).all()):
        return False
    ids = ids.long()
    if bool(((ids < 0) | (ids > E)).any()):
        return False
    for row in ids.tolist():
        experts = [e for e in row if e < E]
        if len(set(experts)) != len(experts):
            return False
    return True


def fuzz_engine(draw: Draw) -> None:
    """ExpertEngine: construction, load_expert, load_bias, unpack, forward, backward."""
    expect, g = Expect(), draw.generator()
    E, H, I = (draw.int(1, 6), draw.int(1, 40), draw.int(1, 24)) if not draw.odds(30) else (
        draw.int(0, 1), draw.int(0, 1), draw.int(0, 1))
    expect.require(min(E, H, I) > 0, "a size 0")
    act = {"activation": draw.pick(["silu", "clamped_swiglu"]), "alpha": 1.0 + draw.int(0, 8) / 8,
           "limit": 5.0 + draw.int(0, 10) / 2}
    if draw.odds(10):
        act[draw.pick(["activation", "alpha", "limit"])] = draw.pick(["gelu", float("nan"), -1.0, 0.0, None])
    number = lambda v: isinstance(v, float) and math.isfinite(v)  # noqa: E731
    expect.require(act["activation"] in ("silu", "clamped_swiglu") and number(act["alpha"]) and number(act["limit"])
                   and act["limit"] > 0, "activation")
    gate_up = tensor_arg(draw, expect, torch.randn(E, 2 * I, H, generator=g) / H ** 0.5, "gate_up", dtype=torch.float32)
    down = tensor_arg(draw, expect, torch.randn(E, H, I, generator=g) / I ** 0.5, "down", dtype=torch.float32)
    biases = (None, None)
    if draw.odds(3):
        biases = (tensor_arg(draw, expect, torch.randn(E, 2 * I, generator=g), "gate_up_bias", dtype=torch.float32),
                  tensor_arg(draw, expect, torch.randn(E, H, generator=g) * 0.1, "down_bias", dtype=torch.float32))
    ok, engine = expect.call(ExpertEngine, gate_up, down, gate_up_bias=biases[0], down_bias=biases[1], **act)
    if not ok:
        return
    packed = [gate_up.to(torch.bfloat16).clone(), down.to(torch.bfloat16).clone()]
    bias_values = [b.float() if b is not None else None for b in biases]
    if draw.odds(4):
        reload = Expect()
        e = draw.pick([draw.int(0, E - 1), E, -1, 1 << 64, 1.0]) if draw.odds(6) else draw.int(0, E - 1)
        reload.require(isinstance(e, int) and 0 <= e < E, "expert index")
        new_gu = tensor_arg(draw, reload, torch.randn(2 * I, H, generator=g), "gate_up", dtype=torch.float32)
        new_dn = tensor_arg(draw, reload, torch.randn(H, I, generator=g), "down", dtype=torch.float32)
        if reload.call(engine.load_expert, e, new_gu, new_dn)[0]:
            packed[0][e], packed[1][e] = new_gu.to(torch.bfloat16), new_dn.to(torch.bfloat16)
    gate_up_now, down_now = engine.unpack()
    assert torch.equal(gate_up_now, packed[0]) and torch.equal(down_now, packed[1]), "unpack != the loaded weights"
    fuzz_call(draw, engine, packed, bias_values, act, g)


def fuzz_call(draw: Draw, engine: ExpertEngine, packed, biases, act: dict, g) -> None:
    """One forward and backward of ``engine``, compared with the reference."""
    E, H, I = engine.dims
    expect = Expect()
    T, k = draw.int(0, 5), draw.int(1, 4)
    ids, w, _ = routing(draw, T, k, E, g)
    ids = tensor_arg(draw, expect, ids, "top_k_index", dtype=torch.long,
                     others=[torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool],
                     converted=[torch.int32, torch.int16, torch.uint8])
    w = tensor_arg(draw, expect, w, "top_k_weights", dtype=torch.float32, others=[torch.bfloat16, torch.float64])
    if isinstance(ids, torch.Tensor) and isinstance(w, torch.Tensor) and "meta" not in (ids.device.type, w.device.type):
        expect.require(routing_valid(ids, w, E), "routing")
    x = tensor_arg(draw, expect, torch.randn(T, H, generator=g), "hidden_states", dtype=torch.bfloat16,
                   others=[torch.float32], converted=(), kinds=CONTIGUOUS_KINDS)
    lgu, leaves_gu = lora_arg(draw, expect, E, 2 * I, H, g, "gate_up")
    ld, leaves_d = lora_arg(draw, expect, E, H, I, g, "down")
    save = not draw.odds(8)
    ok, y_saved = expect.call(engine.forward, x, ids, w, lora_gate_up=lgu, lora_down=ld, save=save)
    if not ok:
        return
    y, saved = y_saved
    back = Expect()
    back.require(save or T == 0, "backward after a forward that saved nothing")
    dy = tensor_arg(draw, back, torch.randn(T, H, generator=g), "grad_output", dtype=torch.bfloat16,
                    others=[torch.float32], converted=(), kinds=CONTIGUOUS_KINDS)
    need = [not draw.odds(4) for _ in range(3)]
    ok, grads = back.call(engine.backward, dy, x, ids, w, saved, lora_gate_up=lgu, lora_down=ld, need_dx=need[0],
                          need_dw=need[1], need_lora_grads=need[2])
    call = semantic_call(packed[0], packed[1], x, ids, w, (lgu, ld), leaves_gu + leaves_d, gate_up_bias=biases[0],
                         down_bias=biases[1], **act)
    got = {"y": y}
    if ok:
        dx, dw, g_gu, g_d = grads
        assert (dx is None) != need[0] and (dw is None) != need[1], "need_dx/need_dw not honoured"
        lora_grads = [*(g_gu or ()), *(g_d or ())]
        assert len(lora_grads) == (len(leaves_gu) + len(leaves_d) if need[2] else 0), "LoRA gradients missing"
        got.update(dx=dx, dw=dw, **{f"leaf{i}": v for i, v in enumerate(lora_grads)})
    kink = near_kink(call)
    check_outputs(got, call, dy if ok else None, gradients=not kink)
    STATS["compared" if not kink else "near_kink"] += 1


def fuzz_public_op(draw: Draw) -> None:
    """routed_experts with trainable x, weights and LoRA leaves seen through views (expanded, PEFT)."""
    g = draw.generator()
    E, H, I, T, k = draw.int(1, 5), draw.int(1, 32), draw.int(1, 16), draw.int(0, 5), draw.int(1, 3)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5, torch.randn(E, H, I, generator=g) / I ** 0.5
    engine = ExpertEngine(gate_up, down)
    ids, w, _ = routing(draw, T, k, E, g)
    if not routing_valid(ids, w, E):
        return
    x = torch.randn(T, H, generator=g).to(draw.pick([torch.float32, torch.bfloat16])).requires_grad_()
    w = w.requires_grad_()
    r = draw.int(1, 3)
    shapes = [(E, r, H), (E, 2 * I, r), (E, r, I), (E, H, r)]
    expand = [draw.odds(3) for _ in shapes]   # one expert's factor shared by all E: a zero-stride view
    leaves = [(torch.randn((1, *s[1:]) if ex else s, generator=g) * 0.2).requires_grad_() for s, ex in zip(shapes, expand)]

    def views(L):
        v = [l.expand(s) for l, s in zip(L, shapes)]
        return (v[0], v[1], 0.5), (v[2], v[3], 2.0)

    (a_gu, b_gu, s_gu), (a_d, b_d, s_d) = views(leaves)
    y = routed_experts(engine, x, ids, w, lora_gate_up=ExpertLoRA(a_gu, b_gu, s_gu),
                       lora_down=ExpertLoRA(a_d, b_d, s_d))
    dy = torch.randn(T, H, generator=g)
    y.float().backward(dy)
    call = LayerCall(gate_up.bfloat16().double(), down.bfloat16().double(), x.detach().to(torch.bfloat16), ids, w.detach(),
                     leaves=[l.detach() for l in leaves], loras=views)
    got = {"y": y.detach(), "dx": x.grad, "dw": w.grad, **{f"leaf{i}": l.grad for i, l in enumerate(leaves)}}
    check_outputs(got, call, dy.to(torch.bfloat16).float())
    STATS["compared"] += 1


def fuzz_runtime(draw: Draw) -> None:
    """configure: a path this CPU has with 1-3 workers, or a bad name or count (refused)."""
    expect = Expect()
    isa = draw.pick([*available_isas(), "auto"] + (["neon", 3] if draw.odds(4) else []))
    threads = draw.pick([1, 2, 3] + ([-1, 1 << 40, 2.5] if draw.odds(4) else []))
    expect.require(isa in (*available_isas(), "auto") and threads in (1, 2, 3), "isa or threads")
    expect.call(configure, isa=isa, threads=threads)


TARGETS = [fuzz_engine, fuzz_engine, fuzz_public_op, fuzz_raw.fuzz_ops, fuzz_raw.fuzz_lib, fuzz_runtime]


def one_input(draw: Draw) -> None:
    STATS["runs"] += 1
    draw.pick(TARGETS)(draw)
    if STATS["runs"] % 200 == 0:
        report()


def report() -> None:
    print("kt-fuzz: " + " ".join(f"{k}={v}" for k, v in STATS.items()), file=sys.stderr, flush=True)


def test_one_input(data: bytes) -> None:
    one_input(Draw(atheris.FuzzedDataProvider(data)))


def fallback_loop(argv: list[str]) -> None:
    """Seeded random inputs for -max_total_time seconds: the same targets without coverage guidance."""
    flags = dict(a.lstrip("-").split("=", 1) for a in argv if a.startswith("-") and "=" in a)
    seed, budget = int(flags.get("seed", 1)), float(flags.get("max_total_time", 20))
    print("kt-fuzz: atheris is not installed; running seeded random inputs", file=sys.stderr)
    start = time.monotonic()
    while time.monotonic() - start < budget:
        one_input(Draw(random.Random(seed + STATS["runs"])))
    print(f"Done {STATS['runs']} runs in {int(time.monotonic() - start)} second(s)", file=sys.stderr)


def main() -> None:
    torch.set_num_threads(1)
    configure(isa="auto", threads=2)
    if atheris is None:
        fallback_loop(sys.argv[1:])
        report()
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
