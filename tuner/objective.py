"""One candidate config, evaluated on every rank: build, check once, time.

Failures are values (Kernel Tuner style): a candidate that fails on any rank fails on all,
with its reason, and the search goes on. Between stages the ranks compare notes (``gate``),
so no rank enters a collective that another rank skipped.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import (
    ArgumentError,
    CommError,
    CommTimeout,
    CompileError,
    ConfigError,
    DeviceError,
    ProblemError,
)
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.status import TrialStatus
from flashmoe_gen.watchdog import allgather

OK, INVALID, COMPILE_FAILED, LAUNCH_FAILED, WRONG_ANSWER, TIMEOUT, FAILED = (
    TrialStatus.OK, TrialStatus.INVALID, TrialStatus.COMPILE_FAILED, TrialStatus.LAUNCH_FAILED,
    TrialStatus.WRONG_ANSWER, TrialStatus.TIMEOUT, TrialStatus.FAILED)


@dataclass(frozen=True)
class Outcome:
    status: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    rel_error: float | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def value(self) -> float:
        """What the sampler minimises: the median, or +inf for a failed candidate."""
        return self.median_ms if self.ok and self.median_ms is not None else float("inf")


def classify(exc: BaseException) -> str:
    """The status of a candidate whose evaluation raised ``exc``. A ConfigError here is not
    INVALID: the space let the config through, and the build refused it for what it found
    on this GPU (a kernel that fits no SM, buffers over its memory), which is a failed trial
    the database keeps."""
    if isinstance(exc, CompileError):
        return COMPILE_FAILED
    if isinstance(exc, CommTimeout):
        return TIMEOUT
    if isinstance(exc, CommError):
        return FAILED
    if isinstance(exc, DeviceError) or type(exc).__module__.startswith("cupy"):
        return LAUNCH_FAILED
    return FAILED


def combine(outcomes: list[Outcome]) -> Outcome:
    """Every rank's outcome -> the candidate's: the first failure wins, named by rank."""
    bad = [(r, o) for r, o in enumerate(outcomes) if not o.ok]
    if not bad or all(o == outcomes[0] for o in outcomes):
        # Timings are already the max over ranks; a failure every rank returns alike was
        # combined by ``gate`` (naming its ranks again would read "rank 0: rank 0: ...").
        return outcomes[0]
    r, o = bad[0]
    reasons = "; ".join(f"rank {r}: {o.reason}" for r, o in bad)
    return Outcome(o.status, reason=reasons[:2000])


def is_fatal(exc: BaseException) -> bool:
    """A failure of the run, not of the candidate: communication (CommError, NCCL) or a
    request to stop. These end the whole job instead of becoming a failed trial."""
    if isinstance(exc, (CommError, KeyboardInterrupt, SystemExit)):
        return True
    return type(exc).__name__ == "NcclError" or type(exc).__module__.endswith("nccl")


def gate(mpi, outcome: Outcome | None) -> Outcome | None:
    """Collective: None if every rank is fine so far, else the combined failure."""
    if mpi is None:
        return outcome
    everyone = allgather(mpi, outcome, "comparing notes on a candidate")
    if all(o is None for o in everyone):
        return None
    return combine([o if o is not None else Outcome(OK) for o in everyone])


#: CUDA errors that leave the process's context unusable (a kernel trapped or faulted):
#: every later call on that GPU fails too, so the run ends after recording the trial.
STICKY_ERRORS = (
    "cudaErrorIllegalAddress", "cudaErrorLaunchFailure", "cudaErrorIllegalInstruction",
    "cudaErrorMisalignedAddress", "cudaErrorInvalidAddressSpace", "cudaErrorInvalidPc",
    "cudaErrorHardwareStackError", "cudaErrorAssert", "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED", "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS", "CUDA_ERROR_INVALID_PC", "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_ASSERT")
#: How a failed trial's reason starts when its error lost the CUDA context.
CONTEXT_LOST = "context lost: "
#: How it starts when the candidate's forward never finished and NCCL was aborted.
COMM_LOST = "hung, NCCL aborted: "
#: How it starts when the build refused a config the search space allowed.
REFUSED_AT_BUILD = "refused when built: "


def failure_outcome(exc: BaseException) -> Outcome:
    tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
    if any(name in tb for name in STICKY_ERRORS):
        tb = CONTEXT_LOST + tb
    elif isinstance(exc, (ConfigError, ProblemError)):
        tb = REFUSED_AT_BUILD + tb
    return Outcome(classify(exc), reason=tb[:1500])


def hung_outcome(exc: CommTimeout) -> Outcome:
    """A candidate whose forward never ended (the bounded wait aborted NCCL): a timeout
    trial whose reason makes ``context_lost`` end the run once it is recorded."""
    return Outcome(TIMEOUT, reason=(COMM_LOST + str(exc))[:1500])


def context_lost(outcome: Outcome) -> bool:
    """Whether a (combined) failed outcome left some rank without a usable CUDA context or
    communicator: the run ends once the trial is recorded (a resumed run goes on past it)."""
    reason = outcome.reason or ""
    return not outcome.ok and (CONTEXT_LOST in reason or COMM_LOST in reason)


#: ``--check``: "sampled" (default) checks a few rows per rank on the GPU against the
#: float64 reference of the experts they use (weights generated on the GPU,
#: ``DeviceWeights.generate``); "full" draws every expert on the host (``MoEWeights.random``)
#: and checks against the host reference over the whole model (slow for large models).
CHECK_MODES = ("sampled", "full")


def _no_stage(text: str, trial: bool = True) -> None:
    pass


class LayerEvaluator:
    """Evaluates candidates of one problem on this rank, sharing weights and inputs.

    ``check_mode`` (``CHECK_MODES``) picks the weights and the check; ``check_rows`` is the
    sampled check's rows per rank. ``stage(text, trial=True)`` hears what the evaluator is
    doing (rank 0's progress). ``memory`` is this rank's ``MemoryUse`` after set-up.
    """

    def __init__(self, problem: MoEProblem, comm=None, *, seed: int = 0, warmup: int = 3,
                 iters: int = 15, check: bool = True, check_mode: str = "sampled",
                 check_rows: int | None = None, stage=None):
        import cupy

        from flashmoe_gen.arch import current_device_limits
        from flashmoe_gen.check import SAMPLE_ROWS
        from flashmoe_gen.device_weights import DeviceWeights
        from flashmoe_gen.memory import MemoryUse, buffer_bytes
        from flashmoe_gen.weights import MoEWeights, random_tokens

        if check_mode not in CHECK_MODES:
            raise ArgumentError("check_mode", check_mode, f"choose one of {list(CHECK_MODES)}")
        if check_rows is not None and (isinstance(check_rows, bool) or
                                       not isinstance(check_rows, int) or check_rows < 1):
            raise ArgumentError("check_rows", check_rows, "a positive integer (rows per rank)")
        self.problem, self.comm = problem, comm
        self.rank = comm.rank if comm is not None else 0
        self.mpi = comm.mpi if comm is not None else None
        self.warmup, self.iters, self.check, self.seed = warmup, iters, check, seed
        self.check_mode, self.stage = check_mode, stage or _no_stage
        self.check_rows = SAMPLE_ROWS if check_rows is None else check_rows
        self.host_weights = None
        if check and check_mode == "full":
            self.stage("drawing every expert's weights on the host (--check full)", False)
            self.host_weights = MoEWeights.random(problem, seed)
            self.weights = DeviceWeights.from_host(problem, self.host_weights, self.rank)
        else:
            self.stage(f"generating this rank's {problem.local_experts} experts' weights on "
                       "the GPU", False)
            self.weights = DeviceWeights.generate(problem, self.rank, seed)
        self.x_bits = random_tokens(problem.tokens_per_rank, problem.hidden,
                                    seed=seed * 1000 + self.rank + 1)
        self.x = cupy.asarray(self.x_bits)
        self._ref_cache: dict = {}
        cupy.cuda.get_current_stream().synchronize()
        free, total = cupy.cuda.runtime.memGetInfo()
        default = KernelConfig.default(problem, current_device_limits().arch)
        self.memory = MemoryUse(self.rank, self.weights.nbytes, buffer_bytes(problem, default),
                                free, total)

    def __call__(self, config: KernelConfig) -> Outcome:
        from flashmoe_gen.arch import current_device_limits
        from flashmoe_gen.build import build
        from flashmoe_gen.check import TOLERANCE, check_layer, check_layer_sampled
        from flashmoe_gen.runtime import FlashMoE
        from flashmoe_gen.tuner.bench import time_callable

        layer, failed = None, None
        self.stage(f"compiling/loading {config.name}")
        try:
            kernel = build(self.problem, config, current_device_limits())  # cached per config
            layer = FlashMoE(kernel, weights=self.weights, comm=self.comm, agree=False)
        except Exception as e:  # a failed candidate is a result, not a crash
            if is_fatal(e):
                raise
            failed = failure_outcome(e)
        if (failed := gate(self.mpi, failed)) is not None:
            return failed

        rel = None
        if self.check:
            self.stage(f"checking ({self.check_mode})")
            try:
                if self.host_weights is not None:
                    res = check_layer(layer, self.x_bits, self.host_weights, None, self.seed,
                                      self._ref_cache)
                else:
                    res = check_layer_sampled(layer, self.x, self.x_bits, self.seed, None,
                                              self.check_rows, self._ref_cache)
                rel = res.rel_error
                if not res.finite or res.rel_error > TOLERANCE or res.routing_mismatches:
                    failed = Outcome(WRONG_ANSWER, rel_error=rel, reason=(
                        f"rel err {res.rel_error:.3e} (tol {TOLERANCE}), finite={res.finite}, "
                        f"routing mismatches {res.routing_mismatches}"))
            except CommTimeout as e:  # this candidate's forward never ended: NCCL aborted
                failed = hung_outcome(e)
            except Exception as e:
                if is_fatal(e):
                    raise
                failed = failure_outcome(e)
            if (failed := gate(self.mpi, failed)) is not None:
                return failed
            if self.mpi is not None:
                rel = max(allgather(self.mpi, rel, "gathering the reference errors"))

        self.stage("timing")
        if self.comm is not None:
            self.comm.check_usable()  # an aborted NCCL ends the run, never a failed trial
        try:
            t = time_callable(lambda: layer.forward(self.x), warmup=self.warmup,
                              iters=self.iters, comm=self.comm)
        except CommTimeout as e:  # every rank waits on the same forwards, so all time out
            return hung_outcome(e)
        except Exception as e:
            # time_callable's only collective is its last one, so a rank that raised
            # before it could strand the others: end the whole run instead of hanging.
            raise CommError(f"rank {self.rank}: timing {config.name} failed: {e}") from e
        return Outcome(OK, t.median_ms, t.p20_ms, t.p80_ms, rel)
