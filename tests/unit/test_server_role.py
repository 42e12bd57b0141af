"""Host lists and session attributes in DSNs (check-config's per-host report)."""

from __future__ import annotations

from maplookup.db.server_role import single_hosts, with_session_attrs


def test_a_host_list_splits_into_one_dsn_per_host_in_order() -> None:
    dsn = "postgresql://reader:pw@10.0.0.2:5432,10.0.0.1:5433/maplookup?target_session_attrs=any"
    assert single_hosts(dsn) == [
        "postgresql://reader:pw@10.0.0.2:5432/maplookup?target_session_attrs=any",
        "postgresql://reader:pw@10.0.0.1:5433/maplookup?target_session_attrs=any",
    ]
    one = "postgresql://reader@/maplookup?host=/run/postgresql"
    assert single_hosts(one) == [one]


def test_session_attrs_are_set_or_replaced() -> None:
    assert with_session_attrs("postgresql://u@h/db", "read-write") == (
        "postgresql://u@h/db?target_session_attrs=read-write"
    )
    assert (
        with_session_attrs(
            "postgresql://u@h1,h2/db?sslmode=disable&target_session_attrs=prefer-standby",
            "read-write",
        )
        == "postgresql://u@h1,h2/db?sslmode=disable&target_session_attrs=read-write"
    )
