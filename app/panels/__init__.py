"""Parts of pages kept in modules of their own (their layout and callbacks)."""
