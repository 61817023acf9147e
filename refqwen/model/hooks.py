"""The hook mechanism behind named trace points: each intermediate the model computes passes
through one line `x = self.hook("name", x)`, which returns x unchanged unless a trace is running.
refqwen/trace.py is the tool that listens (Tracer) and the table of names.
"""

class TracePoints:
    """One per model: its trace points report to `tracer`, None (nobody) unless a trace runs."""

    def __init__(self):
        self.tracer = None

    def at(self, prefix: str) -> "Hook":
        return Hook(self, prefix)


class Hook:
    """`hook(name, value)` reports value as prefix + name and returns it (or a hook's replacement)."""

    __slots__ = ("points", "prefix")

    def __init__(self, points: TracePoints, prefix: str):
        self.points, self.prefix = points, prefix

    def __call__(self, name: str, value):
        tracer = self.points.tracer
        return value if tracer is None else tracer.visit(self.prefix + name, value)

    def wants(self, name: str) -> bool:
        """Whether a running trace asks for this point (for points that cost something to compute)."""
        tracer = self.points.tracer
        return tracer is not None and tracer.wants(self.prefix + name)


UNTRACED = Hook(TracePoints(), "")  # class default: routed experts and unattached modules report nowhere
