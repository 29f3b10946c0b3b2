"""The README quick start, run as written: python examples/quickstart.py

The quick start lives verbatim in examples/quickstart/ (database.py = step 1,
models.py = steps 2-3, main.py = step 4). This runner does what the README asks
the reader to do by hand: create the tables once ("Do not forget to migrate"),
then run step 4. DATABASE_URL selects the database (default: a fresh SQLite
file). SQL is echoed, so you see every statement the library sends.
"""

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "quickstart"))

from database import DATABASE_URL, engine
from main import main
from models import Base


async def create_tables() -> None:
    # The quick start's "Create tables (one-time, before first use)" snippet.
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)  # start fresh on every demo run
        await conn.run_sync(Base.metadata.create_all)


if __name__ == "__main__":
    if DATABASE_URL.startswith("sqlite") and "DATABASE_URL" not in os.environ:
        print("quick start on embedded SQLite (quickstart.db); set DATABASE_URL for PostgreSQL")
    asyncio.run(create_tables())
    asyncio.run(main())
    print("quick start finished: created, found, updated and deleted Alice")
