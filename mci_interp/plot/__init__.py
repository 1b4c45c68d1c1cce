"""Figures. Every function takes result objects and returns a matplotlib ``Figure``; none saves
or shows (the CLI and report do that)."""
