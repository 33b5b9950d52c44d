"""Jinja2 templates that pagefusion renders (domain XML of the demo guests)."""
