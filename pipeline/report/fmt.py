"""One rounding rule for every number the report prints: accuracies (and their differences and standard
deviations) to one decimal like the paper, rounded half away from zero on the number's shortest decimal
form (so 18.85 -> 18.9 and 67.7625 -> 67.8, whatever the binary float underneath).  The CSV, Markdown and
LaTeX files and the README all format through here, so one cell shows one value everywhere; a difference
is taken between the rounded values, so a reader can check it from the table itself."""
from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

ONE = Decimal("0.1")


def dec1(x) -> Decimal | None:
    """``x`` (number or numeric string) rounded to one decimal, or None for missing / NaN / empty."""
    if x is None:
        return None
    if isinstance(x, str):
        if not x.strip():
            return None
        try:
            d = Decimal(x.strip())
        except InvalidOperation:
            return None
    else:
        x = float(x)
        if not math.isfinite(x):
            return None
        d = Decimal(repr(x))
    if not d.is_finite():
        return None
    d = d.quantize(ONE, rounding=ROUND_HALF_UP)
    return d + 0 if d else Decimal("0.0")  # no "-0.0"


def fmt1(x) -> str:
    """'67.8'; '' for a missing value."""
    d = dec1(x)
    return "" if d is None else f"{d:.1f}"


def diff1(ours, paper) -> Decimal | None:
    """ours − paper between the one-decimal values (exact decimal arithmetic)."""
    a, b = dec1(ours), dec1(paper)
    return None if a is None or b is None else a - b


def fmt_diff(d) -> str:
    """'+1.2' / '-0.4' / '+0.0'; '' for None."""
    if d is None:
        return ""
    d = dec1(str(d)) if not isinstance(d, Decimal) else d
    return f"{d:+.1f}" if d else "+0.0"
