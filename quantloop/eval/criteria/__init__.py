"""The acceptance criteria: one module each behind one interface (base.py), in one registry (base.REGISTRY)."""
