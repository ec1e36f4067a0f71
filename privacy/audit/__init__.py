"""The auditor (``kyodo-audit``): trusts only members' published keys and budgets, and mathematics.

One module per job (README.md in this directory has the commands, the consortium format and
what every check establishes):

* ``consortium``: the consortium file (members, public keys, budgets): format, loading, assembly;
* ``inputs``: finding and strictly parsing ledgers and the coordinator's run directory;
* ``accounting``: independent epsilon recomputation with Google's dp-accounting;
* ``verify``: the checks (signatures, chains, accounting, budgets, receipts, store);
* ``findings``: the result data model shared by the checks, the CLI and the report;
* ``report``: the self-contained HTML report with plots and the Markdown summary;
* ``bound`` and ``canary``: the empirical one-run audit (Steinke, Nasr, Jagielski 2023);
* ``cli``: the command line.
"""
