"""alpa-plan's planner: importer -> training step -> intra-op ILP -> inter-op DP -> plan."""

__version__ = "0.1.0"
