"""Jinja2 templates of the generated CUDA sources (package data)."""
