"""Domain errors. The library raises these; only the CLI turns them into exit codes."""


def shorten(text: str, limit: int = 40, quote: bool = False) -> str:
    """A value for a one-line message: whole when short, else its start and its length
    (a 5,000-digit number must not become a 5,000-character error)."""
    if len(text) <= limit:
        return repr(text) if quote else text
    head = text[:limit // 2]
    return f"{head!r}...({len(text)} characters)" if quote else f"{head}...({len(text)} characters)"


class VitcostError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ConfigError(VitcostError):
    """A model or workload configuration that cannot exist (patch 0, heads not dividing width...)."""


class UnknownNameError(VitcostError):
    """A preset, timm-style model name or GPU profile that vitcost does not know."""


class ProfileError(VitcostError):
    """A GPU profile file that is missing, malformed or incomplete."""


class MeasurementError(VitcostError):
    """A measurement that could not be made (torch missing, no CUDA, a factory that fails)."""


class BudgetFileError(VitcostError):
    """A budget file that is malformed: names the file, the entry and the field."""


class ExtraMissingError(VitcostError):
    """An optional extra a command needs is not installed (the message says how to install it)."""
