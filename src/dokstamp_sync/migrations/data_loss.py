"""Downgrades that would drop data refuse instead, unless the operator insists.

A downgrade that drops a column holding data nothing can rebuild (an outcome not yet written to
the outcome stream, DokStamp's verification URL of a certificate) first counts the rows it
would lose; if any, it raises :class:`DataWouldBeLost` naming them and what to do, before any
change. ``alembic -x lose_data=yes downgrade ...`` goes through anyway.
"""

from __future__ import annotations

from alembic import context, op
from sqlalchemy import text


class DataWouldBeLost(RuntimeError):
    """The downgrade was refused: it would drop data an upgrade cannot bring back."""


def refuse_if_any(count_sql: str, what: str, advice: str) -> None:
    """Raise :class:`DataWouldBeLost` when ``count_sql`` counts any row (``what`` names them),
    unless the downgrade runs with ``-x lose_data=yes``."""
    if context.get_x_argument(as_dictionary=True).get("lose_data") == "yes":
        return
    count = int(op.get_bind().execute(text(count_sql)).scalar_one())
    if count:
        raise DataWouldBeLost(
            f"downgrade refused: {count} {what} would be lost. {advice} To downgrade anyway, "
            "losing them, run: alembic -x lose_data=yes downgrade <revision>")
