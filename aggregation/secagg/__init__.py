"""Cryptographic core of SecAgg+ (Bell et al. 2020): pure functions, no Flower and no I/O.

The protocol driver lives elsewhere; keeping the primitives here, small and separately
tested, lets the security-relevant arithmetic be reviewed without reading any transport code.
"""
