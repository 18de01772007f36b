"""A test double for the GPU evaluator: deterministic fake latencies, planted failures.

Clearly not a measurement: the "latency" is a formula of the config's knobs, so a test
knows which config must win.
"""

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.tuner.objective import OK, WRONG_ANSWER, Outcome


def fake_latency(cfg: KernelConfig) -> float:
    gu, dn = cfg.gate_up, cfg.down
    return (1.0 + abs(gu.bm - 128) / 64 + abs(gu.bn - 64) / 32 + abs(dn.bn - 128) / 64
            + 0.1 * abs(gu.stages - 3) + 0.1 * abs(dn.stages - 4) + 0.01 * (gu.bk != 64))


class FakeEvaluator:
    """Fails with a wrong answer on ``fail_rank`` only, for warp grid ``fail_warps``."""

    def __init__(self, rank: int = 0, fail_rank: int | None = None, fail_warps: str = "2x2",
                 interrupt_after: int | None = None):
        self.rank, self.fail_rank, self.fail_warps = rank, fail_rank, fail_warps
        self.interrupt_after, self.calls = interrupt_after, 0

    def __call__(self, cfg: KernelConfig) -> Outcome:
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt("simulated Ctrl-C")
        warps = f"{cfg.gate_up.warps_m}x{cfg.gate_up.warps_n}"
        if self.rank == self.fail_rank and warps == self.fail_warps:
            return Outcome(WRONG_ANSWER, rel_error=0.5, reason="planted failure on this rank")
        ms = fake_latency(cfg)
        return Outcome(OK, ms, ms * 0.98, ms * 1.02, 1e-3)
