"""An itemised memory estimate: named terms in bytes, their total, and a readable table."""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1 << 30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per term at the peak of one rank (``where`` says which rank or moment it is)."""

    terms: dict[str, int]
    where: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def largest(self, count: int = 3) -> list[tuple[str, int]]:
        return sorted(self.terms.items(), key=lambda item: -item[1])[:count]

    def table(self) -> str:
        """The terms largest first, in GiB and as a share of the total."""
        total = max(self.total, 1)
        width = max((len(name) for name in self.terms), default=4)
        lines = [f"{'term':<{width}}  {'GiB':>9}  {'share':>6}"]
        for name, size in self.largest(len(self.terms)):
            lines.append(f"{name:<{width}}  {size / GIB:9.3f}  {100 * size / total:5.1f}%")
        lines.append(f"{'total':<{width}}  {self.total / GIB:9.3f}")
        return "\n".join(lines)


def peak_of(estimates: list[MemoryEstimate]) -> MemoryEstimate:
    """The estimate with the largest total (the rank that decides whether a run fits)."""
    return max(estimates, key=lambda estimate: estimate.total)
