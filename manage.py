#!/usr/bin/env python3
"""Django's command-line utility for administrative tasks."""

import os
import sys

if sys.version_info < (3, 12):  # noqa: UP036 - say so clearly on an old interpreter
    sys.exit(
        f"usage-dashboard needs Python 3.12 or newer (found {sys.version.split()[0]}). "
        "Run `make demo`, or create the venv with python3.12+."
    )


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "usage_dashboard.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
