"""One thin module per pipeline step; each reads top to bottom like a recipe (`python -m stages.<name>`)."""
