"""The report of checking cases: every problem, by case and file, printable as one message.

:func:`~lightning_fedseg.data.validation.validate_cases` (``lightning-fedseg data check``)
returns a :class:`CheckReport`; reading a bad case for training raises :class:`BadCaseError`
carrying the same report, so training refuses exactly the cases ``data check`` lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BadCaseError", "CheckReport", "Problem"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a case: which case, which file (or folder), and what."""

    case_id: str
    path: Path
    message: str


@dataclass
class CheckReport:
    """Every problem found in a set of cases.

    Attributes:
        problems: all problems, case by case, in the order found.
        num_cases: how many cases were checked.
        root: the dataset folder, used to print paths relative to it.
    """

    problems: list[Problem] = field(default_factory=list)
    num_cases: int = 0
    root: Path | None = None

    @property
    def ok(self) -> bool:
        """Whether no problem was found (an empty dataset is not ok)."""
        return not self.problems and self.num_cases > 0

    @property
    def bad_case_ids(self) -> list[str]:
        """The ids of cases with at least one problem, in order of first appearance."""
        return list(dict.fromkeys(p.case_id for p in self.problems if p.case_id))

    def format(self) -> str:
        """A human-readable report, one line per problem, grouped by case."""
        where = f" under {self.root}" if self.root is not None else ""
        if self.ok:
            return f"Checked {self.num_cases} cases{where}: all OK."
        lines = [
            f"Checked {self.num_cases} cases{where}: {len(self.problems)} problem(s) in "
            f"{len(self.bad_case_ids)} case(s)."
        ]
        current: str | None = None
        for problem in self.problems:
            if problem.case_id != current:
                current = problem.case_id
                lines.append(f"{current or '(dataset)'}:")
            lines.append(f"  {self._display(problem.path)}: {problem.message}")
        return "\n".join(lines)

    def _display(self, path: Path) -> str:
        shown = str(path)
        if self.root is not None and path != self.root and path.is_relative_to(self.root):
            shown = str(path.relative_to(self.root))
        return shown + "/" if path.is_dir() else shown


class BadCaseError(ValueError):
    """A case failed validation; ``report`` names every problem and file.

    Attributes:
        report: the problems found.
    """

    def __init__(self, report: CheckReport, hint: str = "") -> None:
        self.report = report
        super().__init__(report.format() + (f"\nHINT: {hint}" if hint else ""))
