"""Learned Nearest-Class-Mean long-tailed recognition: stage 1 (extract), stage 2 (fit-head), reports."""
__version__ = "0.1.0"
