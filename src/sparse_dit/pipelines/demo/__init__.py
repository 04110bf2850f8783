"""The embedded demo: procedurally generated captioned clips of moving shapes, and their scorer."""
