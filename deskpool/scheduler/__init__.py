"""Placement: which host a new desktop goes to. Pure functions over facts (no I/O), so they
can be tested at the scale of hundreds of hosts and tens of thousands of desktops."""
