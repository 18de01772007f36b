"""Typed errors. Each carries the fields a user needs to fix the input."""

from __future__ import annotations


class FlashMoEError(Exception):
    """Base class of every error flashmoe_gen raises on purpose."""


class ProblemError(FlashMoEError, ValueError):
    """An invalid MoE problem: names the field, its value and what would be valid."""

    def __init__(self, field: str, value: object, expected: str):
        self.field, self.value, self.expected = field, value, expected
        super().__init__(f"problem.{field}={value!r} is invalid: {expected}")


class ConfigError(FlashMoEError, ValueError):
    """An invalid kernel config for a problem or device."""

    def __init__(self, field: str, value: object, expected: str, config_name: str | None = None):
        self.field, self.value, self.expected = field, value, expected
        self.config_name = config_name
        where = f" (config {config_name})" if config_name else ""
        super().__init__(f"config.{field}={value!r} is invalid{where}: {expected}")


class CompileError(FlashMoEError, RuntimeError):
    """NVRTC rejected generated source; carries the compiler log."""

    def __init__(self, message: str, log: str, config_name: str | None = None,
                 problem_name: str | None = None, source_path: str | None = None):
        self.log, self.config_name, self.problem_name = log, config_name, problem_name
        self.source_path = source_path
        parts = [message]
        if problem_name:
            parts.append(f"problem={problem_name}")
        if config_name:
            parts.append(f"config={config_name}")
        if source_path:
            parts.append(f"source={source_path}")
        super().__init__("; ".join(parts) + ("\n" + log if log else ""))


class DeviceError(FlashMoEError, RuntimeError):
    """No usable GPU, or a CUDA call failed."""


#: The exit status of a tuning job whose candidate left the GPU or NCCL unusable (the
#: candidate is recorded as failed): sysexits' EX_TEMPFAIL, "try again". `flashmoe-tune
#: tune` resumes such a job in fresh processes (``--restarts``).
RESUME_EXIT = 75


class ContextLost(DeviceError):
    """A candidate left this rank's CUDA context or NCCL unusable (a fault, a hang that had
    to be aborted): every later candidate in these processes would fail as well. The job
    ends with RESUME_EXIT; a resumed one goes on with the next candidates."""


class CommError(FlashMoEError, RuntimeError):
    """A collective failed, timed out, or ranks disagreed."""


class CommTimeout(CommError):
    """A collective or a wait on a peer ran past its deadline (a peer died or hangs)."""


class ArgumentError(FlashMoEError, TypeError):
    """An API argument of the wrong kind: names the argument, its value and what is accepted."""

    def __init__(self, argument: str, value: object, expected: str):
        self.argument, self.value, self.expected = argument, value, expected
        super().__init__(f"{argument}={value!r} is invalid: {expected}")


class DatabaseError(FlashMoEError, RuntimeError):
    """The winners database cannot be used: names the URL (password hidden), what is wrong
    and what to do."""

    def __init__(self, url: str, problem: str, hint: str):
        self.url, self.problem, self.hint = url, problem, hint
        super().__init__(f"database {url}: {problem}; {hint}")


class CacheError(FlashMoEError, RuntimeError):
    """The compiled-kernel cache cannot be used (e.g. ``FLASHMOE_CACHE`` names a file)."""


class UsageError(FlashMoEError, ValueError):
    """An invalid command-line option (or a path it names): names the option, its value and
    what would be valid."""

    def __init__(self, option: str, value: object, expected: str):
        self.option, self.value, self.expected = option, value, expected
        super().__init__(f"{option} {value!r} is invalid: {expected}")


class SetupError(FlashMoEError, RuntimeError):
    """A tool or library this command needs is missing: names it and how to install it."""


class PerformanceWarning(UserWarning):
    """Generated code that runs right but slower than it should: ptxas serialised a
    kernel's warpgroup MMAs (each waits for the one before). Names the kernel, the config
    and ptxas's reason; worth a bug report with the config name."""

    def __init__(self, kernel: str, config_name: str, reason: str):
        self.kernel, self.config_name, self.reason = kernel, config_name, reason
        super().__init__(f"kernel {kernel} of config {config_name}: ptxas serialised its "
                         f"wgmma ({reason}); it runs correctly, but slower")
