"""Corpora, token windows and evaluation task data, resolved from ``Q2LAB_DATA`` or paths."""
