"""A module that fails on import, for the ON_CLOSE setting's error message."""

raise RuntimeError("broken on purpose: this module cannot be imported")
