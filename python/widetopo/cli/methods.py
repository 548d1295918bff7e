"""`widetopo methods`: every registered pruning method with its schedule, options and defaults."""
from __future__ import annotations

from widetopo.cli.args import out
from widetopo.methods import all_methods, methods_markdown
from widetopo.options import describe, format_value

OUTPUTS = []
COMPUTES = False  # no "machine busy" thread choice for a listing


def add_parser(sub) -> None:
    p = sub.add_parser("methods", help="list every pruning method with its schedule, options and defaults",
                       description="Every registered pruning method: aliases, schedule defaults (rounds T, "
                                   "restorations R, steps J, rounds after each restoration T'), options with "
                                   "their defaults, and what it scores.")
    p.add_argument("--markdown", action="store_true", help="print the README's method table instead")


def run(args, quiet: bool) -> int:
    if args.markdown:
        out(methods_markdown())
        return 0
    for m in all_methods():
        s = m.schedule
        schedule = f"T = {s.rounds}" + (f", R = {s.restorations} x (J = {s.restore_steps}, T' = "
                                        f"{s.restore_rounds or s.rounds})" if s.restorations else "")
        aliases = f" (aliases: {', '.join(m.aliases)})" if m.aliases else ""
        out(f"{m.name}{aliases}: {m.summary}")
        out(f"    schedule: {schedule}; selection: {m.scorer.selection}"
            + ("; needs targets" if m.scorer.needs_targets else ""))
        rows = [(f"--option {name}={format_value(default)}", tname, help_text)
                for name, tname, default, help_text in describe(m.options)]
        if rows:
            w0, w1 = (max(len(r[k]) for r in rows) for k in (0, 1))
            for assignment, tname, help_text in rows:
                out(f"    {assignment:<{w0}}  {tname:<{w1}}  {help_text}")
    return 0
