"""A recipe: its schema (dataclasses read by TRL's TrlParser), its parsing and checks, and its generated --help."""
