"""``python -m flashmoe_gen.db upgrade [URL]``: create or migrate the winners database's schema
(default URL: ``$FLASHMOE_DB`` or the user cache). ``status [URL]`` prints its state."""

from __future__ import annotations

import argparse
import sys

from flashmoe_gen.errors import FlashMoEError

from .engine import make_engine
from .schema import SCHEMA_VERSION, describe, inspect_schema, ready_to_write


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashmoe_gen.db", description=__doc__)
    ap.add_argument("command", choices=["upgrade", "status"])
    ap.add_argument("url", nargs="?", default=None,
                    help="SQLAlchemy URL (default: $FLASHMOE_DB or the user cache)")
    a = ap.parse_args(argv)
    try:
        engine = make_engine(a.url)
        if a.command == "upgrade":
            ready_to_write(engine)
        schema = inspect_schema(engine)
    except FlashMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{describe(engine.url)}: schema {schema.state.value} "
          f"(version {schema.version or '-'}; this flashmoe_gen: {SCHEMA_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
