"""The one error type for bad user input.

Entry points catch :class:`UserError` and print its message as a single line (no traceback)
and exit non-zero; everything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from a user: the message names the bad value and what would be valid."""


def first_validation_error(errors: list[dict], skip: tuple[str, ...] = ()) -> tuple[str, str, dict]:
    """``(dotted location, message, the error)`` of the first of pydantic's ``err.errors()``.

    The message drops pydantic's "Value error, " prefix and says "must be one of ..." for a bad
    literal; ``skip`` drops location parts that name no key (FastAPI's "body").
    """
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p not in skip)
    ctx = first.get("ctx") or {}
    msg = f"must be one of {ctx['expected']}" if "expected" in ctx else str(first.get("msg", "")).removeprefix(
        "Value error, ")
    return loc, msg, first
