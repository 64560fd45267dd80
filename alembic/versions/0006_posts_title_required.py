"""posts.title becomes required and longer (batch rebuild)

Revision ID: 0006
Revises: 0005
"""
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite cannot ALTER a column's type or nullability: Alembic's batch mode copies the
# table into a new one and renames it. copy_from gives batch mode the table's shape
# without reflecting it, which offline (--sql) rendering needs.

def _posts(title: sa.types.TypeEngine, nullable: bool) -> sa.Table:
    return sa.Table(
        "posts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("author_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("title", title, nullable=nullable),
        sa.Column("body", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
        sa.Index("ix_posts_author_created", "author_id", "created_at"),
    )


def upgrade() -> None:
    op.execute(sa.text("UPDATE posts SET title = '(untitled)' WHERE title IS NULL"))
    with op.batch_alter_table("posts", copy_from=_posts(sa.String(200), True)) as batch:
        batch.alter_column(
            "title", existing_type=sa.String(200), type_=sa.String(300), nullable=False
        )


def downgrade() -> None:
    with op.batch_alter_table("posts", copy_from=_posts(sa.String(300), False)) as batch:
        batch.alter_column(
            "title", existing_type=sa.String(300), type_=sa.String(200), nullable=True
        )
