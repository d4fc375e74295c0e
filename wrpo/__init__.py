"""WRPO: Weighted-Reward Preference Optimization for implicit model fusion."""

__version__ = "0.1.0"
