"""Differential privacy of member nodes: DP-SGD setup, accountants, budgets, signed ledgers, audit."""
