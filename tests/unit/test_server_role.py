"""Host lists and session attributes in DSNs: check-config's per-host report, pgsql: hosts."""

from __future__ import annotations

from maplookup.db.server_role import single_hosts


def test_a_host_list_splits_into_one_dsn_per_host_in_order() -> None:
    dsn = "postgresql://reader:pw@10.0.0.2:5432,10.0.0.1:5433/maplookup?target_session_attrs=any"
    assert single_hosts(dsn) == [
        "postgresql://reader:pw@10.0.0.2:5432/maplookup?target_session_attrs=any",
        "postgresql://reader:pw@10.0.0.1:5433/maplookup?target_session_attrs=any",
    ]
    one = "postgresql://reader@/maplookup?host=/run/postgresql"
    assert single_hosts(one) == [one]


def test_a_host_list_becomes_one_pgsql_hosts_entry_without_commas() -> None:
    from maplookup.postfix.config import pgsql_hosts_uri

    assert pgsql_hosts_uri(
        "postgresql://r:pw@10.0.0.2:5433,[::1],db.example/maplookup?target_session_attrs=prefer-standby"
    ) == (
        "postgresql://r:pw@/maplookup?host=10.0.0.2%2C::1%2Cdb.example&port=5433%2C5432%2C5432"
        "&target_session_attrs=prefer-standby"
    )
    assert pgsql_hosts_uri("postgresql://r@h:5432/db") == "postgresql://r@h:5432/db"
