"""Cost models used by the planner: cluster spec, compute roofline, collectives, memory."""
