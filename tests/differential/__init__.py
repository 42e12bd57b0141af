"""Differential test (issue 12): Postfix + maplookup vs Postfix + hash: tables from export vs trace.

``dataset`` generates random data sets, ``recipients`` the addresses to try, ``harness`` runs
two private Postfix instances and collects each recipient's outcome, ``compare`` judges.  Run
many seeds with ``python -m tests.differential --seeds 1-20``.
"""
