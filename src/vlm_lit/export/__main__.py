"""Entry point of ``python -m vlm_lit.export``."""

from vlm_lit.export.cli import main

if __name__ == "__main__":
    main()
