"""Trial status values: one enum for the objective, the study and the database."""

from __future__ import annotations

from enum import Enum


class TrialStatus(str, Enum):
    """What became of one candidate. Members compare equal to their string values, which is
    what the database and Optuna's user attributes store."""

    OK = "ok"
    INVALID = "invalid"                # rejected before compiling (constraints)
    COMPILE_FAILED = "compile_failed"  # NVRTC refused the generated source
    LAUNCH_FAILED = "launch_failed"    # loading or launching failed on the GPU
    WRONG_ANSWER = "wrong_answer"      # outside the tolerance of the float64 reference
    TIMEOUT = "timeout"                # a collective or a wait ran past its deadline
    FAILED = "failed"                  # anything else
    INTERRUPTED = "interrupted"        # the tuning process ended mid-trial

    def __str__(self) -> str:
        return self.value


#: Statuses a trial row in the database may carry (a measured or failed candidate).
RECORDED = tuple(s.value for s in TrialStatus if s not in (TrialStatus.INVALID,
                                                           TrialStatus.INTERRUPTED))
